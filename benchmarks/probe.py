"""Linear probes: which scene attributes can be read off an image encoder's (or connector's) features?

An MLLM can only answer from what its image tokens carry. This script encodes the synthetic world's
caption images with a checkpoint's ViT (an encoder, pre-training or SFT run; or random weights) and
fits a multinomial logistic regression per attribute on a train part, scoring held-out images:

| attribute | images used                             | classes |
|-----------|-----------------------------------------|---------|
| colour    | scenes whose objects all share one kind | 10      |
| shape     | the same                                | 8       |
| count     | all                                     | 1-5     |
| position  | one-object scenes (the object's cell)   | 9       |
| background| all (plain, gradient, noise, stripes)   | 4       |

With `--world` pointing at a `single` world (one shape per image), its 600 eval images are probed
for colour (8) and shape (4), the attributes `benchmarks/grounding.py` asks about.

Two feature sets: the mean-pooled ViT patch features (what a contrastive encoder is trained to
make linearly useful) and, for MLLM checkpoints, the connector's flattened output tokens (what the
LM actually receives). The chance level (majority class of the held-out part) is printed beside
each score.

    python benchmarks/probe.py runs/demo/encoder
    python benchmarks/probe.py runs/demo/pretrain --images 1500

Last line JSON: {"<features>": {"<attribute>": accuracy %, ...}, "chance": {...}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import cli, emit, machine_info  # noqa: E402

from mm1.config import load_config, preset_path  # noqa: E402
from mm1.data.images import image_tensors  # noqa: E402
from mm1.data.world import ensure_world  # noqa: E402
from mm1.data.world.scenes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES  # noqa: E402
from mm1.models.build import build_model  # noqa: E402
from mm1.train.checkpoint import read_checkpoint_weights, read_config, resolve_checkpoint  # noqa: E402

ATTRIBUTES = ("colour", "shape", "count", "position", "background")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default="", help="encoder/pretrain/SFT run or checkpoint ('' = random ViT)")
    p.add_argument(
        "--world",
        default="data/world-tiny",
        help="tiny world to read caption images from (built if missing), or a single world",
    )
    p.add_argument("--images", type=int, default=3000, help="caption images to encode (default 3000)")
    p.add_argument("--test-frac", type=float, default=0.25, help="held-out share per attribute")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")


def labels(scene: dict) -> dict[str, int | None]:
    """The attribute classes of one scene (None where the attribute is not well defined)."""
    objs = scene["objects"]
    if scene.get("single"):
        return {
            "colour": COLOURS_INDEX[objs[0]["colour"]],
            "shape": SHAPES.index(objs[0]["shape"]),
            "count": None,
            "position": None,
            "background": None,  # always plain
        }
    one_kind = len({(o["colour"], o["shape"]) for o in objs}) == 1
    return {
        "colour": COLOURS_INDEX[objs[0]["colour"]] if one_kind else None,
        "shape": SHAPES.index(objs[0]["shape"]) if one_kind else None,
        "count": len(objs) - 1,
        "position": POSITIONS.index(objs[0]["position"]) if len(objs) == 1 else None,
        "background": BACKGROUNDS.index(scene["background"]),
    }


COLOURS_INDEX = {c: i for i, c in enumerate(COLOURS)}


def caption_images(world: Path, n: int) -> tuple[list[bytes], list[dict]]:
    pngs, scenes = [], []
    for shard in sorted((world / "caption").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(k for k in members if k.endswith(".png")):
                key = name[:-4]
                pngs.append(tar.extractfile(members[name]).read())
                scenes.append(json.loads(tar.extractfile(members[key + ".json"]).read())["scene"])
                if len(pngs) == n:
                    return pngs, scenes
    return pngs, scenes


def single_images(world: Path) -> tuple[list[bytes], list[dict]]:
    """The single world's eval images (train and test splits) with the colour and shape their VQA
    annotations give, as one-object scenes."""
    pngs, scenes = [], []
    for split in ("train", "test"):
        questions = json.loads((world / "eval" / f"vqa_{split}_questions.json").read_text())["questions"]
        anns = json.loads((world / "eval" / f"vqa_{split}_annotations.json").read_text())["annotations"]
        files = {q["image_id"]: q["file_name"] for q in questions}
        found: dict[int, dict[str, str]] = {}
        for a in anns:
            if a["question_type"] in ("colour", "shape"):
                found.setdefault(a["image_id"], {})[a["question_type"]] = a["multiple_choice_answer"]
        for image_id, attrs in sorted(found.items()):
            pngs.append((world / "eval" / files[image_id]).read_bytes())
            scenes.append(
                {
                    "objects": [{"colour": attrs["colour"], "shape": attrs["shape"], "position": "center"}],
                    "single": True,
                }
            )
    return pngs, scenes


def load_parts(checkpoint: str) -> tuple[torch.nn.Module, torch.nn.Module | None, Any]:
    """(ViT, connector or None, model config) from any stage's checkpoint, or a random tiny ViT."""
    if not checkpoint:
        cfg = load_config(preset_path("tiny"))
        torch.manual_seed(0)
        return build_model(cfg.model).vision.eval(), None, cfg.model
    ckpt = resolve_checkpoint(checkpoint)
    cfg = read_config(ckpt)
    cfg.model.vision.hf_path = cfg.model.lm.hf_path = ""
    model = build_model(cfg.model)
    state = read_checkpoint_weights(ckpt)
    if cfg.train.stage == "encoder":
        vision = {k[len("vision.") :]: v for k, v in state.items() if k.startswith("vision.")}
        model.vision.load_state_dict(vision)
        return model.vision.eval(), None, cfg.model
    model.load_state_dict(state, strict=False)
    return model.vision.eval(), model.connector.eval(), cfg.model


@torch.no_grad()
def features(
    vision: torch.nn.Module, connector: torch.nn.Module | None, model_cfg: Any, pngs: list[bytes]
) -> dict[str, torch.Tensor]:
    v = model_cfg.vision
    out: dict[str, list[torch.Tensor]] = {"vit_mean": [], "connector": []}
    for i in range(0, len(pngs), 64):
        x = torch.cat(
            [image_tensors(p, f"image {i + j}", v.image_size, v.mean, v.std) for j, p in enumerate(pngs[i : i + 64])]
        )  # [n, 3, S, S]
        f = vision(x)  # [n, h*w, D_v]
        out["vit_mean"].append(f.mean(1))
        if connector is not None:
            out["connector"].append(connector(f).flatten(1))  # [n, k*D_lm]
    return {k: torch.cat(v) for k, v in out.items() if v}


def probe(x: torch.Tensor, y: torch.Tensor, test_frac: float, steps: int = 300) -> float:
    """Held-out accuracy (%) of an L2-regularised softmax regression on standardised features."""
    n_test = max(1, int(len(y) * test_frac))
    xtr, ytr, xte, yte = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    n_cls = int(y.max()) + 1
    w = torch.zeros(x.shape[1], n_cls, requires_grad=True)
    b = torch.zeros(n_cls, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100.0 * float(((xte @ w + b).argmax(1) == yte).float().mean())


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_config(preset_path("tiny"), [f"data.world={args.world}"]).data
    world = Path(args.world)
    if (world / "world.json").is_file() and json.loads((world / "world.json").read_text())["size"] == "single":
        pngs, scenes = single_images(world)
    else:
        pngs, scenes = caption_images(ensure_world(data, verbose=False), args.images)
    vision, connector, model_cfg = load_parts(args.checkpoint)
    feats = features(vision, connector, model_cfg, pngs)
    table = [labels(s) for s in scenes]
    result: dict[str, Any] = {"chance": {}}
    for attr in ATTRIBUTES:
        idx = [i for i, t in enumerate(table) if t[attr] is not None]
        if not idx:
            continue
        y = torch.tensor([table[i][attr] for i in idx])
        n_test = max(1, int(len(y) * args.test_frac))
        result["chance"][attr] = round(100.0 * float(torch.bincount(y[:n_test]).max()) / n_test, 1)
        for name, x in feats.items():
            result.setdefault(name, {})[attr] = round(probe(x[idx], y, args.test_frac), 1)
    emit({"machine": machine_info(), "checkpoint": args.checkpoint or "random", "images": len(pngs)})
    emit(result)
    return result


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

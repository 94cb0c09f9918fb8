"""Can the image encoder *learn* an attribute at all? Supervised training from pixels, per encoder variant.

A linear probe (`benchmarks/probe.py`) says what a trained encoder's features carry. When an
attribute stays at chance there, two explanations remain: the pre-training objective never asked for
it, or the architecture cannot pick it up at this size and budget. This benchmark separates them: it
trains the ViT end to end with a linear head on the mean-pooled patch features to classify one
attribute of freshly drawn scenes (`--scenes single`: one flat-coloured shape per image, shape 4
classes, colour 8; `--scenes tiny`: the demo's scenes, shape 8, colour 10), and reports held-out
accuracy along the way. Each `--arm` is a set of config overrides trained from the same seed on the
same images, so the comparison is paired.

The default arms compare the stem (`model.vision.stem`): `patch` (the ViT/CLIP patchify) against
`conv` (3x3 stride-2 convolutions, `mm1.models.stems`), at the preset's resolution and patch size.
Position-embedding inits, patch sizes and resolutions are arms like any other override.

    python benchmarks/learnability.py --scenes tiny         # shape, both stems, 300 steps
    python benchmarks/learnability.py --attribute colour --arm model.vision.patch_size=4

Last line JSON: {"attribute", "chance", "arms": {name: {"accuracy", "curve", "seconds"}}} (percent).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import cli, emit, machine_info  # noqa: E402

from mm1.config import VisionConfig, load_config, preset_path  # noqa: E402
from mm1.data.images import image_tensors  # noqa: E402
from mm1.data.world.scenes import COLOURS, SHAPES, png_bytes, render, sample_scene  # noqa: E402
from mm1.data.world.single import SINGLE_COLOURS, SINGLE_SHAPES, single_eval_item  # noqa: E402
from mm1.models.vision import ViT  # noqa: E402

# classes per scene family: `single` (one huge shape) or `tiny` (the tiny world's scenes, 1-5 objects
# of one colour-shape kind, small or large, on textured backgrounds: what the demo's encoder sees)
CLASSES = {
    "single": {"shape": SINGLE_SHAPES, "colour": SINGLE_COLOURS},
    "tiny": {"shape": SHAPES, "colour": tuple(COLOURS)},
}
DEFAULT_ARMS = ["model.vision.stem=patch", "model.vision.stem=conv"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attribute", choices=sorted(CLASSES["single"]), default="shape")
    p.add_argument("--scenes", choices=sorted(CLASSES), default="single", help="scene family (default single)")
    p.add_argument("--preset", default="tiny", help="preset whose model.vision is trained (default tiny)")
    p.add_argument(
        "--arm",
        action="append",
        default=[],
        help="comma-separated config overrides of one arm (repeatable; default: the two stems)",
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-images", type=int, default=20000, help="distinct training scenes (default 20000)")
    p.add_argument("--test-images", type=int, default=400)
    p.add_argument("--every", type=int, default=50, help="score the held-out scenes every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")


def _scene(family: str, seed: int, split: str, i: int) -> tuple[bytes, dict]:
    """(PNG at the worlds' native 128 px, the object's attributes) of scene i of a family."""
    if family == "single":
        item = single_eval_item(seed, i, split, 128, frozenset())
        return item["png"], item["scene"]["objects"][0]
    rng = np.random.default_rng([seed, ("train", "test").index(split), i])
    kind = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
    s = sample_scene(rng, kinds=[kind], label_prob=0.0)
    return png_bytes(render(s, 128)), {"colour": kind[0], "shape": kind[1]}


def scenes(
    vision: VisionConfig, family: str, attribute: str, split: str, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """n scenes of `family` and `split` as ([n,3,S,S] pixels, [n] class ids)."""
    xs, ys = [], []
    for i in range(n):
        png, obj = _scene(family, seed, split, i)
        xs.append(image_tensors(png, f"{split} scene {i}", vision.image_size, vision.mean, vision.std)[0])
        ys.append(CLASSES[family][attribute].index(obj[attribute]))
    return torch.stack(xs), torch.tensor(ys)


def train_arm(
    vision: VisionConfig, data: dict[str, tuple[torch.Tensor, torch.Tensor]], n_classes: int, args: argparse.Namespace
) -> dict[str, Any]:
    """Train ViT + linear head from seed `args.seed`; held-out accuracy every `args.every` steps."""
    torch.manual_seed(args.seed)
    vit, head = ViT(vision), torch.nn.Linear(vision.width, n_classes)
    opt = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.0)
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    order = torch.Generator().manual_seed(args.seed)
    curve, start = [], time.perf_counter()

    def accuracy() -> float:
        vit.eval()
        with torch.no_grad():
            hits = sum(
                int((head(vit(xte[i : i + 256]).mean(1)).argmax(1) == yte[i : i + 256]).sum())
                for i in range(0, len(yte), 256)
            )
        vit.train()
        return round(100.0 * hits / len(yte), 1)

    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(ytr), (args.batch,), generator=order)
        loss = F.cross_entropy(head(vit(xtr[idx]).mean(1)), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            curve.append({"step": step, "loss": round(loss.item(), 4), "accuracy": accuracy()})
            print(f"  step {step}: loss {loss.item():.3f}, held-out accuracy {curve[-1]['accuracy']} %", flush=True)
    return {"accuracy": curve[-1]["accuracy"], "curve": curve, "seconds": round(time.perf_counter() - start, 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    arms = args.arm or DEFAULT_ARMS
    visions = {
        arm: load_config(preset_path(args.preset), [o for o in arm.split(",") if o]).model.vision for arm in arms
    }
    sizes = {(v.image_size, tuple(v.mean), tuple(v.std)) for v in visions.values()}
    if len(sizes) != 1:
        raise SystemExit("learnability: arms must share model.vision.image_size, mean and std (same pixels)")
    first = next(iter(visions.values()))
    data = {
        "train": scenes(first, args.scenes, args.attribute, "train", args.train_images, args.seed),
        "test": scenes(first, args.scenes, args.attribute, "test", args.test_images, args.seed),
    }
    yte = data["test"][1]
    chance = round(100.0 * float(torch.bincount(yte).max()) / len(yte), 1)
    result: dict[str, Any] = {"scenes": args.scenes, "attribute": args.attribute, "chance": chance, "arms": {}}
    emit(
        {
            "machine": machine_info(),
            "scenes": args.scenes,
            "attribute": args.attribute,
            "steps": args.steps,
            "batch": args.batch,
            "train_images": args.train_images,
            "test_images": args.test_images,
        }
    )
    for arm, vision in visions.items():
        print(f"arm {arm}", flush=True)
        result["arms"][arm] = train_arm(vision, data, len(CLASSES[args.scenes][args.attribute]), args)
    emit(result)
    return result


def main(argv: list[str] | None = None) -> int:
    return cli(__doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Shared helpers of the benchmarks: machine description, timing, JSON output, and the HF peer.

Every figure a benchmark prints carries the machine it was measured on (CPU model, cores, GPU,
torch version, date), so a number pasted into RESULTS.md can always be traced. The peer is
transformers' `LlavaForConditionalGeneration` built with the SAME shape and the SAME weights as our
MLLM (CLIP-style tower, LLaVA MLP projector, Llama LM), so loss/tokens can be asserted equal before
anything is timed. transformers is imported here only, never from `src/mm1`.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run as `python benchmarks/x.py` without installing the package
    sys.path.insert(0, str(ROOT / "src"))


# ----------------------------------------------------------------------------- dependencies

# module -> the pip spec that provides it. A bare CUDA image (a torch container) has torch but often
# not mm1's pure-Python dependencies; omegaconf 2.3 also needs antlr4-python3-runtime 4.9 at import.
RUNTIME_DEPS = {
    "omegaconf": "omegaconf>=2.3",
    "webdataset": "webdataset>=0.2.90",
    "braceexpand": "braceexpand",
    "safetensors": "safetensors>=0.4",
    "tokenizers": "tokenizers>=0.19",
    "jinja2": "jinja2>=3.1",
    "pyarrow": "pyarrow>=14",
    "PIL": "pillow>=10",
    "yaml": "pyyaml>=6",
}
ANTLR = "antlr4-python3-runtime==4.9.*"


def missing_deps() -> list[str]:
    """Pip specs of the runtime dependencies this Python cannot import. Each is imported, not just
    looked up, so a present but broken one (omegaconf 2.3 without its antlr4 runtime) counts too."""
    missing = []
    for module, spec in RUNTIME_DEPS.items():
        try:
            importlib.import_module(module)
        except ImportError as e:
            missing.append(ANTLR if module == "omegaconf" and "antlr4" in str(e) else spec)
    return missing


def missing_deps_message(script: str) -> str | None:
    """One line naming what is missing and the pip command that provides it; None when nothing is."""
    missing = missing_deps()
    if not missing:
        return None
    return (
        f"{script}: missing Python packages: {', '.join(missing)}; install them with "
        f"pip install {' '.join(repr(m) for m in missing)} (or pip install -e . from the repo)"
    )


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo on Linux; platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Everything a reader needs to compare a figure: CPU, usable cores, threads, GPU, versions, date."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout (flushed: a benchmark killed later still leaves what it measured)."""
    print(json.dumps(record, default=_jsonable), flush=True)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    return str(x)


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Seconds one call of `fn` takes, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Time each function `repeats` times, interleaved A B A B ... (order flipped every round), so
    that drift in machine load (other processes, thermal state) hits every side alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(fns[name], device))
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


# ----------------------------------------------------------------------------- the HF peer


def llava_pair(vision: dict[str, Any], lm: dict[str, Any], seed: int = 0):
    """(ours, theirs): our MLLM and transformers' LlavaForConditionalGeneration with one shape and
    one set of weights. HF is built with random weights first and ours is loaded from its state
    dict through mm1's own HF converters (which also tests those converters at benchmark shape).

    vision: image_size, patch_size, width, depth, heads, mlp_dim; lm: vocab_size, dim, n_layers,
    n_heads, n_kv_heads, ffn_dim. The connector is LLaVA's MLP (k = patches), features from the
    last block with CLS dropped (`vision_feature_layer=-1`, "default": both sides run
    every block; LLaVA-1.5 uses -2, where HF still runs the last block and we do not build it)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mm1.config import load_config
    from mm1.models import build_model
    from mm1.models.hf_lm import convert_hf_lm_state_dict
    from mm1.models.hf_vision import convert_hf_vision_state_dict

    grid = vision["image_size"] // vision["patch_size"]
    overrides = [f"model.vision.{k}={v}" for k, v in vision.items()] + [f"model.lm.{k}={v}" for k, v in lm.items()]
    overrides += [
        "model.vision.act=quick_gelu",
        "model.vision.use_cls=true",
        "model.vision.pre_norm=true",
        "model.vision.post_norm=false",
        "model.vision.feature_layer=-1",
        "model.connector.kind=mlp",
        f"model.connector.num_tokens={grid * grid}",
        "model.connector.mlp_depth=2",
        "model.lm.tie_embeddings=false",
        "model.lm.attention=sdpa",
    ]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides).model

    torch.manual_seed(seed)
    hf_cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision["width"],
            intermediate_size=vision["mlp_dim"],
            num_hidden_layers=vision["depth"],
            num_attention_heads=vision["heads"],
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            hidden_act="quick_gelu",
            projection_dim=vision["width"],
        ),
        text_config=LlamaConfig(
            vocab_size=lm["vocab_size"],
            hidden_size=lm["dim"],
            intermediate_size=lm["ffn_dim"],
            num_hidden_layers=lm["n_layers"],
            num_attention_heads=lm["n_heads"],
            num_key_value_heads=lm.get("n_kv_heads") or lm["n_heads"],
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        image_token_id=cfg.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    hf_cfg._attn_implementation = "sdpa"
    theirs = LlavaForConditionalGeneration(hf_cfg).float().eval()
    ours = build_model(cfg).float()
    load_peer_weights(ours, theirs, convert_hf_vision_state_dict, convert_hf_lm_state_dict)
    return ours, theirs


def load_peer_weights(ours, theirs, convert_vision, convert_lm) -> None:
    """Copy the HF Llava's weights into our MLLM (strict: every parameter of ours is set)."""
    vision_sd = {
        f"vision_model.{k}" if not k.startswith("vision_model.") else k: v
        for k, v in theirs.model.vision_tower.state_dict().items()
    }
    vit = convert_vision(vision_sd, ours.cfg.vision, where="HF Llava vision tower")
    lm_sd = {f"model.{k}": v for k, v in theirs.model.language_model.state_dict().items()}
    lm_sd["lm_head.weight"] = theirs.lm_head.weight
    lm = convert_lm(lm_sd, ours.cfg.lm)
    proj = theirs.model.multi_modal_projector
    conn = {
        "readout.0.weight": proj.linear_1.weight,
        "readout.0.bias": proj.linear_1.bias,
        "readout.2.weight": proj.linear_2.weight,
        "readout.2.bias": proj.linear_2.bias,
    }
    with torch.no_grad():
        ours.vision.load_state_dict(vit, strict=True)
        ours.lm.load_state_dict(lm, strict=True)
        ours.connector.load_state_dict(conn, strict=True)


def multimodal_batch(cfg, batch: int, seq_len: int, images_per_row: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic LLaVA-style batch: each row = <s>, then `images_per_row` times (k slot ids + a few
    text tokens), text to the end. `labels` are unshifted (HF convention); `targets` are ours
    (labels shifted left by one, -100 at slots)."""
    g = torch.Generator().manual_seed(seed)
    k, slot = cfg.connector.num_tokens, cfg.image_token_id
    vocab = cfg.lm.vocab_size
    ids = torch.randint(6, vocab, (batch, seq_len), generator=g)  # ids 0-5 are the special tokens
    ids[:, 0] = 1
    stride = (seq_len - 1) // max(images_per_row, 1)
    if images_per_row and stride <= k:
        raise ValueError(f"{images_per_row} images of {k} tokens do not fit a sequence of {seq_len}")
    for i in range(images_per_row):
        ids[:, 1 + i * stride : 1 + i * stride + k] = slot
    labels = torch.where(ids == slot, -100, ids)
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    v = cfg.vision
    images = torch.randn(batch * images_per_row, 3, v.image_size, v.image_size, generator=g)
    return {"input_ids": ids, "labels": labels, "targets": targets, "images": images}


def cli(
    doc: str, add_arguments: Callable[[Any], None], run: Callable[[Any], Any], argv: list[str] | None = None
) -> int:
    """The shared `main` of a benchmark script: parse its arguments, run it, exit 0. An error in the
    user's input or machine (a missing checkpoint, a wrong config value) ends it with one line, as
    `mm1` commands do, not a traceback."""
    import argparse

    from mm1.cli import EXPECTED, error_line

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except EXPECTED as e:
        parser.exit(2, f"{parser.prog}: {error_line(e)}\n")
    return 0


# The tiny preset's encoder and LM: the shape both peer benchmarks (train_step, generate) compare on.
VISION = dict(image_size=64, patch_size=8, width=128, depth=4, heads=4, mlp_dim=512)
LM = dict(vocab_size=2048, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=688)


def add_pair_arguments(p: Any) -> None:
    """`--threads` and `--small`, shared by the benchmarks that build an mm1 / transformers pair."""
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--small", action="store_true", help="a smaller model (tests): 2+2 layers, width 64")


def pair_from_args(args: Any) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """(ours, theirs, vision shape, LM shape) with the same weights, honouring --threads / --small."""
    if args.threads:
        torch.set_num_threads(args.threads)
    vision, lm = dict(VISION), dict(LM)
    if args.small:
        vision.update(width=64, depth=2, heads=2, mlp_dim=256)
        lm.update(dim=64, n_layers=2, ffn_dim=172, vocab_size=512)
    ours, theirs = llava_pair(vision, lm)
    return ours, theirs, vision, lm

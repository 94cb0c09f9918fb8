"""GPU training check: the tiny preset and a ~1.5B preset train on CUDA in bf16 with FSDP2 (1 GPU).

What it establishes, as one JSON line per run plus a verdict:
- tiny: the bf16 / FSDP2 / CUDA run gives, step for step, the loss of the fp32 single-process CPU
  run of the same config and data (same seed: same init, same batches) within `--tolerance`
  relative - so the CUDA path computes the same thing, only faster;
- mm1-1b (configs/mm1-1b.yaml: ViT-L/14 at 336 px, 144-token C-Abstractor, ~1.1B LM, sequences of
  4096 with up to 16 images) trains a few steps with a finite, falling loss; tokens/s, images/s,
  MFU and peak GPU memory are reported (median over the steps after the first two).
Every run is a real `mm1 train` subprocess into its own run dir, read back from metrics.jsonl.

    python benchmarks/gpu_train_check.py               # on a CUDA machine (falls back to --dry-run)
    python benchmarks/gpu_train_check.py --dry-run     # CPU: same plumbing, FSDP2 fp32 vs single fp32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine_info  # noqa: E402

TINY = ["train.warmup_steps=3", "train.save_every=1000", "data.num_workers=2"]
DRY = ["data.num_workers=0", "model.lm.n_layers=2", "model.vision.depth=2", "data.seq_len=128", "data.batch_size=2"]
BIG = [
    "data.world_preset=tiny",
    "data.num_workers=6",
    "data.batch_size=1",
    "train.warmup_steps=2",
    "train.save_every=1000",
    "model.lm.activation_checkpointing=true",
]


def mm1_train(preset: str, out: Path, overrides: list[str], cpu: bool, save: bool = True) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    argv = ["train", str(ROOT / "configs" / preset), *overrides, "--out", str(out)]
    # the big run skips its final checkpoint: writing ~18 GB of weights + AdamW state is not what is measured
    patch = "import mm1.train.trainer as t; t.Trainer._save = lambda self, step: None; " if not save else ""
    cmd = [sys.executable, "-c", f"{patch}import sys; from mm1.cli import main; sys.exit(main({argv!r}))"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summarise(name: str, rows: list[dict]) -> dict:
    steady = rows[2:] or rows
    med = lambda k: statistics.median(r[k] for r in steady) if all(k in r for r in steady) else None  # noqa: E731
    return {
        "run": name,
        "steps": len(rows),
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "losses": [round(r["loss"], 5) for r in rows],
        "tokens_per_s": med("tokens_per_s"),
        "images_per_s": med("images_per_s"),
        "mfu": med("mfu"),
        "step_time_s": med("step_time_s"),
        "peak_mem_gb": max((r.get("max_mem_gb", 0.0) for r in rows), default=None),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU only: FSDP2 fp32 vs single fp32, tiny shapes")
    p.add_argument("--steps", type=int, default=10, help="steps of the tiny runs")
    p.add_argument("--big-steps", type=int, default=6, help="steps of the ~1.5B run (0 = skip it)")
    p.add_argument("--big-preset", default="mm1-1b.yaml")
    p.add_argument("--tolerance", type=float, default=0.02, help="max relative loss gap, tiny bf16 GPU vs fp32 CPU")
    p.add_argument(
        "--world", default=str(ROOT / "data" / "world-tiny"), help="the tiny synthetic world (built if missing)"
    )
    p.add_argument("--out", default="", help="write the JSON here too")
    args = p.parse_args(argv)
    import torch

    dry = args.dry_run or not torch.cuda.is_available()
    if dry and not args.dry_run:
        print("gpu_train_check: no CUDA device, running the CPU dry run", file=sys.stderr)
    steps = 2 if dry else args.steps
    base = [f"data.world={args.world}", f"train.steps={steps}", *TINY, *(DRY if dry else [])]
    results: dict = {"machine": machine_info(), "dry_run": dry}
    with tempfile.TemporaryDirectory() as tmp:
        ref = mm1_train("tiny.yaml", Path(tmp) / "cpu", [*base, "train.precision=fp32"], cpu=True)
        dev = mm1_train(
            "tiny.yaml",
            Path(tmp) / "dev",
            [*base, "train.strategy=fsdp", f"train.precision={'fp32' if dry else 'bf16'}"],
            cpu=dry,
        )
        gaps = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(ref, dev)]
        tol = 1e-5 if dry else args.tolerance
        results["tiny_cpu_fp32"] = summarise("tiny cpu fp32 single", ref)
        results["tiny_device"] = summarise(f"tiny {'cpu fp32' if dry else 'cuda bf16'} fsdp", dev)
        results["tiny_max_rel_gap"] = max(gaps)
        ok = len(ref) == len(dev) == steps and max(gaps) <= tol and all(map(_finite, (r["loss"] for r in dev)))
        if not dry and args.big_steps:
            big = mm1_train(
                args.big_preset,
                Path(tmp) / "big",
                [
                    f"data.world={args.world}",
                    *BIG,
                    f"train.steps={args.big_steps}",
                    "train.strategy=fsdp",
                    "train.precision=bf16",
                ],
                cpu=False,
                save=False,
            )
            results["big"] = summarise(f"{args.big_preset} cuda bf16 fsdp", big)
            ok = ok and all(_finite(r["loss"]) for r in big) and big[-1]["loss"] < big[0]["loss"]
    results["ok"] = ok
    text = json.dumps(results)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if ok else 1


def _finite(x: float) -> bool:
    return isinstance(x, float) and x == x and abs(x) != float("inf")


if __name__ == "__main__":
    sys.exit(main())

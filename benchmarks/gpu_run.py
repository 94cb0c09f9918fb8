"""The one prepared GPU run: what a CUDA machine has to establish for mm1, in one command, as JSON.

    python benchmarks/gpu_run.py --out gpu_run.json     # on a CUDA machine (not yet timed on one)
    python benchmarks/gpu_run.py --cpu-rehearsal        # the same path on CPU: tiny preset, a few steps
    python benchmarks/gpu_run.py --stages train,eval    # a subset, e.g. when device time is short

Three stages, each in its own try/except (one failing stage still leaves the others measured):
1. throughput: `benchmarks/gpu.py`'s variants on the ~1B preset at 4096 tokens (MFU with encoder
   FLOPs counted, tokens/s, images/s, peak memory; eager, compile, activation checkpointing,
   FlexAttention vs a dense mask);
2. train + resume: the `small` preset trains `--steps` (200) steps in bf16 on the GPU as a real
   `mm1 train` process, saving a checkpoint at the half; a second run starts from a copy of that
   checkpoint alone (`--resume`) and trains to the end. Its losses must follow the uninterrupted
   run's: within `--resume-tolerance` relative on a GPU (bf16 kernels are not bit-exact run to run),
   1e-5 in the fp32 CPU rehearsal;
3. eval: `mm1 eval` of the trained checkpoint on the world's caption and VQA tasks with the weights
   loaded straight onto the GPU in bf16 (`eval.device=cuda eval.dtype=bf16`), and the same items on
   the CPU in fp32: scores side by side, each with its image-shuffled control and image gain.

A bare CUDA image often lacks some of mm1's pure-Python dependencies (omegaconf and, for omegaconf
2.3, its antlr4 runtime; webdataset; braceexpand): they are imported first and a missing one is
named with the pip line that provides it, before anything runs. The rehearsal (tested) runs every
stage on CPU with the tiny preset, so the GPU run is not its first execution.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, machine_info, missing_deps_message  # noqa: E402


def mm1(argv: list[str], cpu: bool, log: Path) -> None:
    """Run `python -m mm1 ARGV` with this checkout's src first; its output goes to `log`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    with open(log, "w") as f:
        done = subprocess.run(
            [sys.executable, "-m", "mm1", *argv], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"mm1 {' '.join(argv[:2])} exited {done.returncode}; last lines of {log}:\n"
            + "\n".join(log.read_text().splitlines()[-15:])
        )


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def stage_throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import gpu

    p = argparse.ArgumentParser()
    gpu.add_arguments(p)
    argv = ["--out", str(work / "gpu.json")]
    if args.cpu_rehearsal:
        argv += ["--tiny", "--variants", "eager,eager+ckpt", "--warmup", "1", "--steps", "1"]
    summary = gpu.run(p.parse_args(argv))
    if not summary["ok"]:
        raise RuntimeError(f"every throughput variant failed: {summary['variants']}")
    return {
        "variants_ok": summary["ok"],
        **{
            k: summary[k]
            for k in (
                "preset",
                "device",
                "shape",
                "params",
                "flops_per_step",
                "peak_flops",
                "failed",
                "best_variant",
                "best_tokens_per_s",
                "best_mfu",
                "variants",
            )
        },
    }


def stage_train(args: argparse.Namespace, work: Path, plan: dict[str, Any]) -> dict[str, Any]:
    steps, half = plan["steps"], plan["steps"] // 2
    common = [
        f"data.world={plan['world']}",
        f"train.steps={steps}",
        f"train.save_every={half}",
        "train.keep_last=0",
        f"train.precision={plan['precision']}",
        *plan["overrides"],
    ]
    full, resumed = work / "train", work / "resumed"
    t0 = time.perf_counter()
    mm1(["train", plan["preset"], *common, "--out", str(full)], plan["cpu"], work / "train.log")
    train_s = time.perf_counter() - t0
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / f"step-{half}", resumed / "checkpoints" / f"step-{half}")
    mm1(["train", plan["preset"], *common, "--out", str(resumed), "--resume"], plan["cpu"], work / "resume.log")
    ref, got = losses(full), losses(resumed)
    after = [s for s in range(half + 1, steps + 1)]
    gaps = [abs(got[s] - ref[s]) / abs(ref[s]) for s in after if s in got and s in ref]
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    steady = rows[len(rows) // 10 :] or rows
    mean = lambda key: sum(r[key] for r in steady) / len(steady) if all(key in r for r in steady) else None  # noqa: E731
    return {
        "preset": plan["preset"],
        "precision": plan["precision"],
        "steps": len(ref),
        "resumed_from": half,
        "resumed_steps": sorted(got) == after,
        "loss_first": ref[1],
        "loss_half": ref[half],
        "loss_last": ref[steps],
        "resume_max_rel_gap": max(gaps) if gaps else None,
        "resume_tolerance": plan["tolerance"],
        "resume_ok": bool(gaps) and len(gaps) == len(after) and max(gaps) <= plan["tolerance"],
        "tokens_per_s": mean("tokens_per_s"),
        "images_per_s": mean("images_per_s"),
        "mfu": mean("mfu"),
        "peak_mem_gb": max((r.get("max_mem_gb") or 0.0 for r in rows), default=None),
        "wall_s": train_s,
        "run_dir": str(full),
    }


def stage_eval(args: argparse.Namespace, work: Path, plan: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, device, dtype in plan["evals"]:
        json_dir = work / f"eval-{name}"
        t0 = time.perf_counter()
        mm1(
            [
                "eval",
                "--checkpoint",
                str(work / "train"),
                "--tasks",
                "world_caption,world_vqa",
                "--shots",
                plan["shots"],
                "--limit",
                str(plan["eval_limit"]),
                "--json",
                str(json_dir),
                f"data.world={plan['world']}",
                f"eval.device={device}",
                f"eval.dtype={dtype}",
            ],
            device == "cpu",
            work / f"eval-{name}.log",
        )
        results = [json.loads(p.read_text()) for p in sorted(json_dir.glob("*shot.json"))]
        out[name] = {
            "device": device,
            "dtype": dtype,
            "wall_s": time.perf_counter() - t0,
            "scores": {
                f"{r['task']}@{r['shots']}": {k: r.get(k) for k in ("metric", "score", "score_shuffled", "image_gain")}
                for r in results
            },
        }
    first, *others = out.values()
    out["max_score_gap"] = max(
        (abs(o["scores"][k]["score"] - v["score"]) for o in others for k, v in first["scores"].items()), default=0.0
    )
    return out


def plan_for(args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    if args.cpu_rehearsal or not cuda:
        return {
            "cpu": True,
            "preset": "tiny",
            "steps": args.rehearsal_steps,
            "precision": "fp32",
            "tolerance": 1e-5,
            "world": args.world or str(ROOT / "data" / "world-tiny"),
            "eval_limit": 6,
            "shots": "0",
            "overrides": [
                "model.lm.n_layers=2",
                "model.vision.depth=2",
                "data.seq_len=128",
                "data.batch_size=2",
                "data.num_workers=0",
                "train.warmup_steps=2",
                "train.eval_every=0",
            ],
            "evals": [("cpu-bf16", "cpu", "bf16"), ("cpu-fp32", "cpu", "fp32")],
        }
    return {
        "cpu": False,
        "preset": "small",
        "steps": args.steps,
        "precision": "bf16",
        "tolerance": args.resume_tolerance,
        "world": args.world or str(ROOT / "data" / "world-small"),
        "eval_limit": args.eval_limit,
        "shots": "0,4",
        "overrides": ["data.num_workers=6", "train.warmup_steps=20"],
        "evals": [("cuda-bf16", "cuda", "bf16"), ("cpu-fp32", "cpu", "fp32")],
    }


def run_stage(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        out = {"ok": True, **fn()}
    except Exception as e:  # noqa: BLE001  (a failing stage is reported; the others still run)
        out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:3000], "trace": traceback.format_exc(limit=5)[-2000:]}
    out["stage_s"] = time.perf_counter() - t0
    print(json.dumps({"stage": name, **out}, default=str), file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cpu-rehearsal", action="store_true", help="every stage on CPU with the tiny preset (automatic without CUDA)"
    )
    p.add_argument("--stages", default="throughput,train,eval", help="comma-separated subset, in this order")
    p.add_argument("--steps", type=int, default=200, help="training steps of the small preset (checkpoint at half)")
    p.add_argument("--rehearsal-steps", type=int, default=4, help="training steps in the CPU rehearsal")
    p.add_argument("--resume-tolerance", type=float, default=0.02, help="max relative loss gap after resume on a GPU")
    p.add_argument("--eval-limit", type=int, default=100, help="test items per eval task")
    p.add_argument("--world", default="", help="the synthetic world to train and evaluate on (built if missing)")
    p.add_argument("--work", default="", help="keep run dirs and logs here (default: a temp dir, removed)")
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    problem = missing_deps_message("gpu_run.py")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_rehearsal:
        print("gpu_run.py: no CUDA device; running the CPU rehearsal (no GPU figure comes from it)", file=sys.stderr)
    plan = plan_for(args, cuda)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mm1-gpu-run-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "bench": "gpu_run",
        "rehearsal": plan["cpu"],
        "machine": machine_info(),
        "plan": {k: v for k, v in plan.items() if k != "evals"},
    }
    try:
        if "throughput" in stages:
            result["throughput"] = run_stage("throughput", lambda: stage_throughput(args, work))
        if "train" in stages or "eval" in stages:
            result["train"] = run_stage("train", lambda: stage_train(args, work, plan))
        if "eval" in stages:
            result["eval"] = (
                run_stage("eval", lambda: stage_eval(args, work, plan))
                if result["train"]["ok"]
                else {"ok": False, "error": "skipped: no trained checkpoint"}
            )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    ran = [result[s] for s in ("throughput", "train", "eval") if s in result]
    result["ok"] = all(r["ok"] for r in ran) and result.get("train", {}).get("resume_ok", True) is not False
    text = json.dumps(result, default=str)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

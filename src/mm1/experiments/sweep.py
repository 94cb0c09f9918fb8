"""Running the points of an ablation, resumably: each point is an ordinary `train` + `evaluate`.

Layout of a sweep directory::

    SWEEP/sweep.json                     the spec and every point (axis labels, seed, run)
    SWEEP/points/RUN/STAGE.yaml          the exact resolved config of each stage (init_from filled in)
    SWEEP/points/RUN/STAGE/              the stage's run dir (config.yaml, metrics.jsonl, checkpoints/)
    SWEEP/points/RUN/STAGE.done.json     written when that stage's training finished
    SWEEP/points/RUN/eval-STAGE.json     evaluation results of that stage's final checkpoint
    SWEEP/points/RUN/done.json           written atomically, last: the point is finished
    SWEEP/commands.sh                    the same points as shell commands (see below)
    SWEEP/report.md, summary.json, plots/

A sweep that is killed and rerun skips every point with a `done.json`, skips finished stages of a
half-done point, and resumes a half-trained stage from its latest checkpoint.

On a cluster: `mm1 ablate SPEC --dry-run --out SWEEP` writes every stage config and `commands.sh`
(one `mm1 train` / `mm1 eval` line per stage, the same thing this module runs). Launch each line
as its own job, replacing `mm1` by `torchrun --nnodes N --nproc_per_node 8 -m mm1` for training
(e.g. one sbatch array task per point; a stage only starts after the previous stage of its point).
Once the jobs are done, `mm1 ablate SPEC --out SWEEP` recognises the finished stages (a checkpoint
at `train.steps`) and evaluations (`points/RUN/eval-STAGE/*.json`), runs whatever is missing and
writes the `done.json` markers and the report. Alternatively let `mm1 ablate` drive everything
from one node: `--launcher "torchrun --nproc_per_node 8 -m mm1"` runs every stage that way.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import yaml

from mm1.config import Config
from mm1.experiments.ablate import Point, unique_runs


class Runner(Protocol):
    """Trains one stage and evaluates one run dir; the sweep owns ordering, markers and resuming."""

    def train(self, cfg: Config, config_path: Path, out: Path, resume: bool) -> None: ...

    def evaluate(self, run_dir: Path, cfg: Config, config_path: Path) -> list[dict]: ...


class InProcessRunner:
    """`mm1.train.trainer.train` and `mm1.eval.runner.evaluate` in this process (the local default)."""

    def train(self, cfg: Config, config_path: Path, out: Path, resume: bool) -> None:
        from mm1.train.trainer import train

        train(cfg, out, resume=resume)

    def evaluate(self, run_dir: Path, cfg: Config, config_path: Path) -> list[dict]:
        import torch

        from mm1.eval.runner import evaluate
        from mm1.train import load_checkpoint

        model, ckpt_cfg, tokenizer = load_checkpoint(run_dir)
        cfg = copy.deepcopy(cfg)
        cfg.model = ckpt_cfg.model  # the weights decide the architecture (image_token_id from the tokenizer)
        with torch.no_grad():
            return evaluate(model.eval(), tokenizer, cfg, list(cfg.eval.tasks), list(cfg.eval.shots))


class SubprocessRunner:
    """Runs each stage as the command a user would type (`mm1 train`, `mm1 eval`), e.g. via torchrun."""

    def __init__(self, launcher: str = "", eval_launcher: str = "") -> None:
        default = [sys.executable, "-m", "mm1"]
        self.launcher = shlex.split(launcher) if launcher else default
        self.eval_launcher = shlex.split(eval_launcher) if eval_launcher else default

    def train(self, cfg: Config, config_path: Path, out: Path, resume: bool) -> None:
        _check_call(train_command(config_path, out, resume, self.launcher))

    def evaluate(self, run_dir: Path, cfg: Config, config_path: Path) -> list[dict]:
        out_dir = run_dir.parent / f"eval-{run_dir.name}"
        _check_call(eval_command(run_dir, config_path, out_dir, self.eval_launcher))
        return read_eval_dir(out_dir)


def read_eval_dir(out_dir: Path) -> list[dict]:
    """The results `mm1 eval --json DIR` wrote (one JSON per task x shots)."""
    files = sorted(Path(out_dir).glob("*shot.json"))
    if not files:
        raise FileNotFoundError(f"{out_dir}: no *_Nshot.json results; did `mm1 eval` run to the end?")
    return [json.loads(f.read_text()) for f in files]


def train_command(config_path: Path, out: Path, resume: bool = False, launcher: list[str] | None = None) -> list[str]:
    cmd = list(launcher or ["mm1"]) + ["train", str(config_path), "--out", str(out)]
    return cmd + (["--resume"] if resume else [])


def eval_command(run_dir: Path, config_path: Path, out_dir: Path, launcher: list[str] | None = None) -> list[str]:
    return list(launcher or ["mm1"]) + ["eval", str(config_path), "--checkpoint", str(run_dir), "--json", str(out_dir)]


def _check_call(cmd: list[str]) -> None:
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` exited with status {proc.returncode}; its output is above")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write-then-rename, so a killed process never leaves a half-written marker behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _checkpoint_steps(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in ckpts.iterdir() if re.fullmatch(r"step-\d+", p.name))


def _external_eval(out_dir: Path, cfg: Config) -> list[dict] | None:
    """Results a `commands.sh` line (`mm1 eval --json DIR`) already wrote, if it covered every task x shots."""
    if not out_dir.is_dir():
        return None
    res = read_eval_dir(out_dir) if any(out_dir.glob("*shot.json")) else []
    have = {(r.get("task"), r.get("shots")) for r in res}
    want = {(t, k) for t in cfg.eval.tasks for k in cfg.eval.shots}
    return res if want <= have else None


def stage_configs(point: Point, pdir: Path) -> dict[str, Config]:
    """Each stage's config with `train.init_from` chained to the previous stage's run dir."""
    out, prev = {}, None
    for stage in point.stages:
        cfg = copy.deepcopy(point.configs[stage])
        if prev is not None:
            cfg.train.init_from = str(prev)
        out[stage] = cfg
        prev = pdir / stage
    return out


def write_stage_configs(point: Point, pdir: Path) -> dict[str, Path]:
    pdir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stage, cfg in stage_configs(point, pdir).items():
        paths[stage] = pdir / f"{stage}.yaml"
        # the same YAML as mm1.config.to_yaml, without OmegaConf's (slow) round trip
        paths[stage].write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return paths


_BULKY = {"predictions", "shuffled_predictions", "config"}  # kept in eval-STAGE.json for audits, left out of done.json / summaries


class SpecChanged(RuntimeError):
    pass


class NotFinished(RuntimeError):
    pass


class CollectOnlyRunner:
    """For `--report-only`: finalises points whose stages and evaluations finished elsewhere (e.g.
    the `commands.sh` jobs on a cluster) and never trains, evaluates or deletes anything."""

    collect_only = True

    def train(self, cfg: Config, config_path: Path, out: Path, resume: bool) -> None:
        raise NotFinished(f"{out}: not trained")

    def evaluate(self, run_dir: Path, cfg: Config, config_path: Path) -> list[dict]:
        raise NotFinished(f"{run_dir}: not evaluated")


def collect_finished(points: list[Point], sweep_dir: Path, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Records of every point that has finished (here or elsewhere); unfinished points are listed, not run."""
    records = {}
    for p in unique_runs(points):
        try:
            records[p.run] = run_point(p, sweep_dir / "points" / p.run, CollectOnlyRunner(), log=lambda s: None)
        except NotFinished as e:
            log(f"  not finished: {p.run} ({e})")
    return records


def run_point(point: Point, pdir: Path, runner: Runner, log: Callable[[str], None] = print) -> dict:
    """Run (or finish) one point; return its `done.json` record. Finished stages are not redone."""
    done_path = pdir / "done.json"
    if done_path.is_file():
        done = json.loads(done_path.read_text())
        if done.get("fingerprint") != point.fingerprint:
            raise SpecChanged(f"{pdir} was finished with a different config (fingerprint {done.get('fingerprint')} "
                              f"!= {point.fingerprint}); the spec or a preset changed since. Delete {pdir} to rerun "
                              "it, or pass another --out")
        return done
    paths = write_stage_configs(point, pdir)
    cfgs = stage_configs(point, pdir)
    stage_seconds: dict[str, float] = {}
    results: list[dict] = []
    for stage in point.stages:
        marker, sdir = pdir / f"{stage}.done.json", pdir / stage
        steps = _checkpoint_steps(sdir)
        if not marker.is_file() and steps and steps[-1] >= cfgs[stage].train.steps:  # trained by a cluster job
            write_json_atomic(marker, {"seconds": 0.0, "resumed": False, "external": True})
        if not marker.is_file():
            if getattr(runner, "collect_only", False):
                raise NotFinished(f"{sdir}: stage {stage} has not finished training")
            resume = bool(steps)
            if sdir.exists() and not resume:  # killed before its first checkpoint: nothing to keep
                shutil.rmtree(sdir)
            log(f"  {point.run}: {'resuming' if resume else 'training'} stage {stage}")
            t0 = time.perf_counter()
            runner.train(cfgs[stage], paths[stage], sdir, resume)
            write_json_atomic(marker, {"seconds": time.perf_counter() - t0, "resumed": resume})
        stage_seconds[stage] = float(json.loads(marker.read_text())["seconds"])
        if stage in point.eval_after:
            ej = pdir / f"eval-{stage}.json"
            external = None if ej.is_file() else _external_eval(pdir / f"eval-{stage}", cfgs[stage])
            if external is not None:
                write_json_atomic(ej, {"seconds": 0.0, "results": external, "external": True})
            if not ej.is_file() and getattr(runner, "collect_only", False):
                raise NotFinished(f"{pdir / f'eval-{stage}'}: no complete evaluation results")
            if not ej.is_file():
                log(f"  {point.run}: evaluating {stage} ({', '.join(cfgs[stage].eval.tasks)}; "
                    f"shots {list(cfgs[stage].eval.shots)})")
                t0 = time.perf_counter()
                res = runner.evaluate(sdir, cfgs[stage], paths[stage])
                write_json_atomic(ej, {"seconds": time.perf_counter() - t0, "results": res})
            ev = json.loads(ej.read_text())
            stage_seconds[f"eval-{stage}"] = float(ev["seconds"])
            results += [{k: v for k, v in r.items() if k not in _BULKY} | {"stage": stage} for r in ev["results"]]
    done = {"run": point.run, "fingerprint": point.fingerprint, "stages": point.stages,
            "seconds": stage_seconds, "results": results, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json_atomic(done_path, done)
    return done


def write_commands(points: list[Point], sweep_dir: Path) -> Path:
    """`commands.sh`: every stage of every distinct point as the `mm1` command that runs it."""
    lines = ["#!/bin/sh", "# One line per stage; run a point's lines in order. Replace `mm1 train` by",
             "# `torchrun --nproc_per_node 8 -m mm1 train` on a GPU node, then rerun the same mm1 command for the report.",
             "set -e"]
    for p in unique_runs(points):
        pdir = sweep_dir / "points" / p.run
        paths = write_stage_configs(p, pdir)
        lines.append(f"# {p.run}: " + ", ".join(f"{k}={v}" for k, v in p.labels.items()) + f", seed {p.seed}")
        for stage in p.stages:
            lines.append(shlex.join(train_command(paths[stage], pdir / stage)))
            if stage in p.eval_after:
                lines.append(shlex.join(eval_command(pdir / stage, paths[stage], pdir / f"eval-{stage}")))
    path = sweep_dir / "commands.sh"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_sweep(points: list[Point], sweep_dir: Path, runner: Runner, keep_going: bool = False,
              log: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every distinct point in order, skipping finished ones; returns run name -> done record.

    With `keep_going`, a failing point is logged (and listed in the report) instead of stopping the sweep."""
    runs = unique_runs(points)
    records: dict[str, dict] = {}
    for i, p in enumerate(runs, 1):
        pdir = sweep_dir / "points" / p.run
        state = "done, skipped" if (pdir / "done.json").is_file() else "running"
        log(f"[{i}/{len(runs)}] {p.run} ({state})")
        try:
            records[p.run] = run_point(p, pdir, runner, log)
        except (SpecChanged, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - reported per point when keep_going
            if not keep_going:
                raise
            log(f"  {p.run} FAILED: {type(e).__name__}: {e}")
            records[p.run] = {"run": p.run, "failed": f"{type(e).__name__}: {e}"}
    return records

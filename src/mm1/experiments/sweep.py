"""Running the points of an ablation, resumably: each point is an ordinary `train` + `evaluate`.

Layout of a sweep directory::

    SWEEP/sweep.json                     the spec and every point (axis labels, seed, run)
    SWEEP/stages/STAGE-KEY/              a stage's run dir (config.yaml, metrics.jsonl, checkpoints/)
    SWEEP/stages/STAGE-KEY.yaml          its exact resolved config (init_from = the previous stage's dir)
    SWEEP/stages/STAGE-KEY.done.json     written when that stage's training finished
    SWEEP/points/RUN/STAGE.yaml          the stage config as this point evaluates it (its eval settings)
    SWEEP/points/RUN/eval-STAGE.json     evaluation results of that stage's final checkpoint
    SWEEP/points/RUN/done.json           written atomically, last: the point is finished
    SWEEP/commands.sh                    the same stages and evaluations as shell commands (see below)
    SWEEP/report.md, summary.json, plots/

Stages are shared between points: KEY is a hash of what determines the stage's training (its
resolved config without the evaluation settings, see `stage_view`) and of the KEY of the stage it
starts from, so e.g. the encoder pre-training of a (encoder config, seed) is trained once and every
point whose pre-training starts from it reuses it. A sweep that is killed and rerun skips every
point with a `done.json` and every stage with a `.done.json`, and resumes a half-trained stage from
its latest checkpoint.

On a cluster: `mm1 ablate SPEC --dry-run --out SWEEP` writes every stage config and `commands.sh`
(one `mm1 train` line per distinct stage, one `mm1 eval` line per evaluated point, the same
thing this module runs). Launch each line as its own job, replacing `mm1` by
`torchrun --nnodes N --nproc_per_node 8 -m mm1` for training
(a stage only starts after the stage it is initialised from, which comes earlier in the file).
Once the jobs are done, `mm1 ablate SPEC --out SWEEP` recognises the finished stages (a checkpoint
at `train.steps`) and evaluations (`points/RUN/eval-STAGE/*.json`), runs whatever is missing and
writes the `done.json` markers and the report. Alternatively let `mm1 ablate` drive everything
from one node: `--launcher "torchrun --nproc_per_node 8 -m mm1"` runs every stage that way.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

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


def stage_view(stage: str, cfg: Config) -> dict[str, Any]:
    """What determines a stage's training: its resolved config less what it never reads.

    Evaluation settings never change training, and `train.init_from` is replaced by the key of the
    stage it names. The encoder stage reads neither the LM nor the connector (only the slot count per
    image, which lays out its caption batches) and only the caption sources, whose weights matter
    relative to each other. Anything else stays, so two stages with one view train the same weights
    (`tests/test_experiments_stages.py` checks this with the real trainer)."""
    view = dataclasses.asdict(cfg)
    view.pop("eval")
    view["train"].pop("init_from")
    if stage == "encoder":
        model = view["model"]
        del model["lm"], model["connector"]
        model["tokens_per_image"] = cfg.model.tokens_per_image
        caption = {k: src for k, src in view["data"]["sources"].items() if src["kind"] == "caption"}
        total = sum(src["weight"] for src in caption.values()) or 1.0
        for src in caption.values():
            src["weight"] = src["weight"] / total
        view["data"]["sources"] = caption
    return view


def stage_keys(point: Point) -> dict[str, str]:
    """Stage -> `STAGE-HASH`: the hash of its view and of the key of the stage it starts from."""
    keys: dict[str, str] = {}
    prev = ""
    for stage in point.stages:
        blob = json.dumps(
            {"stage": stage, "from": prev, "config": stage_view(stage, point.configs[stage])},
            sort_keys=True,
            default=str,
        )
        prev = keys[stage] = f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    return keys


def stage_dir(point: Point, sweep_dir: Path, stage: str) -> Path:
    """The run dir that holds `stage` of `point` (shared with every point whose stage has the same key)."""
    return Path(sweep_dir) / "stages" / stage_keys(point)[stage]


def stage_configs(point: Point, sweep_dir: Path) -> dict[str, Config]:
    """Each stage's config with `train.init_from` chained to the previous stage's (shared) run dir."""
    out, prev = {}, None
    keys = stage_keys(point)
    for stage in point.stages:
        cfg = copy.deepcopy(point.configs[stage])
        if prev is not None:
            cfg.train.init_from = str(prev)
        out[stage] = cfg
        prev = Path(sweep_dir) / "stages" / keys[stage]
    return out


def _dump(cfg: Config, path: Path) -> None:
    # the same YAML as mm1.config.to_yaml, without OmegaConf's (slow) round trip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def write_stage_configs(point: Point, sweep_dir: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(stage -> the shared stage's YAML, used to train it; stage -> this point's YAML, used to evaluate it).

    A shared stage's YAML is written once and never rewritten (a job may be reading it); the copy under
    the point differs only in its evaluation settings."""
    sweep_dir, keys = Path(sweep_dir), stage_keys(point)
    pdir = sweep_dir / "points" / point.run
    shared, own = {}, {}
    for stage, cfg in stage_configs(point, sweep_dir).items():
        shared[stage] = sweep_dir / "stages" / f"{keys[stage]}.yaml"
        if not shared[stage].is_file():
            _dump(cfg, shared[stage])
        own[stage] = pdir / f"{stage}.yaml"
        _dump(cfg, own[stage])
    return shared, own


def compute_seconds(records: dict[str, dict]) -> float:
    """Training (each shared stage once) plus evaluation seconds of a sweep's finished points."""
    stages: dict[str, float] = {}
    evals = 0.0
    for rec in records.values():
        dirs = rec.get("stage_dirs", {})
        for key, sec in rec.get("seconds", {}).items():
            if key.startswith("eval-"):
                evals += sec
            else:
                stages[dirs.get(key, f"{rec.get('run')}/{key}")] = sec
    return sum(stages.values()) + evals


_BULKY = {
    "predictions",
    "shuffled_predictions",
    "config",
}  # kept in eval-STAGE.json for audits, left out of done.json / summaries


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
            records[p.run] = run_point(p, sweep_dir, CollectOnlyRunner(), log=lambda s: None)
        except NotFinished as e:
            log(f"  not finished: {p.run} ({e})")
    return records


def run_point(point: Point, sweep_dir: Path, runner: Runner, log: Callable[[str], None] = print) -> dict:
    """Run (or finish) one point; return its `done.json` record. Finished stages (its own or another
    point's with the same key) are not redone."""
    sweep_dir = Path(sweep_dir)
    pdir = sweep_dir / "points" / point.run
    done_path = pdir / "done.json"
    if done_path.is_file():
        done = json.loads(done_path.read_text())
        if done.get("fingerprint") != point.fingerprint:
            raise SpecChanged(
                f"{pdir} was finished with a different config (fingerprint {done.get('fingerprint')} "
                f"!= {point.fingerprint}); the spec or a preset changed since. Delete {pdir} to rerun "
                "it, or pass another --out"
            )
        return done
    shared, own = write_stage_configs(point, sweep_dir)
    cfgs = stage_configs(point, sweep_dir)
    dirs = {stage: stage_dir(point, sweep_dir, stage) for stage in point.stages}
    stage_seconds: dict[str, float] = {}
    results: list[dict] = []
    for stage in point.stages:
        sdir = dirs[stage]
        marker = sdir.with_name(f"{sdir.name}.done.json")
        steps = _checkpoint_steps(sdir)
        if not marker.is_file() and steps and steps[-1] >= cfgs[stage].train.steps:  # trained by a cluster job
            write_json_atomic(marker, {"seconds": 0.0, "resumed": False, "external": True})
        if not marker.is_file():
            if getattr(runner, "collect_only", False):
                raise NotFinished(f"{sdir}: stage {stage} has not finished training")
            resume = bool(steps)
            if sdir.exists() and not resume:  # killed before its first checkpoint: nothing to keep
                shutil.rmtree(sdir)
            log(f"  {point.run}: {'resuming' if resume else 'training'} stage {sdir.name}")
            t0 = time.perf_counter()
            runner.train(cfgs[stage], shared[stage], sdir, resume)
            write_json_atomic(marker, {"seconds": time.perf_counter() - t0, "resumed": resume, "by": point.run})
        else:
            log(f"  {point.run}: stage {sdir.name} already trained, reused")
        stage_seconds[stage] = float(json.loads(marker.read_text())["seconds"])
        if stage in point.eval_after:
            ej = pdir / f"eval-{stage}.json"
            external = None if ej.is_file() else _external_eval(pdir / f"eval-{stage}", cfgs[stage])
            if external is not None:
                write_json_atomic(ej, {"seconds": 0.0, "results": external, "external": True})
            if not ej.is_file() and getattr(runner, "collect_only", False):
                raise NotFinished(f"{pdir / f'eval-{stage}'}: no complete evaluation results")
            if not ej.is_file():
                log(
                    f"  {point.run}: evaluating {stage} ({', '.join(cfgs[stage].eval.tasks)}; "
                    f"shots {list(cfgs[stage].eval.shots)})"
                )
                t0 = time.perf_counter()
                res = runner.evaluate(sdir, cfgs[stage], own[stage])
                write_json_atomic(ej, {"seconds": time.perf_counter() - t0, "results": res})
            ev = json.loads(ej.read_text())
            stage_seconds[f"eval-{stage}"] = float(ev["seconds"])
            results += [{k: v for k, v in r.items() if k not in _BULKY} | {"stage": stage} for r in ev["results"]]
    done = {
        "run": point.run,
        "fingerprint": point.fingerprint,
        "stages": point.stages,
        "stage_dirs": {s: str(d.relative_to(sweep_dir)) for s, d in dirs.items()},
        "seconds": stage_seconds,
        "results": results,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json_atomic(done_path, done)
    return done


def plan(points: list[Point]) -> list[str]:
    """What a sweep will run, for `--dry-run`: distinct stages and training steps per stage kind, and
    the evaluations (generation calls = items x shots per task), so its cost can be estimated."""
    stages: dict[str, dict[str, int]] = {}
    evals = items = 0
    for p in unique_runs(points):
        for stage, key in stage_keys(p).items():
            stages.setdefault(stage, {})[key] = p.configs[stage].train.steps
        for stage in p.eval_after:
            ev = p.configs[stage].eval
            evals += 1
            items += len(ev.tasks) * len(ev.shots) * (ev.limit or 0)
    lines = [
        f"{stage}: {len(keys)} distinct stages, {sum(keys.values())} training steps "
        f"(used by {sum(1 for q in unique_runs(points) if stage in q.stages)} runs)"
        for stage, keys in stages.items()
    ]
    return lines + [f"evaluations: {evals} (about {items} task x shots x item queries)"]


def write_commands(points: list[Point], sweep_dir: Path) -> Path:
    """`commands.sh`: every distinct stage once, then each point's evaluation, as the `mm1` commands.

    A stage's line comes before the lines of every stage initialised from it."""
    sweep_dir = Path(sweep_dir)
    runs = unique_runs(points)
    users: dict[str, list[str]] = {}
    for p in runs:
        for key in stage_keys(p).values():
            users.setdefault(key, []).append(p.run)
    lines = [
        "#!/bin/sh",
        "# One `mm1 train` line per distinct stage (shared stages appear once, before the stages",
        "# that start from them), one `mm1 eval` line per evaluated point. Replace `mm1 train` by",
        "# `torchrun --nproc_per_node 8 -m mm1 train` on a GPU node, then rerun the same mm1 command for the report.",
        "set -e",
    ]
    written: set[str] = set()
    for p in runs:
        shared, own = write_stage_configs(p, sweep_dir)
        keys = stage_keys(p)
        lines.append(f"# {p.run}: " + ", ".join(f"{k}={v}" for k, v in p.labels.items()) + f", seed {p.seed}")
        for stage in p.stages:
            sdir = sweep_dir / "stages" / keys[stage]
            if keys[stage] not in written:
                written.add(keys[stage])
                n = len(users[keys[stage]])
                if n > 1:
                    lines.append(f"#   {keys[stage]} is shared by {n} points")
                lines.append(shlex.join(train_command(shared[stage], sdir)))
            if stage in p.eval_after:
                out_dir = sweep_dir / "points" / p.run / f"eval-{stage}"
                lines.append(shlex.join(eval_command(sdir, own[stage], out_dir)))
    path = sweep_dir / "commands.sh"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_sweep(
    points: list[Point], sweep_dir: Path, runner: Runner, keep_going: bool = False, log: Callable[[str], None] = print
) -> dict[str, dict]:
    """Run every distinct point in order, skipping finished ones; returns run name -> done record.

    With `keep_going`, a failing point is logged (and listed in the report) instead of stopping the sweep."""
    runs = unique_runs(points)
    records: dict[str, dict] = {}
    for i, p in enumerate(runs, 1):
        pdir = sweep_dir / "points" / p.run
        state = "done, skipped" if (pdir / "done.json").is_file() else "running"
        log(f"[{i}/{len(runs)}] {p.run} ({state})")
        try:
            records[p.run] = run_point(p, sweep_dir, runner, log)
        except (SpecChanged, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - reported per point when keep_going
            if not keep_going:
                raise
            log(f"  {p.run} FAILED: {type(e).__name__}: {e}")
            records[p.run] = {"run": p.run, "failed": f"{type(e).__name__}: {e}"}
    return records

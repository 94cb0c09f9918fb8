"""`mm1 ablate`, `mm1 lessons` and `mm1 hparams`: the experiment commands.

    mm1 ablate configs/ablations/example.yaml --out runs/ablate/example      # run + report (resumable)
    mm1 ablate SPEC --dry-run --out DIR     # write every point's configs + commands.sh for a cluster
    mm1 lessons --budget tiny               # MM1's ablations on the synthetic world, one report
    mm1 hparams --budget tiny               # LR grid on a few LM sizes, fit of the LR law

The CLI registers this module three times; `add_arguments` / `run` tell the commands apart by name.
Each point runs in this process by default; `--subprocess` runs every stage as `python -m mm1 train`
/ `mm1 eval` (what a user would type) and `--launcher "torchrun --nproc_per_node 8 -m mm1"` swaps in
any launcher. Rerunning a command with the same --out continues where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mm1.config import load_config, preset_path


def _name(parser: argparse.ArgumentParser) -> str:
    return parser.prog.split()[-1]


def _runner_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--subprocess", action="store_true", help="run each stage as `python -m mm1 train/eval` in a child process"
    )
    parser.add_argument(
        "--launcher",
        default="",
        help='command that replaces `mm1` for training stages, e.g. "torchrun --nproc_per_node 8 -m mm1"',
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="log a failing point and go on with the others (the report lists failures)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    name = _name(parser)
    if name == "ablate":
        parser.add_argument("spec", help="ablation spec YAML (see configs/ablations/example.yaml)")
        parser.add_argument("--out", type=Path, help="sweep directory (default runs/ablate/<spec name>)")
        parser.add_argument(
            "--dry-run", action="store_true", help="list the points, write their configs and commands.sh, run nothing"
        )
        parser.add_argument(
            "--report-only",
            action="store_true",
            help="write report.md from the points finished so far (here or by commands.sh jobs); "
            "run, evaluate and delete nothing",
        )
    elif name == "lessons":
        parser.add_argument(
            "--budget", choices=["tiny", "small"], default="tiny", help="tiny: < 30 min on 2 CPU cores; small: < 90 min"
        )
        parser.add_argument("--out", type=Path, help="output directory (default runs/lessons-<budget>)")
        parser.add_argument("--only", help="comma-separated lesson names (files in configs/lessons/)")
        parser.add_argument("--dry-run", action="store_true", help="write configs and commands.sh, run nothing")
    else:
        parser.add_argument(
            "--budget",
            choices=["tiny", "small"],
            default="tiny",
            help="the grid configs/hparams/budget-<budget>.yaml (an ablation spec): tiny takes a "
            "few minutes on 2 CPU cores; small has more sizes, LRs, seeds",
        )
        parser.add_argument("--base", default="", help="base preset name or YAML (default: the budget's, tiny)")
        parser.add_argument("--out", type=Path, help="output directory (default runs/hparams-<budget>)")
    _runner_args(parser)


def _runner(args: argparse.Namespace):
    from mm1.experiments.sweep import InProcessRunner, SubprocessRunner

    if args.subprocess or args.launcher:
        return SubprocessRunner(args.launcher)
    return InProcessRunner()


def _ablate(args: argparse.Namespace) -> int:
    from mm1.experiments.ablate import expand, load_spec, unique_runs
    from mm1.experiments.results import build_summary, run_ablation, write_sweep_report
    from mm1.experiments.sweep import collect_finished, plan, write_commands

    spec = load_spec(args.spec)
    out = args.out or Path("runs") / "ablate" / spec.name
    points = expand(spec)
    runs = unique_runs(points)
    print(f"mm1 ablate: {spec.name}: {len(points)} points, {len(runs)} distinct runs -> {out}", file=sys.stderr)
    if args.dry_run:
        for p in points:
            shared = "" if p.run == p.name else f"  (same config as {p.run})"
            print(f"  {p.name}: stages {'+'.join(p.stages)}{shared}")
        out.mkdir(parents=True, exist_ok=True)
        for line in plan(points):
            print(f"  {line}")
        print(f"configs and commands: {write_commands(points, out)}")
        return 0
    if args.report_only:
        records = collect_finished(points, out, log=lambda s: print(s, file=sys.stderr))
        print(f"{len(records)}/{len(runs)} runs finished", file=sys.stderr)
        report = write_sweep_report(spec, points, build_summary(spec, points, records, out, 0.0), out)
    else:
        report = run_ablation(
            spec, out, _runner(args), keep_going=args.keep_going, points=points, log=lambda s: print(s, file=sys.stderr)
        )
    print(f"report: {report}")
    return 0


def _lessons(args: argparse.Namespace) -> int:
    from mm1.experiments.lessons_report import run_lessons

    out = args.out or Path("runs") / f"lessons-{args.budget}"
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    report = run_lessons(
        args.budget,
        out,
        _runner(args),
        only=only,
        keep_going=args.keep_going,
        log=lambda s: print(s, file=sys.stderr),
        dry_run=args.dry_run,
    )
    print(f"report: {report}")
    return 0


def _hparams(args: argparse.Namespace) -> int:
    from mm1.experiments.scaling import run_hparams

    base = str(preset_path(args.base)) if args.base else ""
    if base:
        load_config(base)  # fail early on a bad preset
    out = args.out or Path("runs") / f"hparams-{args.budget}"
    report = run_hparams(
        args.budget, out, _runner(args), base, keep_going=args.keep_going, log=lambda s: print(s, file=sys.stderr)
    )
    print(f"report: {report}")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"ablate": _ablate, "lessons": _lessons, "hparams": _hparams}[args.command](args)

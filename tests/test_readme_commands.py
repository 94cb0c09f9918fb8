"""Every `mm1` command in the README's bash blocks parses and loads its config; the cheap ones run
for real, in README order, on a tiny run.

Each command is parsed exactly as written (argparse + config / ablation spec / task spec load). It
then runs in a scratch folder laid out like a checkout (`configs/`, `data/world-tiny`) when it is
one of the cheap kinds: `info`, `train` (with tiny-run overrides appended: 2 steps, a 1-layer model),
`eval` and `generate` on a run an earlier command trained (with a small `eval.limit`), `export` of such
a run and `eval --hf` on its export, `ablate` and
`lessons` with `--dry-run`. Anything else (building a small world, `hparams`, torchrun and
paper-sized presets, commands on folders no earlier command made) is only parsed; the test prints
which commands ran and which were only parsed (`pytest -s`).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from mm1.cli import main, parse_args
from mm1.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "train.steps=2",
    "train.save_every=2",
    "train.warmup_steps=1",
    "data.batch_size=2",
    "model.lm.n_layers=1",
    "model.vision.depth=1",
]
CHEAP_EVAL = ["eval.limit=2", "eval.max_new_tokens=2"]


def readme_commands(text: str) -> list[tuple[list[str], bool]]:
    """(argv after `mm1`, launched by torchrun?) of each mm1 command in ```bash blocks, continuation
    lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            launched = "-m" in words and words[words.index("-m") + 1 : words.index("-m") + 2] == ["mm1"]
            if launched:
                words = words[words.index("-m") + 1 :]  # torchrun ... -m mm1 ARGS
            if words and words[0] == "mm1":
                out.append((words[1:], launched))
    return out


def check_parses(argv: list[str]) -> None:
    """argparse accepts the line and every config, spec and override it names loads."""
    from mm1.eval.tasks import load_spec as load_task_spec
    from mm1.experiments.ablate import load_spec as load_ablation

    args = parse_args(argv)
    if getattr(args, "config", None):
        load_config(args.config, args.overrides)
    elif args.overrides:
        load_config(overrides=args.overrides)
    if args.command == "ablate":
        load_ablation(args.spec)
    for task in (getattr(args, "tasks", None) or "").split(","):
        if task.endswith((".yaml", ".json")) and Path(task).is_file():
            load_task_spec(task)


def runnable(argv: list[str]) -> list[str] | None:
    """The command with tiny-run settings appended, or None when it is only parsed."""
    command = argv[0]
    if command == "info":
        return argv
    if command == "train":  # the tiny preset only: the paper-sized ones are for clusters
        return argv + TINY_RUN if argv[1] in ("tiny", "configs/tiny.yaml") else None
    if command == "export":  # a run an earlier command trained
        return argv if Path(argv[1], "checkpoints").is_dir() else None
    if command in ("eval", "generate"):
        ckpt = argv[argv.index("--checkpoint") + 1] if "--checkpoint" in argv else ""
        if ckpt and Path(ckpt, "config.yaml").is_file():
            return argv + (CHEAP_EVAL if command == "eval" else ["--max-new-tokens", "2"])
        hf = argv[argv.index("--hf") + 1] if "--hf" in argv else ""  # a folder an earlier export wrote
        if hf and Path(hf, "config.json").is_file():
            return argv + CHEAP_EVAL
        return None
    if command in ("ablate", "lessons"):
        return argv + ["--dry-run", "--out", "runs/dry-" + command]
    return None


@pytest.fixture()
def checkout(tmp_path, tiny_world, monkeypatch):
    """A scratch folder laid out like a checkout, with the files the README's commands refer to."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "world-tiny").symlink_to(tiny_world)
    Image.new("RGB", (32, 32), "red").save(tmp_path / "x.png")
    ev = tiny_world / "eval"
    (tmp_path / "my_coco.yaml").write_text(
        json.dumps(
            {  # the README's "real dataset from a task spec"
                "kind": "caption",
                "test": str(ev / "caption_test.json"),
                "train": str(ev / "caption_train.json"),
                "image_root": str(ev),
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_every_readme_command_parses_and_the_cheap_ones_run(checkout, capsys):
    commands = readme_commands((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(commands) >= 15, "the README's bash blocks should hold the command reference"
    ran, parsed = [], []
    for argv, via_torchrun in commands:
        check_parses(argv)
        run = None if via_torchrun else runnable(argv)
        if run is None:
            parsed.append(argv)
            continue
        assert main(run) == 0, f"README command failed: mm1 {shlex.join(argv)}\n{capsys.readouterr().err[-2000:]}"
        if argv[0] == "eval":  # MM1's summary line closes every evaluation
            assert "tasks (MM1-style): 0-shot" in capsys.readouterr().out
        ran.append(argv)
    names = {a[0] for a in ran}
    assert {"info", "train", "eval", "generate", "ablate"} <= names, names
    assert any("eval.chat=true" in a for a in ran)  # the example that used to take the override for CONFIG
    print("ran:", *("mm1 " + shlex.join(a) for a in ran), sep="\n  ")
    print("parsed only:", *("mm1 " + shlex.join(a) for a in parsed), sep="\n  ")

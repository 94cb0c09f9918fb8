"""CLI conventions: dotted overrides anywhere on the line, presets by name, presets in the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mm1.cli import main, parse_args
from mm1.config import PRESETS_DIR, load_config, preset_path
from mm1.registry import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "tiny", "train.steps=3", "--out", "r", "train.seed=2"],
        ["train", "train.steps=3", "--out", "r", "tiny", "train.seed=2"],
        ["train", "--out", "r", "train.steps=3", "tiny", "train.seed=2", "--resume"],
    ],
)
def test_train_overrides_stand_anywhere_on_the_line(argv):
    args = parse_args(argv)
    assert args.config == "tiny" and args.out == "r"
    assert args.overrides == ["train.steps=3", "train.seed=2"]


def test_eval_with_checkpoint_never_takes_an_override_for_the_config():
    # the README's own example: the override follows options and there is no CONFIG
    args = parse_args(["eval", "--checkpoint", "runs/sft", "--tasks", "my_coco.yaml", "--shots", "0", "eval.chat=true"])
    assert args.config is None and args.overrides == ["eval.chat=true"] and args.tasks == "my_coco.yaml"
    args = parse_args(["eval", "tiny", "--checkpoint", "x", "eval.chat=true", "--limit", "3", "eval.trials=2"])
    assert args.config == "tiny" and args.overrides == ["eval.chat=true", "eval.trials=2"] and args.limit == 3


def test_an_option_value_that_looks_like_an_override_stays_the_value():
    args = parse_args(["generate", "--checkpoint", "c", "--prompt", "x.y=1", "eval.add_bos=true"])
    assert args.prompt == "x.y=1" and args.overrides == ["eval.add_bos=true"]


def test_a_command_without_config_refuses_overrides_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["world", "out", "data.world_preset=small"])
    assert e.value.code == 2
    assert "mm1 world takes no config overrides, got data.world_preset=small" in capsys.readouterr().err


def test_info_takes_a_preset_name_and_overrides_after_options(capsys):
    assert main(["info", "--json", "tiny", "model.connector.num_tokens=4"]) == 0
    assert '"image_tokens_per_image": 4' in capsys.readouterr().out


def test_presets_are_found_by_name_or_path_and_an_unknown_name_lists_the_known_ones():
    assert preset_path("tiny") == PRESETS_DIR / "tiny.yaml"
    assert load_config("mm1-3b-moe") == load_config(REPO / "configs" / "mm1-3b-moe.yaml")
    with pytest.raises(ConfigError, match="preset 'tinyy'.*known presets: .*mm1-3b, .*tiny"):
        load_config("tinyy")


def test_checkpoint_config_takes_overrides_and_checks_them():
    base = load_config("tiny")
    assert load_config(overrides=["eval.chat=true"], base=base).eval.chat is True
    assert base.eval.chat is False  # the checkpoint's config is not changed in place
    with pytest.raises(ConfigError, match="eval.shots"):
        load_config(overrides=["eval.shots=[-1]"], base=base)


@pytest.mark.slow
def test_a_plain_pip_install_into_a_fresh_venv_ships_the_presets(tmp_path):
    """`pip install .` (a wheel, not editable) into a new venv: `mm1 info tiny` works from any folder."""
    src = tmp_path / "src"
    for part in ("src", "configs"):
        shutil.copytree(
            REPO / part, src / part, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, src / part)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        pip + ["wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
        check=True,
        timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("mm1-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    assert {f"mm1/configs/{n}" for n in shipped} <= names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run(pip + ["--python", str(py), "install", "--no-deps", str(wheel)], check=True, timeout=300)
    # dependencies come from this interpreter's site-packages (a PYTHONPATH entry: its editable .pth is not read)
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    env = {**os.environ, "PYTHONPATH": deps, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [str(py), "-c", "import mm1.config as c; print(c.PRESETS_DIR)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    assert out.startswith(str(venv)), out
    info = subprocess.run(
        [str(py), "-m", "mm1", "info", "tiny", "--json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert info.returncode == 0, info.stderr
    assert '"name": "tiny"' in info.stdout
    # the lessons' specs and budget files are package data too: a lesson plans from the installed copy
    lessons = subprocess.run(
        [
            str(py),
            "-m",
            "mm1",
            "lessons",
            "--budget",
            "tiny",
            "--only",
            "encoder-size",
            "--dry-run",
            "--out",
            str(tmp_path / "lessons"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert lessons.returncode == 0, lessons.stderr
    assert "mm1 train" in (tmp_path / "lessons" / "commands.sh").read_text()

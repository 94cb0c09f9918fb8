"""Hostile and clumsy input, built for real: each case is something a downloaded shard, a shared
config or run dir, or a slip of the keyboard did to mm1 before (issue 12). Each test asserts the one
line mm1 now says (or the counted skip) and that nothing ran, was read outside the data, was lost
silently, or was written where it should not be."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from mm1.cli import main
from mm1.train.metrics import read_metrics

TINY = ["model.lm.n_layers=1", "model.vision.depth=1", "data.seq_len=96", "data.batch_size=1",
        "train.warmup_steps=1", "data.sources.interleaved.weight=0", "data.sources.text.weight=0"]


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """Exit code and the error line of `mm1 ARGV` run in this process: one line, no traceback."""
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"mm1 {argv[0]}: ")]
    assert "Traceback" not in err and (code == 0 or len(lines) == 1), err
    return code, lines[-1] if lines else ""


def train_args(world: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "configs/tiny.yaml", f"data.world={world}", *TINY, *extra, "--out", str(out)]


@pytest.fixture(scope="module")
def run2(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step run with a checkpoint at each step (copied by tests that damage it)."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    assert main(train_args(tiny_world, out, "train.steps=2", "train.save_every=1", "train.keep_last=0")) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ----------------------------------------------------------------------------- configs


def test_an_environment_secret_is_never_resolved_into_a_config(tiny_world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MM1_TEST_SECRET", "hunter2")
    out = tmp_path / "run"
    code, line = cli(capsys, *train_args(tiny_world, out, "name=${oc.env:MM1_TEST_SECRET}"))
    assert code == 2 and line.startswith("mm1 train: config error: name='${oc.env:MM1_TEST_SECRET}'")
    assert "resolver interpolations" in line and "hunter2" not in line
    preset = tmp_path / "shared.yaml"
    preset.write_text("base: " + str(Path("configs/tiny.yaml").resolve()) + "\nname: ${oc.env:MM1_TEST_SECRET}\n")
    code, line = cli(capsys, "train", str(preset), f"data.world={tiny_world}", "--out", str(out))
    assert code == 2 and "resolver interpolations" in line and f"in {preset}" in line
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize("override,expected", [
    ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
    ("data.batch_size=-1", "data.batch_size=-1: must be >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
    ("data.max_images=0", "data.max_images=0: must be >= 1"),
    ("train.lr=-0.1", "train.lr=-0.1: must be > 0"),
    ("train.betas=[0.9,1.5]", "train.betas[1]=1.5: must be in [0.0, 1.0)"),
    ("data.image_formats=[PNG,EPS]", "data.image_formats=['PNG', 'EPS']: must be a non-empty list of JPEG"),
    ("train.lr=[1,", "override 'train.lr=[1,': the value is not valid YAML"),
])
def test_out_of_range_or_unparsable_values_are_one_line_before_anything_runs(tiny_world, tmp_path, capsys,
                                                                              override, expected):
    out = tmp_path / "run"
    code, line = cli(capsys, *train_args(tiny_world, out, override))
    assert code == 2 and line.startswith(f"mm1 train: config error: {expected}"), line
    assert not out.exists()


# ----------------------------------------------------------------------------- checkpoints


def test_a_damaged_checkpoint_in_eval_is_one_line(run2, tmp_path, capsys):
    run = copy_run(run2, tmp_path)
    weights = run / "checkpoints" / "step-2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    code, line = cli(capsys, "eval", "--checkpoint", str(run), "--tasks", "world_caption", "--shots", "0",
                     "--limit", "2")
    assert code == 2 and line.startswith("mm1 eval: checkpoint error: checkpoint ") and "model.safetensors" in line


def test_a_checkpoint_without_checksums_is_refused_not_skipped_past(run2, tiny_world, tmp_path, capsys):
    run = copy_run(run2, tmp_path)
    for sums in (run / "checkpoints").glob("step-*/checksums.json"):
        sums.unlink()
    before = (run / "metrics.jsonl").read_text()
    code, line = cli(capsys, *train_args(tiny_world, run, "train.steps=2", "train.save_every=1",
                                         "train.keep_last=0"), "--resume")
    assert code == 2 and "step-2 cannot be verified: checksums.json is missing" in line, line
    assert (run / "metrics.jsonl").read_text() == before  # no restart at step 0 appended to it


def test_disk_full_during_a_save_is_one_line_and_leaves_no_step_dir(tiny_world, tmp_path, capsys, monkeypatch):
    import mm1.train.checkpoint as ckpt

    def full(state, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt, "write_weights", full)
    out = tmp_path / "run"
    code, line = cli(capsys, *train_args(tiny_world, out, "train.steps=1"))
    assert code == 2 and line.startswith("mm1 train: disk full while writing ") and "model.safetensors" in line
    assert not list((out / "checkpoints").glob("step-*"))
    assert [r["step"] for r in read_metrics(out)] == [1]

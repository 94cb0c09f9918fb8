"""Experiment loggers: `train.loggers=[jsonl,tensorboard,wandb]` mirror every step's metrics;
W&B runs offline with no network or account; a missing package is refused at start, in one line."""

from __future__ import annotations

import builtins

import pytest

from mm1.config import load_config
from mm1.registry import ConfigError
from mm1.train.metrics import read_metrics
from mm1.train.trainer import train
from references import require

SMALL = [
    "model.lm.n_layers=1",
    "model.vision.depth=1",
    "data.seq_len=96",
    "data.batch_size=2",
    "train.steps=2",
    "train.warmup_steps=1",
    "train.save_every=2",
]


def _cfg(world, loggers):
    return load_config("tiny", [f"data.world={world}", *SMALL, f"train.loggers=[{','.join(loggers)}]"])


def test_tensorboard_and_wandb_offline_receive_every_step(tiny_world, tmp_path, monkeypatch):
    require("tensorboard")  # both in the dev extra: skipped locally when missing, a failure in `make test`
    require("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    out = tmp_path / "run"
    train(_cfg(tiny_world, ["jsonl", "tensorboard", "wandb"]), out)
    rows = read_metrics(out)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [r["step"] for r in rows] == [1, 2]
    assert events.Scalars("loss")[-1].value == pytest.approx(rows[-1]["loss"], rel=1e-6)
    offline = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def test_a_logger_whose_package_is_missing_is_refused_with_the_install_line(tiny_world, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match=r"pip install 'mm1\[wandb\]'"):
        train(_cfg(tiny_world, ["wandb"]), tmp_path / "run")


def test_an_unknown_logger_names_the_allowed_ones(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match="train.loggers='mlflow'.*allowed: jsonl, tensorboard, wandb"):
        train(_cfg(tiny_world, ["mlflow"]), tmp_path / "run")


def test_a_config_saved_with_the_old_tensorboard_flag_still_loads():
    from mm1.config import config_from_dict, to_dict

    old = to_dict(load_config("tiny"))
    del old["train"]["loggers"]
    old["train"]["tensorboard"] = True
    assert config_from_dict(old).train.loggers == ["jsonl", "tensorboard"]
    old["train"]["tensorboard"] = False
    assert config_from_dict(old).train.loggers == ["jsonl"]

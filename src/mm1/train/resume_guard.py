"""`--resume` continues the run that is in the run dir, or says why it cannot; never a silent change.

A resume used to rewrite config.yaml and run.json with whatever the command line said while the
restored optimizer and scheduler kept the old values (`train.lr=0.05` logged, 9e-5 trained), and a
different data path or model shape went through without a word (or failed after overwriting
config.yaml). `check_resume` runs before anything is written: it compares the config of this
command with the one the latest checkpoint was trained with, key by key, and

- lets through keys that take effect for real when a run continues (`RESUMABLE`: the step count,
  how often to save/log, the skip threshold) only when named with `--allow-change KEY`, and logs them;
- lets through `eval.*`, `name` and `train.init_from` (a continued run does not read them), logged;
- refuses every other change (model, data, optimizer, schedule, seed ...) naming each key, its saved
  and its new value, and how to get what was meant (a new run with `train.init_from`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from mm1.config import Config, config_from_dict, migrate_renamed, to_dict
from mm1.registry import ConfigError
from mm1.train.checkpoint import CHECKSUMS, CheckpointError, latest_checkpoint, sha256, verify_checkpoint

log = logging.getLogger("mm1.train")

# changes that a continued run really applies (the schedule and loop read train.steps from the config)
RESUMABLE = (
    "train.steps",
    "train.time_budget_s",
    "train.save_every",
    "train.keep_last",
    "train.log_every",
    "train.nonfinite",
    "train.loggers",
    "train.eval_every",
    "data.max_skip_rate",
    "data.image_cache_mb",  # how many decoded images are kept: the stream is the same
)
# keys a continued run never reads: the evaluation settings, the run's name, and the weights a run
# started from (a resume takes every weight from its checkpoint)
UNUSED_ON_RESUME = ("name", "train.init_from")
# set from the tokenizer when the run starts, not by the user
DERIVED = ("model.image_token_id",)
# how a run is laid out over processes: a DCP checkpoint reshards, and with `train.data_shards` fixed
# the global batch and data order do not depend on them (per-process batch = global / processes)
LAYOUT = ("train.strategy", "data.batch_size")


def check_resume(cfg: Config, run_dir: Path, allow_change: Sequence[str] = ()) -> list[str]:
    """Raise `ConfigError` if `cfg` would silently change the run saved in `run_dir`; return the
    changes that will be applied (as "key: old -> new"), already logged. No checkpoint: nothing to
    compare, the run starts at step 0."""
    bad = [k for k in allow_change if k not in RESUMABLE]
    if bad:
        raise ConfigError(
            f"--allow-change {', '.join(bad)}: cannot change on resume (the checkpoint's state was "
            f"built with it); what can: {', '.join(RESUMABLE)}"
        )
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return []
    saved = flatten(to_dict(saved_config(ckpt)))
    now = flatten(to_dict(cfg))
    changed = sorted(k for k in saved.keys() | now.keys() if k not in DERIVED and saved.get(k) != now.get(k))
    layout = LAYOUT if cfg.train.data_shards > 0 and saved.get("train.data_shards") == cfg.train.data_shards else ()
    refused = [
        k
        for k in changed
        if k not in allow_change and not (k.startswith("eval.") or k in UNUSED_ON_RESUME or k in layout)
    ]
    if refused:
        what = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in refused)
        hint = [k for k in refused if k in RESUMABLE]
        allow = f" To apply {', '.join(hint)}, add --allow-change {' --allow-change '.join(hint)}." if hint else ""
        raise ConfigError(
            f"--resume would change the run in {run_dir} (trained to {ckpt.name} with the old values): "
            f"{what}. Nothing was written.{allow} Otherwise drop the overrides, or start a new run "
            f"from these weights with train.init_from={ckpt} --out NEW_DIR"
        )
    applied = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed]
    for change in applied:
        log.info("--resume applies %s", change)
    return applied


def saved_config(ckpt: Path) -> Config:
    """The config a checkpoint was trained with, after checking config.yaml against checksums.json
    (the weights are verified when they are loaded)."""
    path, sums_path = ckpt / "config.yaml", ckpt / CHECKSUMS
    if not sums_path.is_file():
        verify_checkpoint(ckpt)  # raises, naming the missing file
    try:
        expected = json.loads(sums_path.read_text()).get("config.yaml")
    except (ValueError, AttributeError, UnicodeDecodeError):
        expected = None
    if not path.is_file() or expected != sha256(path):
        raise CheckpointError(
            f"{path} is missing or does not match {sums_path}; the checkpoint cannot be trusted: "
            "delete that step directory to resume from the one before it"
        )
    return config_from_dict(migrate_renamed(yaml.safe_load(path.read_text())), where=str(path))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} for nested dicts; lists are leaves (compared whole)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out

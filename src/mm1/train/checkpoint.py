"""Checkpoints that resume bit-for-bit, survive a kill mid-write, and refuse to load when damaged.

    RUN/checkpoints/step-N/
        model.safetensors              full (unsharded) weights, names as in the module's state_dict
        optimizer.json|.safetensors    AdamW state keyed by parameter name (works for DDP and FSDP2)
        trainer.json                   step, scheduler, counters
        rank-R.json|.safetensors       per-rank RNG states and data-loader position
        config.yaml  tokenizer.json    what is needed to rebuild the model without the run dir
        checksums.json                 sha256 of every file above, written last

A checkpoint is written into `checkpoints/.tmp-step-N` and renamed when complete, so a directory
named `step-N` always holds a finished checkpoint; a killed save leaves only a temp dir, removed on
the next save. Nothing is unpickled on load: tensors are safetensors, the rest JSON / YAML.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mm1.train import state_io
from mm1.train.distributed import DistEnv, barrier, broadcast_object, gather_objects

if TYPE_CHECKING:
    from mm1.config import Config
    from mm1.data.tokenizer import Tokenizer
    from mm1.models.mllm import MLLM

log = logging.getLogger("mm1.train")
STEP_DIR = re.compile(r"^step-(\d+)$")
CHECKSUMS = "checksums.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or damaged; the message names the file."""


# ----------------------------------------------------------------------------- files and checksums


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(ckpt: Path) -> None:
    """Raise CheckpointError naming the first file whose sha256 differs from `checksums.json`."""
    ckpt = Path(ckpt)
    sums_path = ckpt / CHECKSUMS
    if not sums_path.is_file():
        raise CheckpointError(f"{ckpt} cannot be verified: {CHECKSUMS} is missing, so it is not loaded (and not "
                              "skipped past); delete that step directory to resume from the one before it")
    try:
        sums = json.loads(sums_path.read_text())
        assert isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())
    except (ValueError, AssertionError, UnicodeDecodeError):
        raise CheckpointError(f"{sums_path} is damaged (not a JSON map of file -> sha256); "
                              "the checkpoint cannot be trusted — delete it and use an older one") from None
    for name, expected in sums.items():
        if Path(name).name != name or name in ("", ".", ".."):  # a file of this directory, nothing else
            raise CheckpointError(f"{sums_path} lists {name!r}, which is not a file name in {ckpt}; "
                                  "the checkpoint cannot be trusted")
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: {name} is missing (listed in {CHECKSUMS})")
        got = sha256(f)
        if got != expected:
            raise CheckpointError(
                f"checkpoint {ckpt} is damaged: {f} has sha256 {got[:16]}… but {CHECKSUMS} records "
                f"{expected[:16]}…; the file changed after it was saved (disk error, partial copy, edit). "
                "Refusing to load it: delete this step directory and resume from an older checkpoint")


def list_checkpoints(run_or_ckpts: Path) -> list[Path]:
    """Checkpoint step dirs of a run dir or checkpoints dir, oldest first. A step dir exists only once
    complete (saves are renamed into place), so one without checksums.json is listed too: loading
    it fails verification rather than a resume silently falling back to an older step or step 0."""
    root = Path(run_or_ckpts)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := STEP_DIR.match(d.name)) and d.is_dir()]
    return [d for _, d in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step dir as given, or a run dir's latest complete checkpoint."""
    p = Path(path)
    if (p / CHECKSUMS).is_file() or (p / "model.safetensors").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{p}: no complete checkpoint here (expected a run dir with "
                              "checkpoints/step-N/ or a step-N dir with checksums.json)")
    return latest


# ----------------------------------------------------------------------------- weights


def write_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses tensors sharing memory (tied embeddings): store each storage once and
    record the other names as aliases in the header."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases), "format": "pt"})


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state = load_file(str(path))
    for name, target in aliases.items():
        state[name] = state[target]
    return state


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- save / load

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, *, env: DistEnv, trainer_state: dict, rank_state: dict,
                    extra: Callable[[Path], None] | None = None, keep_last: int = 0, prefix: str = "") -> Path:
    """Collective: every rank calls it. Rank 0 writes `checkpoints/step-N` atomically.

    `rank_state` is this rank's plain-data state (data position); RNG states are added here.
    `extra(dir)` writes further files into the checkpoint before it is sealed (config, tokenizer).
    `prefix` is the training wrapper's name for the user model (`mllm.`), left out of the weight
    names so that model.safetensors loads straight into an MLLM."""
    model_sd = {k.removeprefix(prefix): v for k, v in get_model_state_dict(model, options=_FULL).items()}
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    per_rank = gather_objects({**rank_state, "rng": rng_state()}, env)
    ckpts = Path(run_dir) / "checkpoints"
    final = ckpts / f"step-{step}"
    if env.is_main:
        ckpts.mkdir(parents=True, exist_ok=True)
        for stale in ckpts.glob(".tmp-*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = ckpts / f".tmp-step-{step}"
        tmp.mkdir()
        write_weights(model_sd, tmp / "model.safetensors")
        state_io.write_state(optim_sd, tmp, "optimizer")
        sched = scheduler.state_dict()
        sched["lr_lambdas"] = [None] * len(sched.get("lr_lambdas", []))  # the schedule comes from the config
        state_io.write_state({**trainer_state, "step": step, "world_size": env.world_size,
                              "scheduler": sched}, tmp, "trainer")
        for r, st in enumerate(per_rank):
            state_io.write_state(st, tmp, f"rank-{r}")
        if extra is not None:
            extra(tmp)
        sums = {f.name: sha256(f) for f in sorted(tmp.iterdir())}
        state_io.write_text(tmp / CHECKSUMS, json.dumps(sums, indent=1))
        if final.exists():  # re-saving a step (a resumed run reaching it again)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpts)
        if keep_last > 0:
            for old in list_checkpoints(ckpts)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    barrier(env)
    return final


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def load_training_state(ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                        env: DistEnv, prefix: str = "") -> tuple[dict, dict]:
    """Restore weights, optimizer, scheduler and this rank's RNG; return (trainer_state, rank_state).

    Rank 0 verifies the checksums first and every rank gets its verdict, so a damaged checkpoint
    stops all ranks with the same message."""
    ckpt = Path(ckpt)
    error = None
    if env.is_main:
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            error = str(e)
    error = broadcast_object(error, env)
    if error:
        raise CheckpointError(error)
    trainer = state_io.read_state(ckpt, "trainer")
    if trainer["world_size"] != env.world_size:
        raise CheckpointError(
            f"{ckpt} was written by {trainer['world_size']} processes, this run has {env.world_size}; the "
            "data position and RNG streams are per rank, so an exact resume needs the same number of "
            "processes (start a new run with train.init_from to continue from these weights instead)")
    weights = {prefix + k: v for k, v in read_weights(ckpt / "model.safetensors").items()}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, optimizer, state_io.read_state(ckpt, "optimizer"),
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(trainer.pop("scheduler"))
    rank_state = state_io.read_state(ckpt, f"rank-{env.rank}")
    set_rng_state(rank_state.pop("rng"))
    return trainer, rank_state


def read_config(ckpt: Path) -> Config:
    """The resolved config a checkpoint was written with."""
    from mm1.config import config_from_dict

    path = Path(ckpt) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: config.yaml is missing; not an mm1 checkpoint")
    return config_from_dict(yaml.safe_load(path.read_text()), where=str(path))


def load_checkpoint(path: str | Path, verify: bool = True) -> tuple[MLLM, Config, Tokenizer]:
    """(model, config, tokenizer) of a pretrain/SFT checkpoint: a step dir, or a run dir's latest one.

    The model is built from the checkpoint's own config (HF paths ignored: the weights are here),
    loaded strictly, on CPU, in eval mode. An encoder-stage checkpoint holds no MLLM: start an MLLM
    run with `train.init_from` pointing at it instead."""
    from mm1.data.tokenizer import Tokenizer
    from mm1.models.build import build_model

    ckpt = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(ckpt)
    cfg = read_config(ckpt)
    if cfg.train.stage == "encoder":
        raise CheckpointError(f"{ckpt} is an image-encoder checkpoint (train.stage=encoder), not an MLLM; "
                              f"use it as train.init_from={ckpt} in a pretrain run")
    cfg.model.vision.hf_path = ""
    cfg.model.lm.hf_path = ""
    model = build_model(cfg.model)
    state = read_weights(ckpt / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}/model.safetensors does not match the model of its config.yaml: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return model, cfg, Tokenizer.load(ckpt / "tokenizer.json")

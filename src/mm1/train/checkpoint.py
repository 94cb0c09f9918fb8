"""Checkpoints that resume bit-for-bit, reshard, survive a kill mid-write, and refuse to load when damaged.

    RUN/checkpoints/step-N/
        model/shard-R-*.safetensors    weights, through torch.distributed.checkpoint (DCP): each rank
        optim/shard-R-*.safetensors      writes the slices it holds; names as in the MLLM's state_dict
        optimizer.json                 AdamW param groups (the tensors are in optim/)
        trainer.json                   step, scheduler, counters, process count
        rank-R.json|.safetensors       per-rank RNG states and data-loader position (per data shard)
        model.safetensors              the whole weights in one file, only when asked
                                       (`train.save_consolidated`, export)
        config.yaml  tokenizer.json    what is needed to rebuild the model without the run dir
        checksums.json                 sha256 of every file above, written last

Every rank writes its own shards (no gather of the full weights or optimizer state) and hashes
them; rank 0 writes the small files and the checksums. Loading reads, on each rank, only the slices
it needs, so a checkpoint of N processes resumes on M processes and under another strategy (DDP,
FSDP2, single) - the data position follows `train.data_shards`, which must stay the same. The files
are safetensors (DCP's HF storage, offsets in the header) and JSON: nothing is unpickled. A
checkpoint is written into `checkpoints/.tmp-step-N` and renamed when complete, so a directory named
`step-N` always holds a finished checkpoint; a killed save leaves only a temp dir, removed on the
next save. `load_checkpoint` (eval, export) reads this layout and the older single-file one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mm1.train import state_io
from mm1.train.distributed import DistEnv, all_gather_objects, barrier, gather_objects

if TYPE_CHECKING:
    from mm1.config import Config
    from mm1.data.tokenizer import Tokenizer
    from mm1.models.mllm import MLLM

log = logging.getLogger("mm1.train")
STEP_DIR = re.compile(r"^step-(\d+)$")
CHECKSUMS = "checksums.json"
MODEL_DIR, OPTIM_DIR, CONSOLIDATED = "model", "optim", "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or damaged; the message names the file."""


# ----------------------------------------------------------------------------- files and checksums


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checksums(ckpt: Path) -> dict[str, str]:
    """`checksums.json` of a checkpoint (relative path -> sha256); CheckpointError if absent or damaged."""
    sums_path = Path(ckpt) / CHECKSUMS
    if not sums_path.is_file():
        raise CheckpointError(
            f"{ckpt} cannot be verified: {CHECKSUMS} is missing, so it is not loaded (and not "
            "skipped past); delete that step directory to resume from the one before it"
        )
    try:
        sums = json.loads(sums_path.read_text())
        assert isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())
    except (ValueError, AssertionError, UnicodeDecodeError):
        raise CheckpointError(
            f"{sums_path} is damaged (not a JSON map of file -> sha256); "
            "the checkpoint cannot be trusted — delete it and use an older one"
        ) from None
    for name in sums:
        if not _is_checkpoint_file(name):  # a file of this directory or its shard dirs, nothing else
            raise CheckpointError(
                f"{sums_path} lists {name!r}, which is not a file of {ckpt}; the checkpoint cannot be trusted"
            )
    return sums


def _is_checkpoint_file(name: str) -> bool:
    parts = name.split("/")
    return all(p not in ("", ".", "..") and "\\" not in p for p in parts) and (
        len(parts) == 1 or (len(parts) == 2 and parts[0] in (MODEL_DIR, OPTIM_DIR))
    )


def verify_files(ckpt: Path, sums: dict[str, str], names: list[str]) -> None:
    """Raise CheckpointError naming the first of `names` whose sha256 differs from `sums`."""
    for name in names:
        f = Path(ckpt) / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: {name} is missing (listed in {CHECKSUMS})")
        got = sha256(f)
        if got != sums[name]:
            raise CheckpointError(
                f"checkpoint {ckpt} is damaged: {f} has sha256 {got[:16]}… but {CHECKSUMS} records "
                f"{sums[name][:16]}…; the file changed after it was saved (disk error, partial copy, edit). "
                "Refusing to load it: delete this step directory and resume from an older checkpoint"
            )


def verify_checkpoint(ckpt: Path, env: DistEnv | None = None) -> None:
    """Check every file against `checksums.json`. With a process group the ranks split the files
    (strided) and share their verdicts, so every rank raises the same error naming the file."""
    ckpt = Path(ckpt)
    env = env or DistEnv()
    error = None
    try:
        sums = read_checksums(ckpt)
        verify_files(ckpt, sums, sorted(sums)[env.rank :: env.world_size])
    except CheckpointError as e:
        error = str(e)
    errors = [e for e in all_gather_objects(error, env) if e]
    if errors:
        raise CheckpointError(errors[0])


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
    if (p / CHECKSUMS).is_file() or (p / CONSOLIDATED).is_file() or (p / MODEL_DIR).is_dir():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(
            f"{p}: no complete checkpoint here (expected a run dir with "
            "checkpoints/step-N/ or a step-N dir with checksums.json)"
        )
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
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
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


# ----------------------------------------------------------------------------- sharded state

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _aliases(model: nn.Module, prefix: str) -> dict[str, str]:
    """Second names of shared parameters (tied embeddings) -> the first name, without `prefix`.
    Found from the module structure, so every rank agrees whatever it holds."""
    first: dict[int, str] = {}
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        name = name.removeprefix("module.").removeprefix(prefix)
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def _model_shards(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """This rank's view of the weights (DTensor slices under FSDP2), one entry per distinct tensor."""
    aliases = _aliases(model, prefix)
    sd = {k.removeprefix(prefix): v for k, v in get_model_state_dict(model).items()}
    return {k: v for k, v in sd.items() if k not in aliases}


def _optim_shards(model: nn.Module, optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict, dict]:
    """(tensors keyed `param/key`, the rest as plain data) of the optimizer's sharded state dict."""
    osd = get_optimizer_state_dict(model, optimizer)  # allocates AdamW's state if no step ran yet
    tensors, plain = {}, {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            where = f"{name.removeprefix(prefix)}/{key}"
            if torch.is_tensor(value):
                tensors[where] = value
            else:
                plain[where] = value
    groups = [{**g, "params": [n.removeprefix(prefix) for n in g["params"]]} for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "state": plain}


def _optim_state(tensors: dict, plain: dict, prefix: str) -> dict:
    """Invert `_optim_shards`."""
    state: dict[str, dict] = {}
    for where, value in [*tensors.items(), *plain["state"].items()]:
        name, key = where.rsplit("/", 1)
        state.setdefault(prefix + name, {})[key] = value
    groups = [{**g, "params": [prefix + n for n in g["params"]]} for g in plain["param_groups"]]
    return {"state": state, "param_groups": groups}


def _own_files(directory: Path, rank: int) -> list[Path]:
    """The shard files DCP's HF writer made for `rank` (it numbers writers from 1)."""
    return sorted(directory.glob(f"shard-{rank + 1:05d}-*.safetensors")) if directory.is_dir() else []


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns whenever it runs without a process group; here that is deliberate (1 process, eval)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


@contextlib.contextmanager
def _dcp_errors(what: str, directory: Path) -> Iterator[None]:
    """DCP reports a rank's failure as a BaseException holding every rank's error: surface a disk
    error as the OSError it was, anything else as a CheckpointError naming the directory."""
    try:
        yield
    except CheckpointException as e:
        rank, (first, _) = next(iter(e.failures.items()))
        if isinstance(first, OSError):
            if first.filename is None:
                first.filename = str(directory)
            raise first from None
        raise CheckpointError(
            f"{what} {directory} failed on rank {rank}: {type(first).__name__}: {' '.join(str(first).split())[:300]}"
        ) from None


def _dcp_save(state: dict[str, torch.Tensor], directory: Path, env: DistEnv) -> None:
    with _quiet_single_process(), _dcp_errors("writing", directory):
        dcp.save(
            state,
            storage_writer=HuggingFaceStorageWriter(str(directory), save_distributed=True),
            no_dist=not env.initialized,
        )


def _dcp_load(state: dict[str, torch.Tensor], directory: Path, env: DistEnv | None) -> None:
    with _quiet_single_process(), _dcp_errors("reading", directory):
        dcp.load(
            state, storage_reader=HuggingFaceStorageReader(str(directory)), no_dist=env is None or not env.initialized
        )


def read_sharded_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Whole tensors from a DCP weights directory, in one process (eval, export, init_from)."""
    meta = HuggingFaceStorageReader(str(directory)).read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()}
    _dcp_load(state, directory, None)
    return state


def read_checkpoint_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint in either layout (consolidated file first: one read), tied names
    restored from the model layout is the caller's business (load with strict=False)."""
    ckpt = Path(ckpt)
    if (ckpt / CONSOLIDATED).is_file():
        return read_weights(ckpt / CONSOLIDATED)
    if (ckpt / MODEL_DIR).is_dir():
        return read_sharded_weights(ckpt / MODEL_DIR)
    raise CheckpointError(f"{ckpt}: no weights ({MODEL_DIR}/ or {CONSOLIDATED}); not an mm1 checkpoint")


# ----------------------------------------------------------------------------- save / load


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    env: DistEnv,
    trainer_state: dict,
    rank_state: dict,
    extra: Callable[[Path], None] | None = None,
    keep_last: int = 0,
    prefix: str = "",
    consolidated: bool = False,
) -> Path:
    """Collective: every rank calls it and writes its shards; rank 0 seals `checkpoints/step-N`.

    `rank_state` is this rank's plain-data state (data position); RNG states are added here.
    `extra(dir)` writes further files into the checkpoint before it is sealed (config, tokenizer).
    `prefix` is the training wrapper's name for the user model (`mllm.`), left out of the stored
    names so that the weights load straight into an MLLM. `consolidated` also writes the whole
    weights as one safetensors file (gathered on rank 0: the one full copy, only when asked)."""
    ckpts = Path(run_dir) / "checkpoints"
    final, tmp = ckpts / f"step-{step}", ckpts / f".tmp-step-{step}"
    if env.is_main:
        ckpts.mkdir(parents=True, exist_ok=True)
        for stale in ckpts.glob(".tmp-*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier(env)
    _dcp_save(_model_shards(model, prefix), tmp / MODEL_DIR, env)
    optim_tensors, optim_plain = _optim_shards(model, optimizer, prefix)
    _dcp_save(optim_tensors, tmp / OPTIM_DIR, env)
    own = {str(f.relative_to(tmp)): sha256(f) for d in (MODEL_DIR, OPTIM_DIR) for f in _own_files(tmp / d, env.rank)}
    full = None
    if consolidated:
        full = {k.removeprefix(prefix): v for k, v in get_model_state_dict(model, options=_FULL).items()}
    per_rank = gather_objects({**rank_state, "rng": rng_state()}, env)
    shard_sums = gather_objects(own, env)
    if env.is_main:
        state_io.write_state(optim_plain, tmp, "optimizer")
        if full is not None:
            write_weights(full, tmp / CONSOLIDATED)
        sched = scheduler.state_dict()
        sched["lr_lambdas"] = [None] * len(sched.get("lr_lambdas", []))  # the schedule comes from the config
        state_io.write_state(
            {**trainer_state, "step": step, "world_size": env.world_size, "scheduler": sched}, tmp, "trainer"
        )
        for r, st in enumerate(per_rank):
            state_io.write_state(st, tmp, f"rank-{r}")
        if extra is not None:
            extra(tmp)
        sums = {k: v for part in shard_sums for k, v in part.items()}
        sums.update({f.name: sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()})
        missing = [
            str(f.relative_to(tmp))
            for d in (MODEL_DIR, OPTIM_DIR)
            if (tmp / d).is_dir()
            for f in (tmp / d).iterdir()
            if str(f.relative_to(tmp)) not in sums
        ]
        if missing:  # a file no rank claims: a writer naming scheme we do not know; refuse to seal
            raise CheckpointError(f"checkpoint {tmp}: files written by no known rank: {missing[:4]}")
        state_io.write_text(tmp / CHECKSUMS, json.dumps(dict(sorted(sums.items())), indent=1))
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


def _rank_states(ckpt: Path) -> list[dict]:
    n = len(list(ckpt.glob("rank-*.json")))
    return [state_io.read_state(ckpt, f"rank-{r}") for r in range(n)]


def load_training_state(
    ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, env: DistEnv, prefix: str = ""
) -> tuple[dict, dict]:
    """Restore weights, optimizer, scheduler and RNG; return (trainer_state, rank_state).

    The checkpoint may come from another number of processes or strategy: each rank reads the
    slices it holds now. `rank_state["data"]["shards"]` holds every data shard's position (the
    loader takes its own); the RNG is this rank's if the writer had such a rank, else left seeded.
    The ranks verify the checksums first (split between them), so a damaged checkpoint stops all
    ranks with the same message and nothing is loaded."""
    ckpt = Path(ckpt)
    verify_checkpoint(ckpt, env)
    if not (ckpt / MODEL_DIR).is_dir():
        raise CheckpointError(
            f"{ckpt} has the single-file layout of an older mm1, which cannot be resumed; "
            f"start a new run with train.init_from={ckpt} to continue from its weights"
        )
    trainer = state_io.read_state(ckpt, "trainer")
    weights = _model_shards(model, prefix)
    _dcp_load(weights, ckpt / MODEL_DIR, env)
    aliases = _aliases(model, prefix)
    full_names = {**weights, **{a: weights[t] for a, t in aliases.items()}}
    set_model_state_dict(model, {prefix + k: v for k, v in full_names.items()})
    tensors, _ = _optim_shards(model, optimizer, prefix)
    _dcp_load(tensors, ckpt / OPTIM_DIR, env)
    plain = state_io.read_state(ckpt, "optimizer")
    set_optimizer_state_dict(model, optimizer, _optim_state(tensors, plain, prefix))
    scheduler.load_state_dict(trainer.pop("scheduler"))
    ranks = _rank_states(ckpt)
    rank_state = dict(ranks[env.rank]) if env.rank < len(ranks) else {}
    rng = rank_state.pop("rng", None)
    if rng is not None and len(ranks) == env.world_size:
        set_rng_state(rng)
    elif env.is_main:
        log.warning(
            "%s was written by %d process(es), this run has %d: RNG streams restart from the seed "
            "(data positions are restored per data shard)",
            ckpt,
            len(ranks),
            env.world_size,
        )
    if all("shards" in (r.get("data") or {}) for r in ranks):  # the trainer's per-shard data positions
        shards = {k: v for r in ranks for k, v in r["data"]["shards"].items()}
        rank_state["data"] = {**ranks[0]["data"], "shards": shards}
    return trainer, rank_state


def read_config(ckpt: Path) -> Config:
    """The resolved config a checkpoint was written with."""
    from mm1.config import config_from_dict, migrate_renamed

    path = Path(ckpt) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: config.yaml is missing; not an mm1 checkpoint")
    return config_from_dict(migrate_renamed(yaml.safe_load(path.read_text())), where=str(path))


def read_checkpoint_weights_into(ckpt: Path, targets: dict[str, torch.Tensor]) -> None:
    """Fill `targets` (name -> allocated tensor, any device and dtype) from a checkpoint in either
    layout, one tensor at a time: host memory never holds more than the largest tensor read."""
    ckpt = Path(ckpt)
    if (ckpt / CONSOLIDATED).is_file():
        from safetensors import safe_open

        with safe_open(str(ckpt / CONSOLIDATED), framework="pt") as f:
            stored = {k: k for k in f.keys()}
            stored.update(json.loads((f.metadata() or {}).get("aliases", "{}")))
            _check_names(ckpt, set(targets), set(stored))
            with torch.no_grad():
                for name, t in targets.items():
                    t.copy_(f.get_tensor(stored[name]))
    elif (ckpt / MODEL_DIR).is_dir():
        meta = HuggingFaceStorageReader(str(ckpt / MODEL_DIR)).read_metadata().state_dict_metadata
        _check_names(ckpt, set(targets), set(meta))
        _dcp_load(targets, ckpt / MODEL_DIR, None)  # DCP copies each stored tensor into its target
    else:
        raise CheckpointError(f"{ckpt}: no weights ({MODEL_DIR}/ or {CONSOLIDATED}); not an mm1 checkpoint")


def _check_names(ckpt: Path, expected: set[str], stored: set[str]) -> None:
    missing, unexpected = sorted(expected - stored), sorted(stored - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: the weights do not match the model of its config.yaml: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load_checkpoint(
    path: str | Path, verify: bool = True, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[MLLM, Config, Tokenizer]:
    """(model, config, tokenizer) of a pretrain/SFT checkpoint: a step dir, or a run dir's latest one.

    Either layout (sharded DCP weights or one model.safetensors). The model is built from the
    checkpoint's own config (HF paths ignored: the weights are here) on the meta device, allocated
    once on `device` in `dtype` (floating-point weights) and filled tensor by tensor, so a bf16
    evaluation on a GPU never holds the fp32 weights in host memory. Loaded strictly, in eval mode.
    An encoder-stage checkpoint holds no MLLM: start an MLLM run with `train.init_from` pointing at
    it instead."""
    from mm1.data.tokenizer import Tokenizer
    from mm1.models.build import build_model

    ckpt = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(ckpt)
    cfg = read_config(ckpt)
    if cfg.train.stage == "encoder":
        raise CheckpointError(
            f"{ckpt} is an image-encoder checkpoint (train.stage=encoder), not an MLLM; "
            f"use it as train.init_from={ckpt} in a pretrain run"
        )
    cfg.model.vision.hf_path = ""
    cfg.model.lm.hf_path = ""
    with torch.device("meta"):
        model = build_model(cfg.model, weights=False).to(dtype=dtype)
    tied = _aliases(model, "")
    model.to_empty(device=device)
    for alias, target in tied.items():  # to_empty gave the shared parameter two storages: tie them again
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(target))
    read_checkpoint_weights_into(ckpt, {k: v for k, v in model.state_dict().items() if k not in tied})
    model.eval()
    return model, cfg, Tokenizer.load(ckpt / "tokenizer.json")

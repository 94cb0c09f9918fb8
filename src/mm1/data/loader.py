"""`build_loader`: the mixture as an iterable of batches that can be checkpointed mid-stream.

Each DataLoader worker builds whole batches (decode + preprocess + tokenize + pack) and attaches its
resume state to every batch; the main process strips it off. With an IterableDataset the DataLoader
returns batches from its workers strictly round-robin, so the loader's state is just "batches
consumed" plus, per worker, the state attached to the last batch it delivered. Prefetched but
unconsumed batches are never counted. On resume the DataLoader's worker 0 plays the worker whose
turn is next, so the continued stream is the uninterrupted one, batch for batch.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from mm1.data.images import ImageError, image_tensors
from mm1.data.inputs import Inputs
from mm1.data.mixture import MixtureDataset
from mm1.data.safety import ReadPolicy
from mm1.data.sequence import DocBuilder, SampleError
from mm1.data.skips import SkipCounter
from mm1.registry import ConfigError

STATE_VERSION = 1


class ImagePipeline:
    """(bytes | path, where) -> the image's crops, each [3, S, S]; failures become counted skips.

    With `cache_mb` > 0 the crops of the most recently used images are kept, up to that many MiB, keyed
    by the encoded bytes' hash (or a file's path, size and mtime): a small corpus is seen many times (the
    tiny world's 3,000 caption images about 25 times in the demo's encoder stage), and decoding and
    resizing each sighting was about a tenth of a CPU step. A failed image is never cached, so it is
    counted as a skip each time it is read."""

    def __init__(
        self, model_cfg: Any, resize: str = "crop", policy: ReadPolicy = ReadPolicy(), cache_mb: int = 0
    ) -> None:
        v = model_cfg.vision
        self.size, self.mean, self.std = int(v.image_size), list(v.mean), list(v.std)
        self.grid, self.overview_first = int(model_cfg.subimage_grid), bool(model_cfg.overview_first)
        self.resize, self.policy = resize, policy
        self.cache: OrderedDict[Any, torch.Tensor] = OrderedDict()
        self.cache_limit, self.cache_bytes = cache_mb * 2**20, 0

    @property
    def crops(self) -> int:
        return self.grid**2 + 1 if self.grid else 1

    def __call__(self, raw: Any, where: str) -> list[torch.Tensor]:
        key = _cache_key(raw) if self.cache_limit else None
        x = self.cache.get(key) if key is not None else None
        if x is not None:
            self.cache.move_to_end(key)
        else:
            x = self._decode(raw, where)
            if key is not None and x.nbytes <= self.cache_limit:
                self.cache[key] = x
                self.cache_bytes += x.nbytes
                while self.cache_bytes > self.cache_limit:
                    self.cache_bytes -= self.cache.popitem(last=False)[1].nbytes
        return list(x.clone().unbind(0))  # crops of [3, S, S], never views of a cached tensor

    def _decode(self, raw: Any, where: str) -> torch.Tensor:
        try:
            return image_tensors(
                raw,
                where,
                self.size,
                self.mean,
                self.std,
                self.resize,
                self.grid,
                self.overview_first,
                formats=self.policy.image_formats,
                max_bytes=self.policy.max_member_bytes,
            )
        except ImageError as e:
            raise SampleError(e.reason, where, str(e)) from None


def _cache_key(raw: Any) -> Any:
    """Encoded bytes by their hash; a file by its path, size and modification time (a rewritten file is new)."""
    if isinstance(raw, bytes | bytearray | memoryview):
        return hashlib.blake2b(raw, digest_size=16).digest()
    try:
        st = os.stat(raw)
    except (OSError, TypeError):
        return None  # not a local file (the decoder reports what it is): never cached
    return (os.fspath(raw), st.st_size, st.st_mtime_ns)


class Loader:
    """Iterable of batches (the table in CONTRIBUTING.md) with exact `state_dict` resume."""

    def __init__(self, dataset: MixtureDataset, num_workers: int = 0, prefetch_factor: int = 2) -> None:
        self.dataset, self.num_workers, self.prefetch_factor = dataset, num_workers, prefetch_factor
        self.batches = 0  # batches handed out so far
        self.worker_states: dict[int, dict[str, Any]] = {}

    @property
    def logical_workers(self) -> int:
        return max(1, self.num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = copy.copy(self.dataset)
        ds.resume = copy.deepcopy(self.worker_states)
        ds.worker_offset = self.batches % self.logical_workers
        if self.num_workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenize serially
            stream: Any = DataLoader(
                ds,
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=self.prefetch_factor,
                persistent_workers=False,
                pin_memory=torch.cuda.is_available(),
            )
        else:
            stream = ds
        for batch in stream:
            state = batch.pop("_state")
            self.worker_states[int(state["worker"])] = state
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        ds = self.dataset
        return {
            "version": STATE_VERSION,
            "batches": self.batches,
            "num_workers": self.num_workers,
            "rank": ds.rank,
            "world_size": ds.world_size,
            "seed": ds.seed,
            "batch_size": ds.batch_size,
            "sources": [s.name for s in ds.sources],
            "workers": {str(k): copy.deepcopy(v) for k, v in self.worker_states.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ds = self.dataset
        mine = {
            "num_workers": self.num_workers,
            "world_size": ds.world_size,
            "seed": ds.seed,
            "batch_size": ds.batch_size,
            "sources": [s.name for s in ds.sources],
        }
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if state.get("version") != STATE_VERSION or diff:
            what = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()) or "state version"
            raise ConfigError(
                f"data loader state does not match this run ({what}); resume with the same "
                "data.num_workers, world size, train.seed, data.batch_size and data.sources"
            )
        self.batches = int(state["batches"])
        self.worker_states = {int(k): copy.deepcopy(v) for k, v in state["workers"].items()}

    @property
    def skips(self) -> dict[str, SkipCounter]:
        """Skip counts summed over the workers' last reported states: `NAME` for samples that did
        not become sequences (e.g. corrupt images), `NAME:read` for what the reader dropped (when
        shards split by record rather than by file, every shard parses, and counts, every record)."""
        out: dict[str, SkipCounter] = {}
        for state in self.worker_states.values():
            for name, counts in state["skips"].items():
                out.setdefault(name, SkipCounter(self.dataset.max_skip_rate, name=name)).merge(
                    {"seen": counts["seen"], "counts": counts["counts"], "examples": counts.get("examples", {})}
                )
        return out


def build_dataset(
    cfg: Any, inputs: Inputs, rank: int = 0, world_size: int = 1, with_keys: bool = False
) -> MixtureDataset:
    """The mixture of `inputs.sources` (from `mm1.data.inputs.resolve_inputs`) for this rank."""
    tokenizer = inputs.tokenizer
    if tokenizer is None:
        raise ValueError("build_dataset needs a tokenizer: resolve the inputs with load_tokenizer=True")
    if cfg.model.image_token_id != tokenizer.image_id:
        raise ConfigError(
            f"model.image_token_id={cfg.model.image_token_id} but the tokenizer's <image> id is "
            f"{tokenizer.image_id}; set model.image_token_id={tokenizer.image_id}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    images = ImagePipeline(cfg.model, cfg.data.resize, ReadPolicy.from_config(cfg.data), cfg.data.image_cache_mb)
    builder = DocBuilder(
        tokenizer,
        images,
        cfg.data.seq_len,
        cfg.data.max_images,
        cfg.model.tokens_per_image,
        images.crops,
        cfg.data.synthetic_caption_ratio,
        cfg.train.seed,
        cfg.data.caption_text,
    )
    return MixtureDataset(
        inputs.sources,
        builder,
        cfg.data.batch_size,
        cfg.train.seed,
        rank,
        world_size,
        cfg.data.max_skip_rate,
        with_keys,
    )


def build_loader(cfg: Any, inputs: Inputs, rank: int = 0, world_size: int = 1, with_keys: bool = False) -> Loader:
    """Batches for `cfg.train.stage` on this rank; `with_keys` adds each row's sample ids (tests, debugging)."""
    return Loader(build_dataset(cfg, inputs, rank, world_size, with_keys), cfg.data.num_workers)


__all__ = ["ImagePipeline", "Loader", "build_dataset", "build_loader"]

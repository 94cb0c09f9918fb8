"""The pre-training / SFT mixture: which source each sequence comes from, and where each shard reads.

Every training row is drawn from one source. The choice is a pure function of (seed, shard, row):
a golden-ratio low-discrepancy sequence over the cumulative weights, shuffled within blocks of 100
rows, so shares converge to the weights (error O(log n / n), not O(1/sqrt n)) and nothing about it
needs saving. Each (rank, worker) shard owns a disjoint part of every source's record stream - whole
files when there are enough, else every S-th record - and cycles through epochs in a per-epoch
shuffled file order, each file's records in a seeded per-epoch permutation within blocks of
`data.shuffle_block` (one SFT JSON would otherwise be read in one order by every seed and epoch,
and seed sweeps measured nothing). A stream's resume point is a cursor (epoch, file, record) of the oldest record
still waiting in the packing buffer plus the ids of the waiting pieces: restoring it re-reads at
most the look-ahead window (no image decoding for records already used), so resume is exact and
cheap. The DataLoader side (workers, batches, state) is `mm1.data.loader`.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from mm1.data.formats import open_source
from mm1.data.kinds import KINDS, get_kind
from mm1.data.safety import ReadPolicy
from mm1.data.sequence import Doc, DocBuilder, RowPacker, SampleError, collate
from mm1.data.skips import DataError, SkipCounter

PHI = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass
class SourceSpec:
    """A resolved mixture entry: `path` has `{world}` filled in."""

    name: str
    kind: str
    path: str
    weight: float
    policy: ReadPolicy = ReadPolicy()  # what the data may make mm1 read or run (`mm1.data.safety`)
    shuffle_block: int = 1  # records permuted together within a file (data.shuffle_block); 1 = file order


class MixtureSchedule:
    """Row index -> source index, stateless and deterministic from (seed, shard)."""

    def __init__(self, weights: list[float], seed: int, shard: int, block: int = 100) -> None:
        total = float(sum(weights))
        if total <= 0:
            raise ValueError("mixture weights sum to 0; give at least one source a positive weight")
        acc, self.cum = 0.0, []
        for w in weights:
            acc += w / total
            self.cum.append(acc)
        self.last = max(i for i, w in enumerate(weights) if w > 0)
        self.seed, self.shard, self.block = seed, shard, block
        self.offset = random.Random(f"mixture/{seed}/{shard}").random()
        self._cache: tuple[int, list[int]] = (-1, [])

    def _pick(self, j: int) -> int:
        u = (j * PHI + self.offset) % 1.0
        return min(bisect.bisect_right(self.cum, u), self.last)

    def __call__(self, row: int) -> int:
        b, r = divmod(row, self.block)
        if self._cache[0] != b:
            order = [self._pick(b * self.block + i) for i in range(self.block)]
            random.Random(f"mixture/{self.seed}/{self.shard}/{b}").shuffle(order)
            self._cache = (b, order)
        return self._cache[1][r]


@dataclass
class Entry:
    """A doc waiting in a stream's buffer, with where its record was read (for resume)."""

    seq: int  # index of the record in this shard's stream (across epochs)
    chunk: int  # which piece of the record
    cursor: tuple[int, int, int, int]  # (epoch, file, record in file, record in epoch) before reading it
    doc: Doc
    offset: int = 0  # token offset into the piece: the tail of a piece split to top up a row


class SourceStream:
    """One shard's endless, resumable stream of packed rows from one source."""

    def __init__(
        self,
        spec: SourceSpec,
        builder: DocBuilder,
        packer: RowPacker,
        shard: int,
        num_shards: int,
        seed: int,
        skips: SkipCounter,
        read_skips: SkipCounter | None = None,
    ) -> None:
        """`read_skips` counts what the reader drops (every record it parses, owned or not);
        `skips` counts this shard's own records that fail to become sequences (bad images...)."""
        self.spec, self.builder, self.packer, self.skips = spec, builder, packer, skips
        self.kind = get_kind(spec.kind)  # reads the records, makes the docs, says how they pack
        self.shard, self.num_shards, self.seed = shard, num_shards, seed
        self.reader = open_source(
            spec.kind, spec.path, read_skips if read_skips is not None else SkipCounter(), policy=spec.policy
        )
        self.files = list(self.reader.files)
        if not self.files:
            raise DataError(f"data source {spec.name!r} ({spec.kind}) at {spec.path} has no files")
        n = len(self.files)
        self.by_file = n % num_shards == 0 or n >= 4 * num_shards  # else every S-th record
        self.lookahead = self.kind.lookahead
        self.buffer: list[Entry] = []
        self._files: tuple[int, list[str]] = (-1, [])
        self._seek((0, 0, 0, 0), 0)

    # ------------------------------------------------------------------ records

    def _seek(self, cursor: tuple[int, int, int, int], seq: int) -> None:
        self.epoch, self.file, self.rec, self.glob = cursor
        self.seq = seq
        self._it: Iterator[Any] | None = None
        self._owned_in_epoch = int(self.file > 0 or self.rec > 0)  # resumed mid-epoch: it had records

    def _epoch_files(self) -> list[str]:
        """This shard's files for the current epoch (all shards shuffle the same way per epoch)."""
        if self._files[0] != self.epoch:
            order = list(self.files)
            random.Random(f"files/{self.seed}/{self.spec.name}/{self.epoch}").shuffle(order)
            self._files = (self.epoch, order[self.shard :: self.num_shards] if self.by_file else order)
        return self._files[1]

    def _next_record(self) -> tuple[tuple[int, int, int, int], Any]:
        """(cursor before it, record) of the next record this shard owns; wraps into new epochs."""
        while True:
            files = self._epoch_files()
            if self.file >= len(files):
                if self._owned_in_epoch == 0 and (self.file > 0 or not files):
                    raise DataError(
                        f"data source {self.spec.name!r} at {self.spec.path}: shard {self.shard} of "
                        f"{self.num_shards} got no records in epoch {self.epoch} ({len(self.files)} "
                        "files); use fewer data.num_workers / ranks or split the data into more files"
                    )
                self.epoch, self.file, self.rec, self.glob, self._owned_in_epoch = self.epoch + 1, 0, 0, 0, 0
                continue
            if self._it is None:  # resuming inside a file re-reads (never decodes) the records before
                self._it = self._file_records(files[self.file], self.rec)
            before = (self.epoch, self.file, self.rec, self.glob)
            record = next(self._it, None)
            if record is None:
                self.file, self.rec, self._it = self.file + 1, 0, None
                continue
            self.rec, self.glob = self.rec + 1, self.glob + 1
            if self.by_file or before[3] % self.num_shards == self.shard:
                self._owned_in_epoch += 1
                return before, record

    def _file_records(self, file: str, start: int) -> Iterator[Any]:
        """`file`'s records from the `start`-th of this epoch's order on: each block of
        `shuffle_block` records in a permutation seeded by (seed, source, epoch, file, block), the
        same on every shard. Resuming mid-block re-reads that block's raw records (not decoded)."""
        size = self.spec.shuffle_block
        if size <= 1:
            yield from self.reader.read(file, start)
            return
        first = start - start % size
        records = iter(self.reader.read(file, first, replay=size if start > first else 0))
        block_index, skip = first // size, start - first
        file_index = self.files.index(file)
        while block := list(islice(records, size)):
            order = list(range(len(block)))
            key = f"records/{self.seed}/{self.spec.name}/{self.epoch}/{file_index}/{block_index}"
            random.Random(key).shuffle(order)
            for i in order[skip:]:
                yield block[i]
            block_index, skip = block_index + 1, 0

    def _build(self, record: Any) -> list[Doc]:
        try:
            docs = self.kind.to_docs(self.builder, record)
        except SampleError as e:
            self.skips.skip(e.reason, e.where, str(e))
            return []
        self.skips.ok()
        return docs

    def _refill(self) -> None:
        tries = 0
        while len(self.buffer) < self.lookahead:
            cursor, record = self._next_record()
            seq, self.seq = self.seq, self.seq + 1
            docs = self._build(record)
            self.buffer += [Entry(seq, i, cursor, d) for i, d in enumerate(docs)]
            tries = 0 if docs else tries + 1
            if tries > 10_000:
                raise DataError(f"data source {self.spec.name!r}: 10000 records in a row gave no usable sequence")

    def _split(self, e: Entry, max_tokens: int, max_crops: int) -> tuple[Entry, Entry] | None:
        end = self.builder.prefix_end(e.doc, 0, max_tokens, max_crops // self.builder.crops_per_image)
        head, tail = self.builder.slice(e.doc, 0, end), self.builder.slice(e.doc, end)
        if not (any(head.learn[1:]) and any(tail.learn[1:])):
            return None
        return Entry(e.seq, e.chunk, e.cursor, head, e.offset), Entry(e.seq, e.chunk, e.cursor, tail, e.offset + end)

    def next_row(self) -> list[Entry]:
        split = self._split if self.kind.splittable else None
        return self.packer.fill(self.buffer, lambda e: e.doc, self._refill, split)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        first = min(self.buffer, key=lambda e: e.seq) if self.buffer else None
        cursor = first.cursor if first else (self.epoch, self.file, self.rec, self.glob)
        return {
            "cursor": list(cursor),
            "seq": first.seq if first else self.seq,
            "next_seq": self.seq,
            "pending": [[e.seq, e.chunk, e.offset] for e in self.buffer],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-read from the oldest waiting record to where the stream was; rebuild the waiting pieces."""
        self._seek(tuple(state["cursor"]), int(state["seq"]))  # type: ignore[arg-type]
        wanted = {(int(s), int(c)) for s, c, _ in state["pending"]}
        seqs = {s for s, _ in wanted}
        rebuilt: dict[tuple[int, int], Entry] = {}
        while self.seq < int(state["next_seq"]):
            cursor, record = self._next_record()
            seq, self.seq = self.seq, self.seq + 1
            if seq in seqs:
                for i, doc in enumerate(self.kind.to_docs(self.builder, record)):
                    rebuilt[(seq, i)] = Entry(seq, i, cursor, doc)
        missing = wanted - rebuilt.keys()
        if missing:
            raise DataError(
                f"data source {self.spec.name!r}: cannot rebuild {len(missing)} buffered samples from "
                f"{self.spec.path}; the data changed since the checkpoint was written"
            )
        self.buffer = []
        for s, c, off in state["pending"]:
            e = rebuilt[(int(s), int(c))]
            self.buffer.append(Entry(e.seq, e.chunk, e.cursor, self.builder.slice(e.doc, int(off)), int(off)))


class MixtureDataset(IterableDataset):
    """Yields whole batches (plus their worker's resume state under "_state") for one rank."""

    def __init__(
        self,
        sources: list[SourceSpec],
        builder: DocBuilder,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        max_skip_rate: float = 0.05,
        with_keys: bool = False,
    ) -> None:
        super().__init__()
        for s in sources:
            get_kind(s.kind)  # an unknown kind is a ConfigError naming the registered ones
        self.sources = [s for s in sources if s.weight > 0]
        self.builder, self.batch_size, self.seed = builder, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.max_skip_rate, self.with_keys = max_skip_rate, with_keys
        self.resume: dict[int, dict[str, Any]] = {}  # logical worker -> state to continue from
        self.worker_offset = 0  # DataLoader's worker 0 plays logical worker `offset` (resume order)

    def worker(self) -> tuple[int, int]:
        info = get_worker_info()
        n = info.num_workers if info is not None else 1
        return ((info.id if info is not None else 0) + self.worker_offset) % n, n

    def __iter__(self) -> Iterator[dict[str, Any]]:
        logical, n_workers = self.worker()
        shard, n_shards = self.rank * n_workers + logical, self.world_size * n_workers
        b = self.builder
        # data.max_images bounds a row of interleaved/SFT data (MM1: <= 16 per sequence); a kind
        # that says otherwise (caption pairs) is bounded by seq_len alone
        kind_ids = KINDS.names()  # a batch's `source` column
        packers = {
            s.kind: RowPacker(
                b.seq_len, b.max_images if get_kind(s.kind).images_per_row_bounded else b.seq_len, b.crops_per_image
            )
            for s in self.sources
        }
        skips = {
            f"{s.name}{part}": SkipCounter(self.max_skip_rate, name=f"{s.name}{part} (shard {shard})")
            for s in self.sources
            for part in ("", ":read")
        }
        streams = [
            SourceStream(s, b, packers[s.kind], shard, n_shards, self.seed, skips[s.name], skips[f"{s.name}:read"])
            for s in self.sources
        ]
        schedule = MixtureSchedule([s.weight for s in self.sources], self.seed, shard)
        row = 0
        state = self.resume.get(logical)
        if state is not None:
            row = int(state["rows"])
            for s, stream in zip(self.sources, streams):
                stream.load_state_dict(state["sources"][s.name])
            for name, counter in skips.items():
                counter.load_state_dict(state["skips"][name])  # the re-read above counted again
        while True:
            rows, source_ids, keys = [], [], []
            for _ in range(self.batch_size):
                i = schedule(row)
                row += 1
                entries = streams[i].next_row()
                rows.append([e.doc for e in entries])
                source_ids.append(kind_ids.index(self.sources[i].kind))
                keys.append([f"{e.doc.key}|{e.cursor[0]}|{e.chunk}.{e.offset}" for e in entries])
            batch: dict[str, Any] = collate(
                rows, b.seq_len, b.tokenizer.pad_id, b.tokenizer.image_id, source_ids, getattr(b.images, "size", 1)
            )
            if self.with_keys:
                batch["keys"] = keys
            batch["_state"] = {
                "worker": logical,
                "rows": row,
                "sources": {s.name: st.state_dict() for s, st in zip(self.sources, streams)},
                "skips": {name: c.state_dict() for name, c in skips.items()},
            }
            yield batch


__all__ = ["MixtureDataset", "MixtureSchedule", "SourceSpec", "SourceStream"]

"""Caption pairs from WebDataset tar shards (img2dataset layout), damage included.

A local shard is opened as a regular file by its absolute path; only a source the config opted into
(`data.allow_commands=true`) goes through WebDataset's `gopen` (`pipe:CMD`, or an http(s) URL
through curl). WebDataset groups members into samples by key (`group_by_keys`, the rule img2dataset writes by:
`KEY.jpg` + `KEY.txt` + `KEY.json`). The member loop itself is ours, for one reason: Python's tar
stream reader ends *silently* when it meets a damaged member header or a shard cut short at a member
boundary, so a half-uploaded shard would look like a small healthy one. We keep the last bytes read
and check that iteration stopped on the end-of-archive marker (a zero block); if not, the shard is
counted as truncated / broken in the `SkipCounter` and the samples read before the damage are kept.
A `.tar.gz` is decompressed by us (gzip) and then read like a plain tar, so the same check applies.
A member larger than `data.max_member_bytes` (a sparse member can claim 20 GiB in 10 KB) is never
read: its sample is skipped and counted.
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys

from mm1.data.safety import ReadPolicy, is_stream, open_regular, stream_allowed
from mm1.data.skips import Tally

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
_BLOCK = tarfile.BLOCKSIZE


@dataclass
class _Damage:
    """Where a shard stopped delivering: `read` is the share of its bytes on disk read by then (None
    for a stream of unknown length)."""

    reason: str
    where: str
    detail: str
    read: float | None


class ShardSizes:
    """Samples per complete shard of one source: the estimate of what a shard cut short held."""

    def __init__(self) -> None:
        self.largest = 0

    def record(self, samples: int) -> None:
        self.largest = max(self.largest, samples)


@dataclass(frozen=True)
class Oversized:
    """Stands in for a member that was not read: over `data.max_member_bytes`, or out of memory."""

    name: str
    size: int
    limit: int


class _TailKeeper:
    """A read-only stream wrapper that remembers the last `keep` bytes and the absolute offset."""

    def __init__(self, raw: Any, keep: int = 1 << 16) -> None:
        self.raw, self.keep, self.pos = raw, keep, 0
        self.tail = bytearray()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n) if n is not None and n >= 0 else self.raw.read()
        self.pos += len(data)
        self.tail += data
        if len(self.tail) > 2 * self.keep:  # amortised O(1) per byte
            del self.tail[: len(self.tail) - self.keep]
        return data

    def block_at(self, offset: int) -> bytes | None:
        """The (up to) 512 bytes read at `offset`, or None if they are no longer kept."""
        start = self.pos - len(self.tail)
        if offset < start:
            return None
        return bytes(self.tail[offset - start : offset - start + _BLOCK])


def _open(url: str, policy: ReadPolicy) -> Any:
    if is_stream(url):
        stream_allowed(url, policy)  # checked when the source was opened too; a reader never trusts its caller
        return gopen(url)
    return open_regular(url)


def _members(url: str, policy: ReadPolicy, damage: list[_Damage]) -> Iterator[dict[str, Any]]:
    """Regular members of one shard as WebDataset file samples, then the `{}` end-of-shard marker;
    where the shard stops short of its end-of-archive marker is appended to `damage`."""
    compressed = url.endswith((".gz", ".tgz"))
    stream = keeper = None

    def lost(reason: str, where: str, detail: str, offset: int | None = None) -> None:
        pos = offset if offset is not None else keeper.pos if keeper is not None else 0
        end = _content_end(keeper) if compressed and keeper is not None else _size(stream)
        damage.append(_Damage(reason, where, detail, min(1.0, pos / end) if end else None))

    try:
        stream = _open(url, policy)
        keeper = _TailKeeper(gzip.GzipFile(fileobj=stream, mode="rb") if compressed else stream)
        tar = tarfile.open(fileobj=keeper, mode="r|")  # type: ignore[call-overload]
        while (info := tar.next()) is not None:
            if not info.isreg() or info.name.startswith("__"):
                continue
            data: bytes | Oversized = Oversized(info.name, info.size, policy.max_member_bytes)
            if info.size <= policy.max_member_bytes:
                member = tar.extractfile(info)
                try:
                    data = member.read() if member is not None else b""
                except MemoryError:
                    pass  # counted as oversized; `tar.next()` skips the rest of it
            yield {"fname": info.name, "data": data, "__url__": url}
            tar.members = []  # stream mode: do not accumulate TarInfo objects
        block = keeper.block_at(tar.offset)
        if block is not None:
            if len(block) < _BLOCK:
                lost(
                    "truncated tar",
                    f"{url}:byte {tar.offset}",
                    "the shard ends mid-archive (no end-of-archive marker); the rest of it is lost",
                    tar.offset,
                )
            elif block.count(0) != _BLOCK:
                lost(
                    "broken tar member",
                    f"{url}:byte {tar.offset}",
                    "damaged member header; the rest of the shard is lost",
                    tar.offset,
                )
    except (tarfile.ReadError, EOFError, zlib.error) as e:
        if "empty file" in str(e):  # nothing came at all, e.g. a pipe: command that failed
            lost("unreadable shard", url, f"{e}: the source produced no data")
        elif "unexpected end" in str(e) or isinstance(e, EOFError):
            lost("truncated tar", url, f"{e}; the rest of the shard is lost")
        else:
            lost("broken tar member", url, f"{e}; the rest of the shard is lost")
    except (tarfile.TarError, OSError, ValueError) as e:  # missing file, failed pipe/curl, bad header, a FIFO
        lost("unreadable shard", url, str(e))
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a failed pipe reports its exit status on close; already counted
                pass
    yield {}


def read_caption_tar(
    url: str, t: Tally, policy: ReadPolicy = ReadPolicy(), sizes: ShardSizes | None = None
) -> Iterator[tuple[str, str, bytes, str, str | None, str | None]]:
    """(key, where, image bytes, caption, dense caption or None, tags or None) per good sample of one shard.

    A shard that stops short counts every sample it could not deliver (`_lost_samples`), so that
    `data.max_skip_rate` sees a half-uploaded shard as the hundreds of samples it lost, not as one."""
    first, damage = t.reported, []
    sizes = sizes if sizes is not None else ShardSizes()

    def handler(exn: Exception) -> bool:  # group_by_keys: e.g. a duplicate member name
        t.skip("duplicate tar member", url, str(exn.args[0]) if exn.args else repr(exn))
        return True

    for sample in group_by_keys(_members(url, policy, damage), handler=handler):
        key = str(sample["__key__"])
        where = f"{url}:{key}"
        item = caption_from_members(sample, where, t)
        if item is not None:
            t.ok()
            yield (key, where, *item)
    delivered = t.reported - first  # good and skipped samples of this shard
    if not damage:
        sizes.record(delivered)
    for d in damage:
        n, how = _lost_samples(url, delivered, d.read, sizes.largest)
        t.skip(d.reason, d.where, f"{d.detail}; {n} sample{'s' * (n != 1)} lost ({how})", n)


def _lost_samples(url: str, delivered: int, read: float | None, typical: int) -> tuple[int, str]:
    """(samples lost, how that was known) for a shard that delivered `delivered` samples."""
    index = _index_count(url)
    if index is not None:
        return max(1, index - delivered), f"its index says {index}, {delivered} were read"
    if read is not None and 0 < read < 1 and delivered:
        return max(1, round(delivered * (1 - read) / read)), (
            f"estimated from the byte offset: {delivered} samples in the first {read:.0%} of the file"
        )
    if typical > delivered:
        return typical - delivered, f"estimated: the largest complete shard of this source held {typical}"
    return 1, (
        "how many is unknown (no index file, nothing after the damage, no complete shard to compare): counted as 1"
    )


def _index_count(url: str) -> int | None:
    """Samples the shard held when written, from img2dataset's `{shard}_stats.json` ("successes")."""
    if is_stream(url):
        return None
    stem = url[: -len(".tar.gz")] if url.endswith(".tar.gz") else url.rsplit(".", 1)[0]
    try:
        with open_regular(f"{stem}_stats.json") as f:
            count = json.loads(f.read(1 << 20)).get("successes")
    except (OSError, ValueError, AttributeError):
        return None
    return count if isinstance(count, int) and count >= 0 else None


def _content_end(keeper: _TailKeeper) -> int | None:
    """Decompressed bytes of a `.tar.gz` up to its last non-zero byte: the rest is read (and
    dropped) after the damage, which costs time only for a damaged shard."""
    end = keeper.pos
    try:
        while chunk := keeper.raw.read(1 << 20):
            stripped = len(chunk.rstrip(b"\0"))
            end = keeper.pos + stripped if stripped else end
            keeper.pos += len(chunk)
    except (OSError, EOFError, zlib.error):
        pass
    return end or None


def _size(stream: Any) -> int | None:
    """Bytes of a local shard up to its last non-zero byte (a tar ends in zero blocks padded to a
    10 KiB record, which would make a byte-offset estimate of the lost samples too high)."""
    try:
        fd = stream.fileno()
        size = os.fstat(fd).st_size
        tail = os.pread(fd, min(size, 2 * tarfile.RECORDSIZE), max(0, size - 2 * tarfile.RECORDSIZE))
    except (AttributeError, OSError, ValueError, TypeError):
        return None
    return (size - len(tail) + len(tail.rstrip(b"\0"))) or None


def caption_from_members(
    sample: dict[str, Any], where: str, t: Tally
) -> tuple[bytes, str, str | None, str | None] | None:
    """Validate one grouped sample; count and return None if it is unusable."""
    big = next((v for v in sample.values() if isinstance(v, Oversized)), None)
    if big is not None:
        t.skip(
            "member too large",
            where,
            f"{big.name} is {big.size} bytes, over data.max_member_bytes={big.limit}; "
            "not read (raise the limit if such members are real)",
        )
        return None
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    if image is None:
        found = sorted(k for k in sample if not k.startswith("__"))
        t.skip("missing image", where, f"no .jpg/.jpeg/.png/.webp member (found: {', '.join(found) or 'nothing'})")
        return None
    if not image:
        t.skip("corrupt image", where, "the image member is empty (0 bytes)")
        return None
    meta: Any = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as e:
            t.skip("malformed json", where, f"KEY.json is not valid JSON: {e}")
            return None
        if not isinstance(meta, dict):
            t.skip("malformed json", where, "KEY.json must hold a JSON object")
            return None
    caption: Any
    if "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            t.skip("undecodable caption", where, f"KEY.txt is not UTF-8: {e}")
            return None
    else:  # img2dataset also stores the caption in the json
        caption = meta.get("caption", meta.get("alt"))
        if caption is None:
            t.skip("missing caption", where, "no KEY.txt member and no 'caption' in KEY.json")
            return None
    return check_caption(caption, meta.get("dense"), where, t, image, meta.get("tags"))


def check_caption(
    caption: Any, dense: Any, where: str, t: Tally, image: Any, tags: Any = None
) -> tuple[Any, str, str | None, str | None] | None:
    """(image, stripped caption, dense or None, tags or None), or None after counting a non-string/empty
    caption. Tags (image-level labels, a list of strings) become one space-separated string; tags that
    are absent or not a list of strings are None here, and only a run that trains on them
    (`data.caption_text=tags`) counts such a sample as a skip."""
    if not isinstance(caption, str):
        t.skip("non-string caption", where, f"caption is {type(caption).__name__}, expected a string")
        return None
    caption = caption.strip()
    if not caption:
        t.skip("empty caption", where)
        return None
    dense = dense.strip() if isinstance(dense, str) and dense.strip() else None
    return image, caption, dense, tag_text(tags)


def tag_text(tags: Any) -> str | None:
    """Image-level labels (["heart", "hexagon"]) as the text a caption objective reads ("heart hexagon")."""
    if not isinstance(tags, list) or not all(isinstance(x, str) for x in tags):
        return None
    words = [x.strip() for x in tags if x.strip()]
    return " ".join(words) or None

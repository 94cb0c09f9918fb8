"""Caption pairs from WebDataset tar shards (img2dataset layout), damage included.

WebDataset opens the shard (`gopen`: a local path, `file:`, `pipe:CMD`, or an http(s) URL through
curl) and groups members into samples by key (`group_by_keys`, the rule img2dataset writes by:
`KEY.jpg` + `KEY.txt` + `KEY.json`). The member loop itself is ours, for one reason: Python's tar
stream reader ends *silently* when it meets a damaged member header or a shard cut short at a member
boundary, so a half-uploaded shard would look like a small healthy one. We keep the last bytes read
and check that iteration stopped on the end-of-archive marker (a zero block); if not, the shard is
counted as truncated / broken in the `SkipCounter` and the samples read before the damage are kept.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from typing import Any, Iterator, Protocol

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample has several
_BLOCK = tarfile.BLOCKSIZE


class Tally(Protocol):
    def ok(self) -> None: ...
    def skip(self, reason: str, where: str, detail: str = "") -> None: ...


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
        return bytes(self.tail[offset - start: offset - start + _BLOCK])


def _members(url: str, t: Tally) -> Iterator[dict[str, Any]]:
    """Regular members of one shard as WebDataset file samples, then the `{}` end-of-shard marker."""
    compressed = url.endswith((".gz", ".tgz"))
    stream = None
    try:
        stream = gopen(url)
        keeper = _TailKeeper(stream)
        tar = tarfile.open(fileobj=keeper, mode="r|gz" if compressed else "r|")  # type: ignore[call-overload]
        while (info := tar.next()) is not None:
            if not info.isreg() or info.name.startswith("__"):
                continue
            member = tar.extractfile(info)
            data = member.read() if member is not None else b""
            yield {"fname": info.name, "data": data, "__url__": url}
            tar.members = []  # stream mode: do not accumulate TarInfo objects
        if not compressed:
            block = keeper.block_at(tar.offset)
            if block is not None and len(block) < _BLOCK:
                t.skip("truncated tar", f"{url}:byte {tar.offset}",
                       "the shard ends mid-archive (no end-of-archive marker); the rest of it is lost")
            elif block is not None and block.count(0) != _BLOCK:
                t.skip("broken tar member", f"{url}:byte {tar.offset}",
                       "damaged member header; the rest of the shard is lost")
    except (tarfile.ReadError, EOFError, zlib.error) as e:
        if "empty file" in str(e):  # nothing came at all, e.g. a pipe: command that failed
            t.skip("unreadable shard", url, f"{e}: the source produced no data")
        elif "unexpected end" in str(e) or isinstance(e, EOFError):
            t.skip("truncated tar", url, f"{e}; the rest of the shard is lost")
        else:
            t.skip("broken tar member", url, f"{e}; the rest of the shard is lost")
    except (tarfile.TarError, OSError, ValueError) as e:  # missing file, failed pipe/curl, bad header
        t.skip("unreadable shard", url, str(e))
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # a failed pipe reports its exit status on close; already counted
                pass
    yield {}


def read_caption_tar(url: str, t: Tally) -> Iterator[tuple[str, str, bytes, str, str | None]]:
    """(key, where, image bytes, caption, dense caption or None) per good sample of one shard."""

    def handler(exn: Exception) -> bool:  # group_by_keys: e.g. a duplicate member name
        t.skip("duplicate tar member", url, str(exn.args[0]) if exn.args else repr(exn))
        return True

    for sample in group_by_keys(_members(url, t), handler=handler):
        key = str(sample["__key__"])
        where = f"{url}:{key}"
        item = caption_from_members(sample, where, t)
        if item is not None:
            t.ok()
            yield (key, where, *item)


def caption_from_members(sample: dict[str, Any], where: str,
                         t: Tally) -> tuple[bytes, str, str | None] | None:
    """Validate one grouped sample; count and return None if it is unusable."""
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
    return check_caption(caption, meta.get("dense"), where, t, image)


def check_caption(caption: Any, dense: Any, where: str, t: Tally, image: Any) -> tuple[Any, str, str | None] | None:
    """(image, stripped caption, dense or None), or None after counting a non-string/empty caption."""
    if not isinstance(caption, str):
        t.skip("non-string caption", where, f"caption is {type(caption).__name__}, expected a string")
        return None
    caption = caption.strip()
    if not caption:
        t.skip("empty caption", where)
        return None
    dense = dense.strip() if isinstance(dense, str) and dense.strip() else None
    return image, caption, dense

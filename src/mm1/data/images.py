"""Image decoding and preprocessing, run per sample in loader workers.

Web images come in every mode Pillow knows: palettes with a transparent colour, 16-bit greyscale
scans, CMYK JPEGs from print pipelines, camera photos whose pixels are stored sideways with an EXIF
orientation tag, and the occasional decompression bomb. `load_image` turns all of them into an
upright 8-bit RGB image (transparency composited on white, as a browser shows it) or raises
`ImageError` with a `reason` the loader can count in its `SkipCounter`. Only the raster decoders in
`data.image_formats` are tried (JPEG, PNG, WEBP by default): bytes named `.png` that are really EPS
would otherwise make Pillow start Ghostscript, which runs PostScript. Files and byte strings over
`data.max_member_bytes` are refused before decoding; a FIFO is refused without blocking.

`preprocess` is the encoder's view of an image: resize the shorter side (bicubic) + centre crop, or
pad to square with the mean colour, then normalise with the encoder's mean/std. `subimages` is the
high-resolution path (MM1 section 3.4 / LLaVA-NeXT): a g x g grid of crops of an image resized to
g*size, plus one overview of the whole image (MM1: 1344 px -> 4 x 672 px + overview).

Speed: the resize reads only the pixels it needs (Pillow's `box=`), JPEGs are decoded at a reduced
DCT scale when much larger than needed (`draft_size`), and normalisation is one NumPy pass.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mm1.data.safety import DEFAULT_IMAGE_FORMATS, DEFAULT_MAX_MEMBER_BYTES, open_regular
from mm1.data.skips import DataError

MAX_PIXELS = 64 * 1024 * 1024  # 67 Mpx (8192 x 8192); larger images are refused as likely bombs
REDUCING_GAP = 3.0  # Pillow's two-step downscale; indistinguishable from exact bicubic, much faster
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


class ImageError(DataError):
    """An image could not be used; `reason` is the short phrase to count the skip under, `where`
    the sample it belongs to."""

    def __init__(self, reason: str, message: str, where: str = "") -> None:
        super().__init__(message)
        self.reason, self.where = reason, where


def load_image(
    src: bytes | str | Path,
    where: str = "",
    *,
    max_pixels: int = MAX_PIXELS,
    draft_size: int | None = None,
    formats: Sequence[str] = DEFAULT_IMAGE_FORMATS,
    max_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Image.Image:
    """Decode `src` (encoded bytes or a file path) into an upright 8-bit RGB image.

    `where` names the sample in error messages (e.g. "shard-00003.tar:000123"). `draft_size` lets a
    JPEG decode at 1/2, 1/4 or 1/8 scale as long as both sides stay >= draft_size (pass the final
    resolution). Images over `max_pixels` pixels are refused before any pixel is decoded, and so are
    `src` over `max_bytes` bytes and formats not in `formats` (Pillow format names).
    """
    too_big = f"over data.max_member_bytes={max_bytes}; not decoded (raise the limit if such images are real)"
    if isinstance(src, (bytes, bytearray, memoryview)):
        where = where or "<image bytes>"
        if len(src) > max_bytes:
            raise ImageError("image too large", f"{where}: image is {len(src)} bytes, {too_big}", where)
        try:
            return _decode(io.BytesIO(src), where, max_pixels, draft_size, formats)
        except ImageError as e:
            e.where = where
            raise
    path = Path(src)
    where = where or str(path)
    if not path.exists():
        raise ImageError("missing image file", f"{where}: image file {path} does not exist", where)
    try:
        with open_regular(str(path)) as fp:
            size = os.fstat(fp.fileno()).st_size
            if size > max_bytes:
                raise ImageError("image too large", f"{where}: {path} is {size} bytes, {too_big}", where)
            return _decode(fp, where, max_pixels, draft_size, formats)
    except ImageError as e:
        e.where = where
        raise
    except (OSError, DataError) as e:  # unreadable, or not a regular file (a FIFO would block)
        raise ImageError("unreadable image file", f"{where}: cannot read {path}: {e}", where) from None


def _decode(fp: Any, where: str, max_pixels: int, draft_size: int | None, formats: Sequence[str]) -> Image.Image:
    bomb_msg = (
        f"{where}: image has too many pixels (likely a decompression bomb); the limit is "
        f"{max_pixels} pixels (mm1.data.images.MAX_PIXELS) and Pillow's Image.MAX_IMAGE_PIXELS="
        f"{Image.MAX_IMAGE_PIXELS}"
    )
    try:
        with warnings.catch_warnings():  # Pillow only warns between 1x and 2x its own limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=list(formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("image too large", f"{bomb_msg} ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(
            "corrupt image",
            f"{where}: not a readable image (a damaged header, or a format outside data.image_formats={list(formats)})",
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError("corrupt image", f"{where}: cannot open image: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError("image too large", f"{bomb_msg}; this one is {w}x{h}")
    try:
        if draft_size and img.format == "JPEG" and min(w, h) >= 2 * draft_size:
            img.draft(None, (draft_size, draft_size))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
        return to_rgb(img)
    except ImageError:
        raise
    except Exception as e:  # truncated data, bad CRC, broken Huffman tables... Pillow raises many types
        raise ImageError("corrupt image", f"{where}: cannot decode image ({type(e).__name__}: {e})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparent pixels become white, >8-bit depths are scaled."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _HIGH_DEPTH_MODES:  # checked first: a tRNS key on 16-bit grey is rare and ignored
        return Image.fromarray(_to_uint8(np.asarray(img)), "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)  # alpha band as the mask: composite on white
        return out
    try:
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, HSV
    except ValueError as e:
        raise ImageError("unsupported image mode", f"cannot convert image mode {mode} to RGB: {e}") from None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a 16/32-bit integer or float greyscale array to uint8 by its nominal range."""
    if arr.dtype.kind == "f":
        peak = float(np.nanmax(arr)) if arr.size else 0.0
        arr = np.nan_to_num(arr) * (255.0 if peak <= 1.0 else 1.0)
        return np.clip(arr, 0, 255).astype(np.uint8)
    peak = int(arr.max()) if arr.size else 0
    if peak <= 255:
        return np.clip(arr, 0, 255).astype(np.uint8)
    if peak <= 65535:  # 16-bit data (PNG I;16, or stored as 32-bit I)
        return (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    return (np.clip(arr, 0, None).astype(np.float64) * (255.0 / peak)).astype(np.uint8)


def mean_color(mean: Sequence[float]) -> tuple[int, int, int]:
    """The encoder's mean as an 8-bit RGB colour (the padding colour; normalises to ~0)."""
    r, g, b = (int(round(float(m) * 255)) for m in mean)
    return r, g, b


def to_square(img: Image.Image, size: int, resize: str = "crop", fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """`size` x `size`: shorter side to `size` + centre crop ("crop"), or longer side to `size` and
    centred on a `fill` canvas ("pad"; same as padding to square first, without the big canvas)."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    if resize == "crop":
        s = min(w, h)
        left, top = (w - s) / 2, (h - s) / 2
        return img.resize(
            (size, size), Image.Resampling.BICUBIC, box=(left, top, left + s, top + s), reducing_gap=REDUCING_GAP
        )
    if resize == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        small = img if (nw, nh) == (w, h) else img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP)
        canvas = Image.new("RGB", (size, size), fill)
        canvas.paste(small, ((size - nw) // 2, (size - nh) // 2))
        return canvas
    raise ValueError(f"data.resize={resize!r}: must be 'crop' or 'pad'")


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """x_norm = (x/255 - mean)/std = x * scale - shift, per channel, shaped [3, 1, 1]."""
    m = np.asarray(mean, np.float32).reshape(3, 1, 1)
    s = np.asarray(std, np.float32).reshape(3, 1, 1)
    return 1.0 / (255.0 * s), m / s


def normalize(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W], normalised; one conversion pass plus two in-place ops."""
    scale, shift = _affine(tuple(float(m) for m in mean), tuple(float(s) for s in std))
    x = np.asarray(img).transpose(2, 0, 1).astype(np.float32, order="C")  # [3, H, W]
    x *= scale
    x -= shift
    return torch.from_numpy(x)


def preprocess(
    img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float], resize: str = "crop"
) -> torch.Tensor:
    """RGB image -> normalised float tensor [3, size, size] (crop or pad with the mean colour)."""
    if img.mode != "RGB":
        img = to_rgb(img)
    return normalize(to_square(img, size, resize, mean_color(mean)), mean, std)


def subimages(
    img: Image.Image,
    grid: int,
    size: int,
    overview_first: bool = False,
    resize: str = "crop",
    fill: tuple[int, int, int] = (0, 0, 0),
) -> list[Image.Image]:
    """g*g crops (row-major) of the image made square at g*size, plus one overview at `size`
    (after the crops unless `overview_first`). grid=2, size=672: 4 crops of 672 px + overview."""
    if grid < 1:
        raise ValueError(f"model.subimage_grid={grid}: needs >= 1 for sub-image splitting")
    if img.mode != "RGB":
        img = to_rgb(img)
    big = to_square(img, grid * size, resize, fill)
    tiles = [big.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(grid) for c in range(grid)]
    overview = to_square(img, size, resize, fill)  # from the original: one resampling, not two
    return [overview, *tiles] if overview_first else [*tiles, overview]


def image_tensors(
    src: bytes | str | Path,
    where: str,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize: str = "crop",
    grid: int = 0,
    overview_first: bool = False,
    max_pixels: int = MAX_PIXELS,
    formats: Sequence[str] = DEFAULT_IMAGE_FORMATS,
    max_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> torch.Tensor:
    """Decode + preprocess one image into the crops its `<image>` slots take:
    [1, 3, size, size], or [grid*grid + 1, 3, size, size] at high resolution."""
    img = load_image(
        src, where, max_pixels=max_pixels, draft_size=size * max(grid, 1), formats=formats, max_bytes=max_bytes
    )
    if grid:
        crops = subimages(img, grid, size, overview_first, resize, mean_color(mean))
        return torch.stack([normalize(c, mean, std) for c in crops])  # [g*g+1, 3, S, S]
    return preprocess(img, size, mean, std, resize).unsqueeze(0)  # [1, 3, S, S]

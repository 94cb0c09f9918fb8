"""`data.image_cache_mb`: decoded images kept in memory give the same crops, bounded, failures never kept."""

from __future__ import annotations

import io
import os

import pytest
import torch
from PIL import Image

import mm1.data.loader as loader
from mm1.config import load_config
from mm1.data.loader import ImagePipeline
from mm1.data.sequence import SampleError

CROP_BYTES = 3 * 32 * 32 * 4  # one [3, 32, 32] float32 crop


def png(colour: str, size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


def model():  # noqa: ANN201  (the tiny preset's model config at 32 px)
    return load_config("configs/tiny.yaml", ["model.vision.image_size=32", "model.vision.patch_size=8"]).model


def pipeline(cache_mb: float, monkeypatch: pytest.MonkeyPatch) -> tuple[ImagePipeline, list[str]]:
    """A 32 px pipeline whose decodes are recorded (by the `where` each was asked for)."""
    pipe = ImagePipeline(model())
    pipe.cache_limit = int(cache_mb * 2**20)
    decoded: list[str] = []
    real = loader.image_tensors

    def counting(raw, where, *args, **kwargs):  # noqa: ANN001, ANN202  (the wrapped function's signature)
        decoded.append(where)
        return real(raw, where, *args, **kwargs)

    monkeypatch.setattr(loader, "image_tensors", counting)
    return pipe, decoded


def test_a_cached_image_gives_the_same_crops_without_decoding_again(monkeypatch, tmp_path):
    red, blue = png("red"), png("blue")
    want = ImagePipeline(model())(red, "reference")[0]  # no cache
    pipe, decoded = pipeline(1, monkeypatch)
    first = pipe(red, "a")
    first[0].fill_(7.0)  # what a caller does to its crops never reaches the cache
    again = pipe(red, "a again")
    assert decoded == ["a"]
    torch.testing.assert_close(again[0], want)
    assert not torch.equal(pipe(blue, "b")[0], want) and decoded == ["a", "b"]
    path = tmp_path / "x.png"  # a file is keyed by path, size and mtime: a rewritten file is decoded again
    path.write_bytes(red)
    pipe(str(path), "file")
    torch.testing.assert_close(pipe(str(path), "file again")[0], want)
    path.write_bytes(blue)
    os.utime(path, ns=(1, 1))
    assert not torch.equal(pipe(str(path), "rewritten")[0], want)
    assert decoded == ["a", "b", "file", "rewritten"]


def test_the_cache_keeps_the_most_recently_used_images_within_its_limit(monkeypatch):
    pipe, decoded = pipeline(2.5 * CROP_BYTES / 2**20, monkeypatch)  # room for two images
    images = {c: png(c) for c in ("red", "green", "blue")}
    for c in ("red", "green", "red", "blue"):  # blue pushes out green, the least recently used
        pipe(images[c], c)
    assert pipe.cache_bytes == 2 * CROP_BYTES <= pipe.cache_limit and len(pipe.cache) == 2
    pipe(images["red"], "red kept")
    pipe(images["green"], "green evicted")
    assert decoded == ["red", "green", "blue", "green evicted"]


def test_a_broken_image_is_never_cached_and_fails_every_time(monkeypatch):
    pipe, decoded = pipeline(1, monkeypatch)
    for attempt in ("first", "second"):
        with pytest.raises(SampleError, match=attempt):
            pipe(b"\x89PNG\r\n\x1a\n not an image", attempt)
    assert decoded == ["first", "second"] and not pipe.cache


def test_the_tiny_preset_caches_and_a_negative_size_is_refused():
    assert load_config("configs/tiny.yaml").data.image_cache_mb > 0
    with pytest.raises(ValueError, match="data.image_cache_mb"):
        load_config("configs/tiny.yaml", ["data.image_cache_mb=-1"])

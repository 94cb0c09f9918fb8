"""Image decoding (every Pillow mode -> upright RGB), preprocessing and sub-image splitting."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mm1.config import CLIP_MEAN, CLIP_STD
from mm1.data.images import ImageError, image_tensors, load_image, mean_color, preprocess, subimages, to_square


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def normalised(rgb, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(mean)) / torch.tensor(std)


# ----------------------------------------------------------------------------- modes


def test_transparent_rgba_pixels_are_composited_on_white():
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 255  # red everywhere
    arr[:2, :, 3] = 0  # top half fully transparent
    arr[2:, :, 3] = 255
    img = load_image(encode(Image.fromarray(arr, "RGBA")), "rgba")
    assert img.mode == "RGB"
    out = np.asarray(img)
    assert (out[:2] == 255).all()  # white, not black and not red
    assert (out[2:] == [255, 0, 0]).all()


def test_half_transparent_grey_with_alpha_blends_towards_white():
    la = Image.fromarray(np.stack([np.zeros((2, 2), np.uint8), np.full((2, 2), 128, np.uint8)], -1), "LA")
    out = np.asarray(load_image(encode(la), "la"))
    assert out.shape == (2, 2, 3) and np.all(np.abs(out.astype(int) - 127) <= 2)


def test_palette_image_with_transparent_index_becomes_white_there():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 255] + [10, 200, 10] + [0, 0, 0] * 254)  # 0 = blue, 1 = green
    img.putpixel((0, 0), 1)
    data = encode(img, transparency=0)  # blue is the transparent colour
    decoded = Image.open(io.BytesIO(data))
    assert decoded.mode == "P" and "transparency" in decoded.info  # the file really has a tRNS chunk
    out = np.asarray(load_image(data, "p"))
    assert tuple(out[0, 0]) == (10, 200, 10)
    assert (out[1:, :] == 255).all()


def test_plain_palette_greyscale_and_one_bit_images_become_rgb():
    pal = Image.new("P", (3, 3), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert tuple(np.asarray(load_image(encode(pal), "p"))[1, 1]) == (200, 100, 50)
    grey = Image.fromarray(np.full((3, 3), 77, np.uint8), "L")
    assert (np.asarray(load_image(encode(grey), "l")) == 77).all()
    bits = Image.new("1", (8, 8), 0)
    bits.putpixel((3, 3), 1)
    out = np.asarray(load_image(encode(bits), "1"))
    assert out.shape == (8, 8, 3) and tuple(out[3, 3]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 0)


def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped():
    arr = np.array([[0, 257 * 128, 65535, 1000]], np.uint16)
    data = encode(Image.fromarray(arr))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really decoded as a >8-bit mode
    out = np.asarray(load_image(data, "16bit"))[0, :, 0]
    assert out.tolist() == [0, 128, 255, 3]  # clipping would have made 1000 -> 255


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    r, g, b = np.asarray(load_image(data, "cmyk"))[8, 8].astype(int)
    assert r > 240 and g < 15 and b < 15


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # stored: left half white, right half black, 40 wide x 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())
    img = load_image(data, "exif")
    assert img.size == (20, 40)  # upright: portrait
    out = np.asarray(img).mean(axis=(1, 2))
    assert out[:15].mean() > 200 and out[-15:].mean() < 50  # the white half is now on top


# ----------------------------------------------------------------------------- bad images


def test_truncated_png_raises_image_error_naming_the_sample():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageError) as info:
        load_image(data[: len(data) // 2], "shard-00001.tar:000042")
    assert info.value.reason == "corrupt image" and "shard-00001.tar:000042" in str(info.value)
    assert info.value.where == "shard-00001.tar:000042"
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"<html>404 not found</html>", "x")


def test_missing_image_file_is_an_image_error_with_its_own_reason(tmp_path):
    with pytest.raises(ImageError) as info:
        load_image(tmp_path / "nope.png", "sft.json:[3]")
    assert info.value.reason == "missing image file" and "nope.png" in str(info.value)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, followed by a tiny IDAT: a decompression-bomb header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10_000, 40_000])  # between Pillow's 1x and 2x limit (a warning), and past 2x
def test_decompression_bomb_header_is_refused_before_decoding(side):
    with pytest.raises(ImageError) as info:
        load_image(_png_header_only(side, side), "bomb.png")
    assert info.value.reason == "image too large"
    assert "bomb.png" in str(info.value) and "limit" in str(info.value)


def test_pixel_limit_is_configurable():
    data = encode(Image.new("RGB", (20, 20)))
    with pytest.raises(ImageError, match="400|20x20"):
        load_image(data, "small", max_pixels=399)
    assert load_image(data, "small", max_pixels=400).size == (20, 20)


def test_large_jpeg_is_decoded_at_reduced_scale_but_never_below_the_request():
    data = encode(Image.new("RGB", (800, 600), (10, 20, 30)), "JPEG")
    img = load_image(data, "big", draft_size=100)
    assert 100 <= min(img.size) and img.size[0] < 800
    assert load_image(data, "big").size == (800, 600)


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_normalises_with_the_encoders_mean_and_std():
    arr = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    x = preprocess(Image.fromarray(arr), 8, CLIP_MEAN, CLIP_STD)  # already square: no resampling
    expect = normalised(arr).permute(2, 0, 1)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and x.is_contiguous()
    torch.testing.assert_close(x, expect, atol=1e-5, rtol=1e-5)


def test_crop_resizes_the_shorter_side_and_keeps_the_centre():
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:40] = (0, 255, 0)
    arr[:, 40:] = (0, 0, 255)
    x = preprocess(Image.fromarray(arr), 10, CLIP_MEAN, CLIP_STD, resize="crop")
    assert x.shape == (3, 10, 10)
    torch.testing.assert_close(x[:, 5, 5], normalised((0, 255, 0)), atol=0.03, rtol=0)
    torch.testing.assert_close(x[:, 1:-1, 1:-1].mean((1, 2)), normalised((0, 255, 0)), atol=0.03, rtol=0)


def test_pad_keeps_the_whole_image_and_pads_with_the_mean_colour():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    x = preprocess(Image.fromarray(arr), 16, CLIP_MEAN, CLIP_STD, resize="pad")
    assert x.shape == (3, 16, 16)
    assert x[:, :3].abs().max() < 0.02 and x[:, -3:].abs().max() < 0.02  # mean colour -> ~0
    torch.testing.assert_close(x[:, 8, 1], normalised((255, 0, 0)), atol=0.03, rtol=0)  # both halves kept
    torch.testing.assert_close(x[:, 8, 14], normalised((0, 0, 255)), atol=0.03, rtol=0)
    assert mean_color(CLIP_MEAN) == (123, 117, 104)


def test_unknown_resize_mode_is_rejected():
    with pytest.raises(ValueError, match="crop.*pad"):
        to_square(Image.new("RGB", (4, 8)), 4, "stretch")


def _quadrants(side: int) -> Image.Image:
    arr = np.zeros((side, side, 3), np.uint8)
    h = side // 2
    arr[:h, :h], arr[:h, h:], arr[h:, :h], arr[h:, h:] = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
    return Image.fromarray(arr)


def test_subimages_are_row_major_crops_plus_an_overview():
    crops = subimages(_quadrants(32), grid=2, size=8)
    assert len(crops) == 5 and all(c.size == (8, 8) for c in crops)
    centres = [tuple(np.asarray(c)[4, 4]) for c in crops[:4]]
    assert centres == [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    overview = np.asarray(crops[4])  # the whole image, small: all four colours
    assert tuple(overview[1, 1]) == (255, 0, 0) and tuple(overview[6, 6]) == (255, 255, 0)
    first = subimages(_quadrants(32), grid=2, size=8, overview_first=True)
    assert np.array_equal(np.asarray(first[0]), overview) and np.array_equal(np.asarray(first[1]), np.asarray(crops[0]))


def test_mm1_high_resolution_split_gives_four_672_crops_and_an_overview():
    x = image_tensors(encode(_quadrants(1344)), "hi-res", 672, CLIP_MEAN, CLIP_STD, grid=2)
    assert x.shape == (5, 3, 672, 672)
    torch.testing.assert_close(x[1, :, 336, 336], normalised((0, 255, 0)), atol=0.02, rtol=0)
    assert image_tensors(encode(_quadrants(64)), "low-res", 32, CLIP_MEAN, CLIP_STD).shape == (1, 3, 32, 32)

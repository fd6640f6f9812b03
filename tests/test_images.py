"""Image decoding: grey/colour/PNG/JPEG to BGR, and clear errors for bad bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from severstal.data.images import MAX_PIXELS, ImageError, decode_image, read_image


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def test_colour_png_becomes_bgr_of_the_same_pixels():
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 200  # red
    out = decode_image(_encode(rgb, "PNG"))
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    assert (out[..., 2] == 200).all() and (out[..., 0] == 0).all()


def test_grey_jpeg_becomes_three_equal_channels():
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))
    out = decode_image(_encode(grey, "JPEG"))
    assert out.shape == (8, 64, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_real_image_reads_at_1600x256(real_data):
    path = next((real_data / "train_images").glob("*.jpg"))
    assert read_image(path).shape == (256, 1600, 3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty input"),
        (b"hello, this is text", "not an image"),
    ],
)
def test_bad_bytes_raise_image_error_naming_the_source(data, message):
    with pytest.raises(ImageError, match=f"upload.bin: {message}"):
        decode_image(data, source="upload.bin")


def test_truncated_jpeg_is_refused():
    data = _encode(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8), "JPEG")
    with pytest.raises(ImageError, match="broken image"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_is_refused_before_decoding():
    side = int(MAX_PIXELS**0.5) + 10
    data = _encode(np.zeros((side, side), np.uint8), "PNG")
    assert len(data) < 1_000_000  # tiny file, huge image
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(data)

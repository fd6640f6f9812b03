"""severstal.data.rle: the Kaggle RLE as an exact inverse on real strings, against slow references, and its errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_util

from severstal import IMAGE_HEIGHT, IMAGE_WIDTH
from severstal.data.rle import (
    RLEError,
    coco_rle_to_kaggle,
    kaggle_to_coco_rle,
    mask_to_rle,
    parse_rle,
    parse_rles,
    rle_to_mask,
)


def reference_decode(rle: str, shape=(IMAGE_HEIGHT, IMAGE_WIDTH)) -> np.ndarray:
    """Slow, obvious decoder: walk each run pixel by pixel, 1-indexed, top to bottom then left to right."""
    height, width = shape
    mask = np.zeros((height, width), np.uint8)
    values = [int(v) for v in rle.split()]
    for start, length in zip(values[0::2], values[1::2]):
        for pixel in range(start - 1, start - 1 + length):
            mask[pixel % height, pixel // height] = 1
    return mask


def reference_decode_by_columns(rle: str, height: int = IMAGE_HEIGHT, width: int = IMAGE_WIDTH) -> np.ndarray:
    """Slow decoder fast enough for 4,908 masks: each run cut into column slices."""
    mask = np.zeros((height, width), np.uint8)
    values = [int(v) for v in rle.split()]
    for start, length in zip(values[0::2], values[1::2]):
        first, end = start - 1, start - 1 + length
        while first < end:
            col, row = divmod(first, height)
            stop = min(end, (col + 1) * height)
            mask[row : row + stop - first, col] = 1
            first = stop
    return mask


def reference_encode(mask: np.ndarray) -> str:
    """Slow, obvious encoder: scan pixels column by column, emit 1-indexed start and length of each run."""
    height, width = mask.shape
    pairs, start = [], None
    for index in range(height * width):
        on = mask[index % height, index // height] != 0
        if on and start is None:
            start = index
        elif not on and start is not None:
            pairs += [start + 1, index - start]
            start = None
    if start is not None:
        pairs += [start + 1, height * width - start]
    return " ".join(map(str, pairs))


@pytest.fixture(scope="module")
def real_rles(real_data) -> list[str]:
    return pd.read_csv(real_data / "train_partial_newformat.csv")["EncodedPixels"].tolist()


def test_all_real_masks_round_trip_and_match_the_reference_decoder(real_rles):
    assert len(real_rles) == 4908
    for rle in real_rles:
        mask = rle_to_mask(rle)
        assert mask.shape == (256, 1600) and mask.dtype == np.uint8 and mask.flags.c_contiguous
        assert np.array_equal(mask, reference_decode_by_columns(rle)), rle[:60]
        assert mask_to_rle(mask) == rle


def test_reference_decoders_agree_on_a_real_mask(real_rles):
    assert np.array_equal(reference_decode(real_rles[0]), reference_decode_by_columns(real_rles[0]))


def random_masks(seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = [(1, 1), (1, 7), (7, 1), (3, 4), (5, 9), (16, 10), (31, 17)]
    for shape in shapes:
        yield np.zeros(shape, np.uint8)
        yield np.ones(shape, np.uint8)
        for density in (0.05, 0.5, 0.95):
            yield (rng.random(shape) < density).astype(np.uint8)
    # Full-size masks: empty, full, sparse noise, and blobs that wrap from column to column.
    yield np.zeros((256, 1600), np.uint8)
    yield np.ones((256, 1600), np.uint8)
    yield (rng.random((256, 1600)) < 0.01).astype(np.uint8)
    blobs = np.zeros((256, 1600), np.uint8)
    blobs[200:, 10:20] = 1
    blobs[:30, 11:25] = 1
    blobs[255, 1599] = 1
    yield blobs


@pytest.mark.parametrize("mask", list(random_masks()), ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_random_masks_match_the_reference_encoder_and_round_trip(mask):
    expected = reference_encode(mask)
    assert mask_to_rle(mask) == expected
    assert np.array_equal(rle_to_mask(expected, mask.shape), mask)
    if mask.size <= 600:
        assert np.array_equal(reference_decode(expected, mask.shape), mask)


def test_empty_and_full_masks():
    for empty in ("", None, float("nan"), np.nan):
        assert rle_to_mask(empty).sum() == 0
    assert mask_to_rle(np.zeros((256, 1600))) == ""
    assert rle_to_mask("1 409600").all()
    assert mask_to_rle(np.ones((256, 1600), bool)) == "1 409600"


def test_column_major_and_one_indexed():
    mask = rle_to_mask("1 2 5 1", shape=(3, 4))
    # Pixels 1, 2 are rows 0-1 of column 0; pixel 5 is row 1 of column 1.
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]


def test_mask_to_rle_takes_any_nonzero_as_foreground():
    mask = np.zeros((4, 3), np.float32)
    mask[1, 0] = 0.5
    mask[2, 2] = 255
    assert mask_to_rle(mask) == "2 1 11 1"
    with pytest.raises(ValueError, match="2-dimensional"):
        mask_to_rle(np.zeros((2, 2, 3)))


def test_non_canonical_but_valid_strings_decode():
    # Touching runs and odd spacing are valid; the encoder writes the canonical string back.
    assert mask_to_rle(rle_to_mask("1 2 3 2", (4, 2))) == "1 4"
    assert mask_to_rle(rle_to_mask("  1   2\t7 1 ", (4, 2))) == "1 2 7 1"
    runs = parse_rles(["1  2", "", None, float("nan"), "3 1 4 1"], shape=(4, 2))
    assert runs.starts.tolist() == [0, 2, 3]
    assert runs.lengths.tolist() == [2, 1, 1]
    assert runs.mask_index.tolist() == [0, 4, 4]
    assert runs.offsets.tolist() == [0, 1, 1, 1, 1, 3]


MALFORMED = [
    ("1 2 3", r"odd number of values \(3\)"),
    ("5", r"odd number of values \(1\)"),
    ("1 2 a 4", r"value 'a' \(value 3\) is not an integer"),
    ("1.5 2", r"value '1.5' \(value 1\) is not an integer"),
    ("1,2", r"is not an integer"),
    ("0 5", r"start 0 of run 1 is < 1"),
    ("-3 4", r"start -3 of run 1 is < 1"),
    ("5 0", r"length 0 of run 1 \(start 5\) is < 1"),
    ("5 -2", r"length -2 of run 1"),
    ("409600 2", r"run 1 \(start 409600, length 2\) runs past the end of the image: it ends at pixel 409601 > 409600"),
    ("409601 1", r"runs past the end of the image"),
    ("99999999999999999999 1", r"far past the end"),
    ("10 5 3 2", r"starts not ascending: run 2 starts at 3, run 1 at 10"),
    ("10 5 10 2", r"starts not ascending"),
    ("10 5 12 3", r"runs overlap: run 2 starts at 12, inside run 1 \(10..14\)"),
]


@pytest.mark.parametrize("rle, message", MALFORMED)
def test_malformed_rle_raises_a_value_error_saying_what_is_wrong(rle, message):
    with pytest.raises(ValueError, match=message):
        rle_to_mask(rle)
    with pytest.raises(RLEError, match=message) as caught:
        parse_rles(["1 1", "", rle])
    assert caught.value.index == 2


def test_non_string_rle_is_an_error():
    with pytest.raises(RLEError, match="must be a string, got int"):
        parse_rle(5)


def test_shape_decides_the_end_of_the_image():
    assert rle_to_mask("12 1", shape=(3, 4)).sum() == 1
    with pytest.raises(RLEError, match="ends at pixel 13 > 12 = 3 x 4"):
        rle_to_mask("13 1", shape=(3, 4))


def test_kaggle_to_coco_equals_pycocotools_encode_on_real_and_random_masks(real_rles):
    masks = [rle_to_mask(rle) for rle in real_rles[:300]] + [m for m in random_masks(1) if m.shape == (256, 1600)]
    for mask in masks:
        rle = mask_to_rle(mask)
        coco = kaggle_to_coco_rle(rle)
        expected = mask_util.encode(np.asfortranarray(mask))
        assert coco == {"size": [256, 1600], "counts": expected["counts"].decode("ascii")}
        assert coco_rle_to_kaggle(coco) == rle
        assert coco_rle_to_kaggle(expected) == rle  # counts as bytes


def test_coco_helpers_on_small_shapes_and_uncompressed_counts():
    coco = kaggle_to_coco_rle("1 2 3 2", shape=(4, 2))  # touching runs merge into one
    assert mask_util.decode(coco).tolist() == [[1, 0], [1, 0], [1, 0], [1, 0]]
    assert coco_rle_to_kaggle({"size": [4, 2], "counts": [1, 3, 4]}) == "2 3"
    assert kaggle_to_coco_rle("")["counts"] == mask_util.encode(np.zeros((256, 1600), np.uint8, order="F"))[
        "counts"
    ].decode()

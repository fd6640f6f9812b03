"""severstal.data.instances: connected components from runs equal OpenCV's on pixels, record for record."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_util

from severstal.data.instances import rle_to_instances, rles_to_instances
from severstal.data.rle import mask_to_rle, rle_to_mask


def expected_instances(mask: np.ndarray, class_id: int, connectivity: int, min_area: int = 0) -> list[dict]:
    """Independent reference on pixels: OpenCV labels and statistics, pycocotools encodes."""
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=connectivity)
    found = []
    for label in range(1, n_labels):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < min_area:
            continue
        counts = mask_util.encode(np.asfortranarray(labels == label, dtype=np.uint8))["counts"].decode()
        found.append({"segmentation": {"size": list(mask.shape), "counts": counts}, "bbox": [x, y, w, h],
                      "area": area, "category_id": class_id - 1})
    return sorted(found, key=lambda inst: inst["segmentation"]["counts"])


def by_counts(instances: list[dict]) -> list[dict]:
    return sorted(instances, key=lambda inst: inst["segmentation"]["counts"])


def test_diagonal_pixels_join_with_8_connectivity_only():
    mask = np.zeros((256, 1600), np.uint8)
    mask[10, 10] = mask[11, 11] = mask[12, 12] = 1
    rle = mask_to_rle(mask)
    [instance] = rle_to_instances(rle, 3)
    assert instance["bbox"] == [10, 10, 3, 3] and instance["area"] == 3 and instance["category_id"] == 2
    assert len(rle_to_instances(rle, 3, connectivity=4)) == 3


def test_a_run_wrapping_to_the_next_column_is_two_instances():
    # Pixels 255..258 (1-indexed 256..259): rows 255 of column 0, rows 0..2 of column 1: not neighbours.
    instances = rle_to_instances("256 4", 1)
    assert [(i["bbox"], i["area"]) for i in instances] == [([0, 255, 1, 1], 1), ([1, 0, 1, 3], 3)]


def test_holes_stay_holes():
    mask = np.zeros((256, 1600), np.uint8)
    mask[50:60, 100:120] = 1
    mask[53:57, 105:110] = 0
    [instance] = rle_to_instances(mask_to_rle(mask), 4)
    assert instance["area"] == 10 * 20 - 4 * 5 and instance["bbox"] == [100, 50, 20, 10]
    assert np.array_equal(mask_util.decode(instance["segmentation"]), mask)


def test_min_area_and_empty_masks():
    mask = np.zeros((256, 1600), np.uint8)
    mask[0:2, 0:2] = 1  # 4 pixels
    mask[100:110, 200:210] = 1  # 100 pixels
    rle = mask_to_rle(mask)
    assert [i["area"] for i in rle_to_instances(rle, 1)] == [4, 100]
    assert [i["area"] for i in rle_to_instances(rle, 1, min_area=5)] == [100]
    assert rle_to_instances(rle, 1, min_area=101) == []
    assert rles_to_instances(["", None, rle], [1, 2, 3]) == [[], [], rle_to_instances(rle, 3)]
    assert rles_to_instances([], []) == []


def test_options_are_validated():
    with pytest.raises(ValueError, match=r"unknown class id\(s\) \[0, 5\]: valid class ids are \[1, 2, 3, 4\]"):
        rles_to_instances(["1 1", "1 1", "1 1"], [0, 5, 1])
    with pytest.raises(ValueError, match=r"connectivity must be one of \[4, 8\], got 6"):
        rle_to_instances("1 1", 1, connectivity=6)
    with pytest.raises(ValueError, match="min_area must be >= 0"):
        rle_to_instances("1 1", 1, min_area=-1)
    with pytest.raises(ValueError, match="2 masks but 1 class ids"):
        rles_to_instances(["1 1", "1 1"], [1])
    with pytest.raises(ValueError, match="odd number of values"):
        rle_to_instances("1 1 5", 1)


def random_blob_masks(n: int, shape, seed: int):
    """Masks with blobs, thin diagonal lines, holes and noise: hard cases for connectivity."""
    rng = np.random.default_rng(seed)
    height, width = shape
    for _ in range(n):
        mask = np.zeros(shape, np.uint8)
        for _ in range(rng.integers(1, 6)):
            y, x = rng.integers(0, height), rng.integers(0, width)
            cv2.ellipse(mask, (int(x), int(y)), (int(rng.integers(1, 40)), int(rng.integers(1, 20))),
                        float(rng.uniform(0, 180)), 0, 360, 1, -1)
        for _ in range(rng.integers(0, 4)):
            cv2.line(mask, tuple(int(v) for v in rng.integers(0, [width, height])),
                     tuple(int(v) for v in rng.integers(0, [width, height])), 1, 1)
        noise = rng.integers(0, min(150, height * width // 20))
        mask[rng.integers(0, height, noise), rng.integers(0, width, noise)] ^= 1
        yield mask


@pytest.mark.parametrize("connectivity", [8, 4])
@pytest.mark.parametrize("shape", [(256, 1600), (37, 53)])
def test_random_masks_equal_the_opencv_reference(connectivity, shape):
    masks = list(random_blob_masks(15, shape, seed=connectivity + shape[0]))
    class_ids = [1 + i % 4 for i in range(len(masks))]
    got = rles_to_instances([mask_to_rle(m) for m in masks], class_ids, shape=shape, connectivity=connectivity)
    for mask, class_id, instances in zip(masks, class_ids, got):
        assert by_counts(instances) == expected_instances(mask, class_id, connectivity)


def test_min_area_equals_the_reference_on_random_masks():
    masks = list(random_blob_masks(10, (256, 1600), seed=3))
    got = rles_to_instances([mask_to_rle(m) for m in masks], [2] * len(masks), min_area=30)
    for mask, instances in zip(masks, got):
        assert by_counts(instances) == expected_instances(mask, 2, 8, min_area=30)


def test_instances_are_ordered_by_first_pixel_in_column_major_order():
    masks = list(random_blob_masks(5, (256, 1600), seed=5))
    for instances in rles_to_instances([mask_to_rle(m) for m in masks], [1] * 5):
        firsts = [mask_util.decode(i["segmentation"]).T.ravel().argmax() for i in instances]
        assert firsts == sorted(firsts)


def test_real_masks_with_4_connectivity_equal_the_reference(real_data):
    frame = pd.read_csv(real_data / "train_partial_newformat.csv").iloc[::25]
    got = rles_to_instances(frame["EncodedPixels"], frame["ClassId"], connectivity=4)
    for rle, class_id, instances in zip(frame["EncodedPixels"], frame["ClassId"], got):
        assert by_counts(instances) == expected_instances(rle_to_mask(rle), class_id, 4)

"""Benchmark ``convert``: Kaggle RLE masks to COCO instances, the run-based conversion of
:mod:`severstal.data.instances` against the straightforward pixel pipeline on the same masks, checking that
both give identical instances.
"""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_util

from severstal.bench import median_seconds
from severstal.data.annotations import read_train_csv
from severstal.data.instances import DEFAULT_CONNECTIVITY, rles_to_instances
from severstal.data.rle import SHAPE
from severstal.files import REAL_MASKS_CSV, real_data_root


def real_train_csv() -> Path:
    """The real masks' CSV beside the repository (4,908 masks; see :func:`severstal.files.real_data_root`).

    Raises:
        FileNotFoundError: it is not there; the message says to pass a CSV.
    """
    csv = real_data_root() / REAL_MASKS_CSV
    if not csv.is_file():
        raise FileNotFoundError(f"no real data at {csv}: pass --csv TRAIN_CSV")
    return csv


def decode_with_loop(rle: str, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """The straightforward decoder of most Severstal notebooks (a Python loop over runs).

    Only the baseline of :func:`bench_convert`: the package decodes with :func:`severstal.data.rle.rle_to_mask`.

    Returns:
        ``(height, width) uint8`` mask (a column-major view).
    """
    height, width = shape
    flat = np.zeros(height * width, np.uint8)
    values = [int(v) for v in rle.split()]
    for start, length in zip(values[0::2], values[1::2]):
        flat[start - 1 : start - 1 + length] = 1
    return flat.reshape(width, height).T


def pixel_instances(
    rle: str, class_id: int, shape: tuple[int, int] = SHAPE, connectivity: int = DEFAULT_CONNECTIVITY
) -> list[dict]:
    """The pixel pipeline: decode (:func:`decode_with_loop`), ``cv2.connectedComponents``, then
    ``pycocotools.mask.encode`` per component; records as :func:`severstal.data.instances.rles_to_instances`."""
    mask = np.ascontiguousarray(decode_with_loop(rle, shape))
    n_labels, labels = cv2.connectedComponents(mask, connectivity=connectivity)
    instances = []
    for label in range(1, n_labels):
        encoded = mask_util.encode(np.asfortranarray(labels == label, dtype=np.uint8))
        instances.append(
            {
                "segmentation": {"size": list(shape), "counts": encoded["counts"].decode("ascii")},
                "bbox": [int(v) for v in mask_util.toBbox(encoded)],
                "area": int(mask_util.area(encoded)),
                "category_id": class_id - 1,
            }
        )
    return instances


def _canonical(instances: list[dict]) -> list[dict]:
    """Instances in one order (the two pipelines number components differently)."""
    return sorted(instances, key=lambda inst: inst["segmentation"]["counts"])


def bench_convert(csv: str | Path, repeats: int = 3, limit: int | None = None) -> dict:
    """Time Kaggle RLE -> COCO instances, run-based vs pixel pipeline, on the masks of a CSV.

    Both run on one core (OpenCV's threads are set to 1 for the run, then restored), on the same masks
    already read into memory; reading and validating the CSV is timed on its own.

    Args:
        csv: a ``train.csv`` in either format (default in the CLI: the 4,908 real masks).
        repeats: timed repetitions of each pipeline; the median counts.
        limit: use only the first ``limit`` masks.

    Returns:
        ``{"benchmark": "convert", "csv", "masks", "instances", "repeats", "read_seconds",
        "identical": bool, "mismatched_masks": int, "rows": [{"method", "seconds", "masks_per_s"}, ...],
        "speedup": float}`` where ``rows[0]`` is the run-based conversion and ``rows[1]`` the pixel one.
    """
    start = time.perf_counter()
    frame = read_train_csv(csv)
    read_seconds = time.perf_counter() - start
    if limit is not None:
        frame = frame.iloc[:limit]
    rles, class_ids = frame["EncodedPixels"].tolist(), frame["ClassId"].tolist()
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        fast_seconds, fast = median_seconds(lambda: rles_to_instances(rles, class_ids), repeats)
        pixel_seconds, pixel = median_seconds(
            lambda: [pixel_instances(r, c) for r, c in zip(rles, class_ids)], repeats
        )
    finally:
        cv2.setNumThreads(threads)
    mismatched = sum(_canonical(a) != _canonical(b) for a, b in zip(fast, pixel))
    n = len(rles)
    return {
        "benchmark": "convert",
        "csv": str(csv),
        "masks": n,
        "instances": sum(map(len, fast)),
        "repeats": repeats,
        "read_seconds": read_seconds,
        "identical": mismatched == 0,
        "mismatched_masks": mismatched,
        "rows": [
            {"method": "runs (severstal.data.instances)", "seconds": fast_seconds, "masks_per_s": n / fast_seconds},
            {"method": "pixels (loop decode, cv2, pycocotools)", "seconds": pixel_seconds,
             "masks_per_s": n / pixel_seconds},
        ],
        "speedup": pixel_seconds / fast_seconds,
    }

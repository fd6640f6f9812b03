"""The competition's metric: mean Dice over every (image, class) pair.

Dice of a pair is ``2 |X ∩ Y| / (|X| + |Y|)`` for the predicted and true masks ``X`` and ``Y``, and 1 when
both are empty. The score is the mean over every pair of the listed images and the four classes, so an
image without defects still counts four times: about 86% of Severstal's pairs are empty, and one false
positive on an empty pair costs a whole point of that pair.

Frame scores are computed from the RLE runs, without decoding masks to pixels: the intersection of two
sorted run lists is a difference of cumulative coverage, looked up with ``searchsorted``, for every pair
at once.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

from severstal import CLASS_IDS
from severstal.data.rle import SHAPE, RLEError, parse_rles


def dice(pred_mask: np.ndarray, true_mask: np.ndarray) -> float:
    """Dice of two masks; 1.0 when both are empty.

    Args:
        pred_mask: ``(H, W)`` array, non-zero pixels are foreground.
        true_mask: ``(H, W)`` array of the same shape.

    Returns:
        ``2 |X ∩ Y| / (|X| + |Y|)``, in [0, 1].

    Raises:
        ValueError: the shapes differ.
    """
    pred, true = np.asarray(pred_mask) != 0, np.asarray(true_mask) != 0
    if pred.shape != true.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, truth {true.shape}")
    total = int(pred.sum()) + int(true.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, true).sum()) / total


def dice_from_areas(intersection: np.ndarray, pred_area: np.ndarray, true_area: np.ndarray) -> np.ndarray:
    """Dice of many pairs from their pixel counts (int arrays of one shape); 1 where both are empty."""
    total = pred_area + true_area
    return np.where(total == 0, 1.0, 2.0 * intersection / np.maximum(total, 1))


def _pair_runs(frame: pd.DataFrame, positions: dict[str, int], shape: tuple[int, int], what: str):
    """Runs of a frame's masks as intervals on one axis: pair ``p`` covers ``[p * H * W, (p + 1) * H * W)``.

    Returns:
        ``(pair, start, end)``: ``(R,) int64`` arrays sorted by start; ``pair = image_position * 4 + class - 1``.
    """
    missing = {"ImageId", "ClassId", "EncodedPixels"} - set(frame.columns)
    if missing:
        raise ValueError(f"{what} frame lacks column(s) {sorted(missing)}")
    rles = frame["EncodedPixels"].fillna("").astype(str).str.strip()
    rows = frame[frame["ImageId"].isin(positions.keys()) & (rles != "")]
    classes = rows["ClassId"].to_numpy(np.int64)
    unknown = sorted(set(classes.tolist()) - set(CLASS_IDS))
    if unknown:
        raise ValueError(f"{what} frame has class id(s) {unknown}; valid class ids are {list(CLASS_IDS)}")
    pairs = rows["ImageId"].map(positions).to_numpy(np.int64) * len(CLASS_IDS) + classes - 1
    if np.unique(pairs).size != pairs.size:
        raise ValueError(f"{what} frame has more than one mask for the same (ImageId, ClassId)")
    try:
        runs = parse_rles(rles[rows.index].tolist(), shape)
    except RLEError as err:
        raise ValueError(f"{what} frame, mask of {rows['ImageId'].iloc[err.index]}: {err}") from None
    pair = pairs[runs.mask_index]
    start = pair * (shape[0] * shape[1]) + runs.starts
    order = np.argsort(start, kind="stable")
    return pair[order], start[order], start[order] + runs.lengths[order]


def _covered_below(x: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """How many pixels of the sorted, disjoint intervals ``[starts, ends)`` lie below each of ``x``."""
    if not starts.size:
        return np.zeros(x.size, np.int64)
    before = np.r_[0, np.cumsum(ends - starts)[:-1]]
    j = np.searchsorted(starts, x, side="right") - 1
    inside = np.minimum(x - starts[j], ends[j] - starts[j])
    return np.where(j >= 0, before[j] + inside, 0)


def _pair_areas(pred, truth, image_ids, shape):
    """Per pair: intersection, predicted area and true area, each ``(len(image_ids) * 4,) int64``."""
    image_ids = list(image_ids)
    positions = {image_id: i for i, image_id in enumerate(image_ids)}
    if len(positions) != len(image_ids):
        raise ValueError("image_ids lists an image more than once")
    n_pairs = len(image_ids) * len(CLASS_IDS)
    p_pair, p_start, p_end = _pair_runs(pred, positions, shape, "prediction")
    t_pair, t_start, t_end = _pair_runs(truth, positions, shape, "truth")
    overlap = _covered_below(p_end, t_start, t_end) - _covered_below(p_start, t_start, t_end)
    intersection = np.bincount(p_pair, weights=overlap, minlength=n_pairs).astype(np.int64)
    pred_area = np.bincount(p_pair, weights=p_end - p_start, minlength=n_pairs).astype(np.int64)
    true_area = np.bincount(t_pair, weights=t_end - t_start, minlength=n_pairs).astype(np.int64)
    return intersection, pred_area, true_area


def dice_table(
    pred: pd.DataFrame, truth: pd.DataFrame, image_ids: Iterable[str], shape: tuple[int, int] = SHAPE
) -> dict:
    """The competition's mean Dice, per class, and on the pairs with a true mask alone.

    Args:
        pred: predicted masks, a frame as :func:`severstal.data.annotations.read_train_csv` returns (rows
            with an empty ``EncodedPixels`` are empty masks).
        truth: the true masks, the same kind of frame.
        image_ids: the images scored; every (image, class) pair counts, whether or not a frame has a
            row for it. Rows of other images are ignored.
        shape: ``(height, width)`` of the images.

    Returns:
        ``{"mean_dice": float, "dice_per_class": {class_id: float}, "dice_nonempty": float,
        "pairs": int, "nonempty_pairs": int}``; ``dice_nonempty`` is the mean over the pairs whose
        true mask is not empty (NaN when there is none); the means are NaN for no images.

    Raises:
        ValueError: a frame lacks a column, has an unknown class id, a malformed RLE or the same pair
            twice; ``image_ids`` repeats an image.
    """
    intersection, pred_area, true_area = _pair_areas(pred, truth, image_ids, shape)
    scores = dice_from_areas(intersection, pred_area, true_area)
    per_class = scores.reshape(-1, len(CLASS_IDS))
    non_empty = true_area > 0
    nan = float("nan")
    return {
        "mean_dice": float(scores.mean()) if scores.size else nan,
        "dice_per_class": {
            c: float(per_class[:, k].mean()) if scores.size else nan for k, c in enumerate(CLASS_IDS)
        },
        "dice_nonempty": float(scores[non_empty].mean()) if non_empty.any() else nan,
        "pairs": int(scores.size),
        "nonempty_pairs": int(non_empty.sum()),
    }


def mean_dice(pred: pd.DataFrame, truth: pd.DataFrame, image_ids: Iterable[str]) -> float:
    """The competition's metric: mean Dice over every (image, class) pair of ``image_ids`` x {1, 2, 3, 4}.

    See :func:`dice_table` for the arguments.
    """
    return dice_table(pred, truth, image_ids)["mean_dice"]


def dice_per_class(pred: pd.DataFrame, truth: pd.DataFrame, image_ids: Iterable[str]) -> dict[int, float]:
    """Mean Dice of each class over the (image, class) pairs of ``image_ids``: ``{class_id: dice}``.

    See :func:`dice_table` for the arguments.
    """
    return dice_table(pred, truth, image_ids)["dice_per_class"]


def dice_per_image(
    pred: pd.DataFrame, truth: pd.DataFrame, image_ids: Iterable[str], shape: tuple[int, int] = SHAPE
) -> pd.DataFrame:
    """Dice of every (image, class) pair, one row per image, to find the images a model gets wrong.

    Args:
        pred, truth, image_ids, shape: as :func:`dice_table`.

    Returns:
        Frame in the order of ``image_ids``: ``ImageId``, ``dice_class_1`` .. ``dice_class_4`` (1 where both
        masks are empty), ``mean_dice`` (the image's share of the competition score: the mean of its four
        pairs) and ``true_classes`` (how many classes the truth has on the image).

    Raises:
        ValueError: as :func:`dice_table`.
    """
    image_ids = list(image_ids)
    intersection, pred_area, true_area = _pair_areas(pred, truth, image_ids, shape)
    scores = dice_from_areas(intersection, pred_area, true_area).reshape(-1, len(CLASS_IDS))
    frame = pd.DataFrame({"ImageId": image_ids})
    for k, class_id in enumerate(CLASS_IDS):
        frame[f"dice_class_{class_id}"] = scores[:, k]
    frame["mean_dice"] = scores.mean(axis=1) if len(image_ids) else np.zeros(0)
    frame["true_classes"] = (true_area.reshape(-1, len(CLASS_IDS)) > 0).sum(axis=1)
    return frame

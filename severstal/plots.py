"""Figures the project writes (PNG): every plot has a title, axis labels and units.

All functions take data (dicts, frames, arrays) and a path, draw with matplotlib's Agg backend and
write the file atomically; nothing here computes metrics.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from severstal import CLASS_IDS  # noqa: E402

CLASS_COLOURS = {1: "#e6194b", 2: "#3cb44b", 3: "#4363d8", 4: "#f58231"}
"""One colour per class, shared by every plot and overlay."""


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write a figure to PNG atomically (temporary file, then rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_dice_per_class(results: dict, path: str | Path) -> Path:
    """Bar chart of Dice per class and overall, beside the all-empty submission's score.

    Args:
        results: as :func:`severstal.evaluation.evaluate` returns (``dice_per_class``, ``mean_dice``,
            ``empty_baseline``).
    """
    labels = [f"class {c}" for c in CLASS_IDS] + ["mean"]
    values = [results["dice_per_class"][str(c)] for c in CLASS_IDS] + [results["mean_dice"]]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bars = ax.bar(labels, values, color=[CLASS_COLOURS[c] for c in CLASS_IDS] + ["#444444"])
    ax.axhline(results["empty_baseline"], color="black", linestyle="--", linewidth=1,
               label=f"all-empty submission ({results['empty_baseline']:.3f})")
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.3f}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("Dice (1 = perfect)")
    ax.set_xlabel("defect class")
    ax.set_title("Mean Dice over every (image, class) pair")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_threshold_curves(curves: dict, min_area_grid: Sequence[int], path: str | Path) -> Path:
    """Per class, Dice against the minimum area for each score threshold (the tuning search).

    Args:
        curves: ``{class_id: {score_threshold: [dice per min area]}}`` from ``tune_thresholds``.
    """
    fig, axes = plt.subplots(1, len(CLASS_IDS), figsize=(14, 3.4), sharey=True)
    for ax, class_id in zip(axes, CLASS_IDS):
        for threshold, row in sorted(curves[class_id].items()):
            ax.plot(min_area_grid, row, marker=".", label=f"score ≥ {threshold:.1f}")
        ax.set_title(f"class {class_id}")
        ax.set_xlabel("minimum mask area (pixels)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice of the class")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Threshold tuning on the validation split")
    return save_figure(fig, path)


def overlay_masks(image_bgr, class_masks: dict[int, "np.ndarray"], alpha: float = 0.45):
    """Colour each class's mask over an image.

    Args:
        image_bgr: (H, W, 3) uint8 BGR.
        class_masks: class id -> (H, W) bool/uint8 mask.

    Returns:
        (H, W, 3) uint8 RGB with the masks blended in and their outlines drawn.
    """
    import cv2
    import numpy as np

    out = image_bgr[:, :, ::-1].astype(np.float32)
    for class_id, mask in class_masks.items():
        mask = np.asarray(mask).astype(bool)
        if not mask.any():
            continue
        colour = np.array(matplotlib.colors.to_rgb(CLASS_COLOURS[class_id])) * 255
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        rgb = np.ascontiguousarray(out.astype(np.uint8))
        cv2.drawContours(rgb, contours, -1, tuple(int(v) for v in colour), 1)
        out = rgb.astype(np.float32)
    return out.astype(np.uint8)


def save_overlay(image_bgr, record: dict, path: str | Path, title: str = "") -> Path:
    """Write a PNG of an image with a record's per-class masks overlaid and a class legend."""
    from matplotlib.patches import Patch

    from severstal.rle import rle_to_mask

    shape = image_bgr.shape[:2]
    masks = {int(c): rle_to_mask(rle, shape) for c, rle in record["classes"].items() if rle}
    fig, ax = plt.subplots(figsize=(16, 16 * shape[0] / shape[1] + 0.6))
    ax.imshow(overlay_masks(image_bgr, masks))
    ax.set_axis_off()
    ax.set_title(title or f"{len(record['defects'])} defects", fontsize=10)
    handles = [Patch(color=CLASS_COLOURS[c], label=f"class {c}") for c in CLASS_IDS if c in masks]
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=8)
    return save_figure(fig, path, dpi=80)

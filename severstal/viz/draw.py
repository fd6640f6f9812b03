"""Drawing: every figure the project writes (PNG), each with a title, axis labels and units.

The one module that draws. Functions take data (dicts, frames, arrays, prediction records) and a path, draw with
matplotlib's Agg backend and write the file atomically; nothing here computes metrics. The model returns data
(:func:`severstal.model.evaluation.evaluate`, prediction records) and the commands draw it with
:func:`plot_evaluation` and :func:`overlay_writer`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from severstal import CLASS_IDS  # noqa: E402

if TYPE_CHECKING:
    import numpy as np

CLASS_COLOURS = {1: "#e6194b", 2: "#3cb44b", 3: "#4363d8", 4: "#f58231"}
"""One colour per class, shared by every plot and overlay."""


def save_figure(fig, path: str | Path, dpi: int = 110, palette: bool = False) -> Path:
    """Write a figure to PNG atomically (temporary file, then rename) and close it.

    Args:
        palette: store 256 colours (fast octree, no dithering): photographs with overlays shrink 3-5x.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    if palette:
        from PIL import Image

        with Image.open(tmp) as image:
            quantized = image.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        quantized.save(tmp, optimize=True)
    os.replace(tmp, path)
    return path


def plot_dice_per_class(results: dict, path: str | Path) -> Path:
    """Bar chart of Dice per class and overall, beside the all-empty submission's score.

    Args:
        results: as :func:`severstal.model.evaluation.evaluate` returns (``dice_per_class``, ``mean_dice``,
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


def plot_threshold_curves(curves: dict, path: str | Path) -> Path:
    """Per class, Dice against the minimum area for each score threshold (the tuning search).

    Args:
        curves: ``{"min_areas": [grid], "dice": {"1": {"0.3": [dice per min area], ...}, ...}}``, the
            ``threshold_curves`` of :func:`severstal.model.evaluation.evaluate` with ``tune``.
    """
    fig, axes = plt.subplots(1, len(CLASS_IDS), figsize=(14, 3.4), sharey=True)
    for ax, class_id in zip(axes, CLASS_IDS):
        for threshold, row in sorted(curves["dice"][str(class_id)].items(), key=lambda item: float(item[0])):
            ax.plot(curves["min_areas"], row, marker=".", label=f"score ≥ {float(threshold):.1f}")
        ax.set_title(f"class {class_id}")
        ax.set_xlabel("minimum mask area (pixels)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice of the class")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Threshold tuning on the validation split")
    return save_figure(fig, path)


def plot_evaluation(results: dict, folder: str | Path) -> list[Path]:
    """The figures of an evaluation into ``folder``: ``dice_per_class.png`` and, after tuning,
    ``threshold_curves.png``.

    Args:
        results: as :func:`severstal.model.evaluation.evaluate` returns (or its ``evaluation.json``).
    """
    folder = Path(folder)
    written = [plot_dice_per_class(results, folder / "dice_per_class.png")]
    if results.get("threshold_curves"):
        written.append(plot_threshold_curves(results["threshold_curves"], folder / "threshold_curves.png"))
    return written


def overlay_masks(image_bgr, class_masks: dict[int, np.ndarray], alpha: float = 0.45):
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

    from severstal.data.rle import rle_to_mask

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


def overlay_writer(folder: str | Path, limit: int | None = None) -> Callable[[Path, dict], Path | None]:
    """A function ``(image file, record) -> PNG`` that writes ``folder/<stem>.png``: the record's masks over the image
    (:func:`save_overlay`), for the first ``limit`` images it is given (None: all); records of unreadable files
    (``error``) get none. For ``predict_folder(on_record=...)``."""
    from severstal.data.images import read_image

    seen = 0

    def write(path: Path, record: dict) -> Path | None:
        nonlocal seen
        seen += 1
        if record.get("error") or (limit is not None and seen > limit):
            return None
        return save_overlay(read_image(path), record, Path(folder) / f"{Path(path).stem}.png", title=Path(path).name)

    return write


# Data, training and serving figures (``severstal figures``) ------------------------------------------------


def _class_legend(ax, class_ids, **kwargs) -> None:
    """A legend of the class colours of ``class_ids``."""
    from matplotlib.patches import Patch

    handles = [Patch(color=CLASS_COLOURS[c], label=f"class {c}") for c in class_ids]
    if handles:
        ax.legend(handles=handles, **kwargs)


def _label_bars(ax, bars, fmt: str = "{:,.0f}") -> None:
    """Write each bar's value above it."""
    for bar in bars:
        value = bar.get_height()
        ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, value), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)


def plot_class_balance(counts, path: str | Path) -> Path:
    """Masks per class, one group of bars per class and one bar per source.

    Args:
        counts: ``pandas.DataFrame`` indexed by class id (1..4), one column per source (e.g. the full
            per-image table and the masks whose RLE is known), values in masks.
    """
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(counts.columns)
    x = np.arange(len(counts.index))
    for k, column in enumerate(counts.columns):
        bars = ax.bar(x + (k - (len(counts.columns) - 1) / 2) * width, counts[column], width,
                      color=[CLASS_COLOURS[c] for c in counts.index], alpha=1.0 - 0.45 * k,
                      edgecolor="black", linewidth=0.5, label=f"{column} ({counts[column].sum():,} masks)")
        _label_bars(ax, bars)
    ax.set_xticks(x, [f"class {c}" for c in counts.index])
    ax.set_xlabel("defect class")
    ax.set_ylabel("masks (images carrying the class)")
    ax.set_ylim(0, counts.to_numpy().max() * 1.15)
    ax.set_title("Class balance: class 3 dominates, class 2 is rare")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_classes_per_image(counts, path: str | Path) -> Path:
    """Images per number of defect classes on the image (0 = defect-free), log scale.

    Args:
        counts: ``pandas.Series`` indexed by the number of classes, values in images.
    """
    fig, ax = plt.subplots(figsize=(6, 3.6))
    colours = ["#999999"] + ["#555555"] * (len(counts) - 1)
    bars = ax.bar([str(n) for n in counts.index], counts.to_numpy(), color=colours, edgecolor="black", linewidth=0.5)
    _label_bars(ax, bars)
    ax.set_yscale("log")
    ax.set_ylim(0.8, counts.max() * 3)
    ax.set_xlabel("defect classes on the image (0 = defect-free)")
    ax.set_ylabel("images (log scale)")
    ax.set_title(f"Images per number of classes ({counts.sum():,} images)")
    return save_figure(fig, path)


def plot_defect_areas(stats, path: str | Path, image_pixels: int = 256 * 1600) -> Path:
    """Distribution of mask areas per class, log-spaced bins, with each class's median.

    Args:
        stats: ``pandas.DataFrame`` with ``ClassId`` and ``area`` (pixels), as
            :func:`severstal.viz.stats.mask_statistics` returns.
        image_pixels: pixels of a whole image, the right end of the axis.
    """
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 3.8))
    areas = stats.loc[stats["area"] > 0, "area"]
    low = 10 ** np.floor(np.log10(areas.min())) if len(areas) else 1
    bins = np.logspace(np.log10(low), np.log10(image_pixels), 40)
    for class_id in CLASS_IDS:
        areas = stats.loc[(stats["ClassId"] == class_id) & (stats["area"] > 0), "area"]
        if areas.empty:
            continue
        median = float(areas.median())
        # Shares, not counts: class 3 has 20 times the masks of class 2, and the shapes are what matters.
        ax.hist(areas, bins=bins, weights=np.full(len(areas), 100.0 / len(areas)), histtype="step", linewidth=1.6,
                color=CLASS_COLOURS[class_id], label=f"class {class_id}: {len(areas):,} masks, median {median:,.0f} px")
        ax.axvline(median, color=CLASS_COLOURS[class_id], linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("mask area (pixels, log scale; a whole image is 409,600)")
    ax.set_ylabel("share of the class's masks (%)")
    ax.set_title("Defect area per class (dashed: median)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_instances_per_image(per_image, stats, path: str | Path, cap: int = 15) -> Path:
    """Instances (connected components) per defective image, and per mask by class.

    Args:
        per_image: ``pandas.DataFrame`` with ``instances`` per image (:func:`severstal.viz.stats.image_statistics`).
        stats: ``pandas.DataFrame`` with ``ClassId`` and ``instances`` per mask
            (:func:`severstal.viz.stats.mask_statistics`).
        cap: counts above ``cap`` share the last bar.
    """
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    clipped = np.minimum(per_image["instances"].to_numpy(), cap)
    values, counts = np.unique(clipped, return_counts=True)
    left.bar(values, counts, color="#555555", edgecolor="black", linewidth=0.5)
    left.set_xticks(range(1, cap + 1), [str(v) for v in range(1, cap)] + [f"{cap}+"])
    left.set_xlabel("instances on the image (connected components, all classes)")
    left.set_ylabel("images with a defect (count)")
    left.set_title(f"Instances per image ({len(per_image):,} images, mean {per_image['instances'].mean():.1f})")
    present = [c for c in CLASS_IDS if (stats["ClassId"] == c).any()]
    boxes = right.boxplot([stats.loc[stats["ClassId"] == c, "instances"] for c in present], patch_artist=True,
                          tick_labels=[f"class {c}" for c in present], medianprops={"color": "black"})
    for patch, class_id in zip(boxes["boxes"], present):
        patch.set_facecolor(CLASS_COLOURS[class_id])
    right.set_yscale("log")
    right.set_xlabel("defect class")
    right.set_ylabel("instances per mask (log scale)")
    right.set_title("One class mask, many instances")
    return save_figure(fig, path)


def plot_defect_positions(heatmaps, path: str | Path) -> Path:
    """Where defects sit on the strip: a heat map per class and each class's column profile.

    Args:
        heatmaps: ``(4, height, width)`` share of each class's masks covering each pixel
            (:func:`severstal.viz.stats.defect_heatmaps`).
    """
    import numpy as np

    n, height, width = heatmaps.shape
    fig, axes = plt.subplots(n + 1, 1, figsize=(10, 1.25 * n + 2.4), sharex=True,
                             gridspec_kw={"height_ratios": [1] * n + [1.6]})
    for ax, class_id, heat in zip(axes, CLASS_IDS, heatmaps):
        cmap = matplotlib.colors.LinearSegmentedColormap.from_list(f"c{class_id}", ["white", CLASS_COLOURS[class_id]])
        image = ax.imshow(heat, cmap=cmap, aspect="auto", extent=(0, width, height, 0), interpolation="bilinear")
        ax.set_ylabel("row (px)", fontsize=8)
        ax.set_title(f"class {class_id}", fontsize=9, loc="left")
        # An inset colour bar takes no width from the axes, so all rows keep the same x axis.
        bar = fig.colorbar(image, cax=ax.inset_axes((1.005, 0.0, 0.012, 1.0)))
        bar.set_label("share", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    profile = axes[-1]
    for class_id, heat in zip(CLASS_IDS, heatmaps):
        profile.plot(np.arange(width), heat.mean(axis=0), color=CLASS_COLOURS[class_id], label=f"class {class_id}")
    profile.set_xlabel("column: position across the strip (pixels from the left edge)")
    profile.set_ylabel("mean share\nof the column")
    profile.set_ylim(0, heatmaps.mean(axis=1).max() * 1.35 + 1e-9)
    profile.legend(fontsize=7, ncol=4, loc="upper center")
    profile.grid(alpha=0.3)
    fig.suptitle("Where defects sit on the strip (share of each class's masks covering a pixel)")
    return save_figure(fig, path, dpi=100, palette=True)


class OverlayPanel(NamedTuple):
    """One image of :func:`plot_overlays`.

    Attributes:
        title: the panel's title.
        image: (H, W, 3) uint8 BGR.
        classes: class id -> Kaggle RLE of the class mask (empty or missing: no mask).
        defects: instances to outline with their score, as in the REST answer (``class_id``, ``score``,
            ``bbox`` [x0, y0, x1, y1]).
    """

    title: str
    image: np.ndarray
    classes: dict
    defects: Sequence[dict] = ()


def plot_overlays(panels: Sequence[OverlayPanel], path: str | Path, title: str, ncols: int = 1,
                  panel_width: float = 7.0, dpi: int = 100) -> Path:
    """A grid of images with their class masks overlaid (:func:`overlay_masks`) and a class legend.

    Args:
        panels: the images, filled row by row.
        title: the figure's title.
        ncols: panels per row.
        panel_width: width of a panel in inches (the height follows the image's aspect).
    """
    from matplotlib.patches import Rectangle

    from severstal.data.rle import rle_to_mask

    nrows = max(1, -(-len(panels) // ncols))
    height, width = panels[0].image.shape[:2] if panels else (256, 1600)
    # Panels are placed in inches so that each image keeps its aspect and fills its panel.
    margin, gap, title_band, top_band = 0.1, 0.2, 0.3, 0.5
    panel_height = panel_width * height / width
    fig_width = 2 * margin + ncols * panel_width + (ncols - 1) * gap
    fig_height = top_band + nrows * (panel_height + title_band) + margin
    fig = plt.figure(figsize=(fig_width, fig_height))
    shown = set()
    for index, panel in enumerate(panels):
        row, col = divmod(index, ncols)
        left = margin + col * (panel_width + gap)
        bottom = fig_height - top_band - (row + 1) * (panel_height + title_band) + 0.05
        ax = fig.add_axes((left / fig_width, bottom / fig_height, panel_width / fig_width, panel_height / fig_height))
        ax.set_axis_off()
        shape = panel.image.shape[:2]
        masks = {int(c): rle_to_mask(rle, shape) for c, rle in panel.classes.items() if isinstance(rle, str) and rle}
        shown.update(masks)
        ax.imshow(overlay_masks(panel.image, masks), extent=(0, shape[1], shape[0], 0), aspect="auto")
        for defect in panel.defects:
            x0, y0, x1, y1 = defect["bbox"]
            colour = CLASS_COLOURS[int(defect["class_id"])]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.2))
            ax.text(x0, max(y0 - 4, 10), f"{defect['class_id']}: {defect['score']:.2f}", color="white", fontsize=7,
                    bbox={"facecolor": colour, "edgecolor": "none", "pad": 1})
        ax.set_title(panel.title, fontsize=8, loc="left")
    fig.text(margin / fig_width, 1 - 0.2 / fig_height, title, fontsize=11, va="center")
    _class_legend(fig, sorted(shown), loc="upper right", bbox_to_anchor=(1 - margin / fig_width, 1), ncol=4,
                  fontsize=8, frameon=False)
    return save_figure(fig, path, dpi=dpi, palette=True)


def plot_examples(examples, path: str | Path, title: str, ncols: int = 2, panel_width: float = 6.0) -> Path:
    """Images with their true masks overlaid.

    Args:
        examples: :class:`severstal.viz.stats.Example` s, or a dict class id -> examples (titled by class).
        title: the figure's title.
    """
    from severstal.data.images import read_image

    if isinstance(examples, dict):
        labelled = [(f"class {c}: {e.image_id}", e) for c, chosen in examples.items() for e in chosen]
    else:
        labelled = [(e.image_id, e) for e in examples]
    panels = [OverlayPanel(label, read_image(e.path), e.classes) for label, e in labelled]
    return plot_overlays(panels, path, title, ncols=ncols, panel_width=panel_width)


def plot_answers(answers: dict, images: dict, path: str | Path, title: str = "TorchServe's answers") -> Path:
    """REST answers drawn on their images: class masks, instance boxes and scores.

    Args:
        answers: image name -> the JSON answer (``classes``, ``defects``).
        images: image name -> its file.
    """
    from severstal.data.images import read_image

    panels = [OverlayPanel(f"{name}: {len(answer['defects'])} defects", read_image(images[name]), answer["classes"],
                           answer["defects"]) for name, answer in answers.items()]
    return plot_overlays(panels, path, title, ncols=1, panel_width=9.0)


def plot_prediction_gallery(items: Sequence, path: str | Path, title: str) -> Path:
    """Truth beside prediction for scored images, one row per image.

    Args:
        items: :class:`severstal.model.evaluation.ScoredImage` s (``image_id``, ``path``, ``dice``, ``truth``
            class id -> RLE, ``record`` the predicted answer).
        title: the figure's title.
    """
    from severstal.data.images import read_image

    panels = []
    for item in items:
        image = read_image(item.path)
        panels.append(OverlayPanel(f"{item.image_id}: truth", image, item.truth))
        panels.append(OverlayPanel(f"prediction: {len(item.record['defects'])} instances, Dice {item.dice:.3f}",
                                   image, item.record["classes"], item.record["defects"]))
    return plot_overlays(panels, path, title, ncols=2, panel_width=6.0)


def plot_training_curves(metrics, path: str | Path) -> Path:
    """Training losses against the iteration and, when the run evaluated, Dice against the iteration.

    Args:
        metrics: ``pandas.DataFrame`` of a run's ``metrics.json`` (one row per logged iteration;
            ``iteration``, ``total_loss``, ``loss_*`` and, from evaluations, ``dice/*`` columns), as
            :func:`severstal.figures.read_metrics` returns.
    """
    dice_columns = [c for c in metrics.columns if c.startswith("dice/") and metrics[c].notna().any()]
    fig, axes = plt.subplots(1, 2 if dice_columns else 1, figsize=(13 if dice_columns else 8, 4), squeeze=False)
    losses = metrics.dropna(subset=["total_loss"]) if "total_loss" in metrics else metrics.iloc[0:0]
    marker = "o" if len(losses) < 10 else None
    ax = axes[0, 0]
    for column in ["total_loss"] + sorted(c for c in losses.columns if c.startswith("loss_")):
        if column in losses:
            ax.plot(losses["iteration"], losses[column], marker=marker, label=column,
                    linewidth=2.2 if column == "total_loss" else 1.2, color="black" if column == "total_loss" else None)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (log scale, smoothed over 20 iterations)")
    ax.set_title(f"Training loss and its parts ({len(losses)} logged points)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    if dice_columns:
        ax = axes[0, 1]
        evaluated = metrics.dropna(subset=dice_columns, how="all")
        for column in dice_columns:
            name = column.split("/", 1)[1]
            styles = {"mean_dice": {"color": "black", "linewidth": 2.2},
                      "dice_nonempty": {"color": "black", "linestyle": ":"},
                      "empty_baseline": {"color": "grey", "linestyle": "--"}}
            if name.startswith("dice_class_"):
                styles[name] = {"color": CLASS_COLOURS[int(name.rsplit("_", 1)[1])]}
            style = styles.get(name, {})
            ax.plot(evaluated["iteration"], evaluated[column], marker="o", label=name, **style)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("iteration")
        ax.set_ylabel("Dice on the validation split (1 = perfect)")
        ax.set_title("Validation Dice during training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_latency(rows: Sequence[dict], path: str | Path, title: str = "Latency per image") -> Path:
    """Median latency per backend or serving path, with the 95th percentile as a whisker.

    Args:
        rows: dicts with ``method``, ``p50`` and ``p95`` (seconds) and optionally ``images_per_s``, as
            ``severstal bench serve`` and :func:`severstal.figures.latency_row` give.
        title: the figure's title (say the device and the images).
    """
    fig, ax = plt.subplots(figsize=(7.5, 0.8 + 0.7 * len(rows)))
    labels = [row["method"] for row in rows]
    p50 = [row["p50"] * 1000 for row in rows]
    p95 = [row["p95"] * 1000 for row in rows]
    ax.barh(labels, p50, xerr=[[0] * len(rows), [hi - lo for lo, hi in zip(p50, p95)]], color="#4363d8",
            capsize=4, height=0.5)
    for y, (lo, hi, row) in enumerate(zip(p50, p95, rows)):
        rate = f", {row['images_per_s']:.1f} img/s" if "images_per_s" in row else ""
        ax.annotate(f"p50 {lo:,.0f} ms, p95 {hi:,.0f} ms{rate}", (hi, y), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_xlim(0, max(p95) * 1.8 if rows else 1)
    ax.invert_yaxis()
    ax.set_xlabel("latency per image (ms; bar: median, whisker: 95th percentile)")
    ax.set_ylabel("backend / serving path")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, path)


PIPELINE_STAGES = (
    ("train.csv\n+ train_images/", "data.annotations\ndata.images"),
    ("annotation table\nImageId, ClassId, RLE", "data.annotations\ndata.rle"),
    ("instances\none per connected\ncomponent, COCO RLE", "data.instances\ndata.coco, data.datasets"),
    ("Detectron2\nMask R-CNN", "model.train\nmodel.config, model.backends"),
    ("per-class masks\nscore thresholds,\nminimum areas", "model.predict\nmodel.evaluation"),
    ("Kaggle RLE", "data.rle"),
)
"""The boxes of :func:`plot_pipeline`: (what flows, the modules of ``severstal`` that make it)."""
PIPELINE_OUTPUTS = (("submission.csv", "severstal predict"), ("REST answer\n(TorchServe)", "serve.worker"))


def plot_pipeline(path: str | Path) -> Path:
    """The pipeline at a glance: boxes and arrows from ``train.csv`` to a submission and a REST answer."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(15, 3.0))
    ax.set_xlim(0, 15)
    ax.set_ylim(0.05, 3.05)
    ax.set_axis_off()
    box_w, box_h, step, y = 1.75, 1.05, 2.08, 1.45

    def box(x, y, text, note, colour):
        ax.add_patch(FancyBboxPatch((x, y), box_w, box_h, boxstyle="round,pad=0.03,rounding_size=0.12",
                                    facecolor=colour, edgecolor="#333333", linewidth=1))
        ax.text(x + box_w / 2, y + box_h / 2, text, ha="center", va="center", fontsize=8.5)
        ax.text(x + box_w / 2, y - 0.1, note, ha="center", va="top", fontsize=7, color="#555555", family="monospace")

    def arrow(start, end):
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, color="#333333", linewidth=1.2))

    colours = ["#f2f2f2", "#f2f2f2", "#dde8f8", "#fde3cf", "#dde8f8", "#f2f2f2"]
    for k, ((text, note), colour) in enumerate(zip(PIPELINE_STAGES, colours)):
        box(0.1 + k * step, y, text, note, colour)
        if k:
            arrow((0.1 + (k - 1) * step + box_w, y + box_h / 2), (0.1 + k * step, y + box_h / 2))
    last_x = 0.1 + (len(PIPELINE_STAGES) - 1) * step + box_w
    out_x = last_x + 0.33
    for (text, note), out_y in zip(PIPELINE_OUTPUTS, (2.2, 0.45)):
        ax.add_patch(FancyBboxPatch((out_x, out_y), 1.45, 0.8, boxstyle="round,pad=0.03,rounding_size=0.12",
                                    facecolor="#e3f1e0", edgecolor="#333333", linewidth=1))
        ax.text(out_x + 0.725, out_y + 0.4, text, ha="center", va="center", fontsize=8.5)
        ax.text(out_x + 0.725, out_y - 0.08, note, ha="center", va="top", fontsize=7, color="#555555",
                family="monospace")
        arrow((last_x, y + box_h / 2), (out_x, out_y + 0.4))
    ax.set_title("The pipeline at a glance: data flows one way, each step is one module", fontsize=11)
    return save_figure(fig, path, dpi=100)

"""Statistics of a Severstal dataset: what notebook 01 and the data figures of ``graphs/`` show.

A dataset for exploration is a folder in Kaggle's layout (``train.csv`` in either format and
``train_images/``) or the real sample beside the repository (``../shared/data/severstal-real``), which
holds the real masks known so far (``train_partial_newformat.csv``), the complete per-image class table of
all 12,568 train images (``train_labels_per_image.csv``) and its images in ``train_images/`` and, for those
found only as PNG, ``train_images_png/`` (named by their ImageId's stem).

Everything here returns frames or arrays; the figures are drawn by :mod:`severstal.viz.draw`. Masks are
read from their RLE runs (:mod:`severstal.data.rle`), instances are the connected components of
:mod:`severstal.data.instances`, so no statistic decodes a mask to pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from severstal import CLASS_IDS
from severstal.data.annotations import read_annotations
from severstal.data.folds import CLASS_COLUMNS, image_files, masks_csv, read_class_table
from severstal.data.instances import DEFAULT_CONNECTIVITY, rles_to_instances
from severstal.data.rle import SHAPE, parse_rles
from severstal.files import REAL_LABELS_CSV, REAL_MASKS_CSV, TRAIN_CSV, real_data_root

log = logging.getLogger(__name__)



@dataclass
class ExploreData:
    """A dataset as exploration sees it.

    Attributes:
        root: the folder it was read from.
        masks: the known masks, one row per non-empty mask (``ImageId, ClassId, EncodedPixels``).
        classes: one row per image of the whole set: ``ImageId``, ``class1`` .. ``class4`` (0/1),
            ``n_classes``, and ``rle_known`` (1 when every mask of the image is in ``masks``).
        images: ImageId -> image file present in the folder.
    """

    root: Path
    masks: pd.DataFrame
    classes: pd.DataFrame
    images: dict[str, Path]


class Example(NamedTuple):
    """An image to show with its masks: ``image_id``, ``path`` and ``classes`` (class id -> Kaggle RLE)."""

    image_id: str
    path: Path
    classes: dict[int, str]


def default_data_dir() -> Path | None:
    """The real sample beside the repository when it is there, else ``None``."""
    real = real_data_root()
    return real if (real / REAL_MASKS_CSV).is_file() else None


def choose_data_dir(kaggle_dir: str | Path | None = None, synthetic_dir: str | Path = "_work/synthetic",
                    synthetic_images: int = 60) -> Path:
    """The dataset to explore: the user's Kaggle folder, else the real sample, else a synthetic set.

    Args:
        kaggle_dir: the user's folder in Kaggle's layout (``train.csv`` + ``train_images/``), or ``None``.
        synthetic_dir: where to write a synthetic set when neither is there (reused when present).
        synthetic_images: images of that synthetic set.
    """
    if kaggle_dir is not None:
        return Path(kaggle_dir)
    real = default_data_dir()
    if real is not None:
        return real
    synthetic_dir = Path(synthetic_dir)
    if not (synthetic_dir / TRAIN_CSV).is_file():
        from severstal.data.synth import make_synthetic_dataset

        log.info("no real data: writing %d synthetic images to %s", synthetic_images, synthetic_dir)
        make_synthetic_dataset(synthetic_dir, synthetic_images, seed=0)
    return synthetic_dir


def class_table(masks: pd.DataFrame, image_ids: Iterable[str]) -> pd.DataFrame:
    """Per-image class presence from masks: every image of ``image_ids`` and of ``masks``.

    Args:
        masks: one row per non-empty mask (``ImageId, ClassId, EncodedPixels``).
        image_ids: every image of the set, defect-free ones included.

    Returns:
        Frame sorted by ImageId: ``ImageId``, ``class1`` .. ``class4`` (int 0/1), ``n_classes``,
        ``rle_known`` (1: the masks are complete).
    """
    ids = sorted(set(image_ids) | set(masks["ImageId"]))
    present = pd.crosstab(masks["ImageId"], masks["ClassId"]).reindex(index=ids, columns=list(CLASS_IDS),
                                                                       fill_value=0)
    table = pd.DataFrame({"ImageId": ids})
    for class_id, column in zip(CLASS_IDS, CLASS_COLUMNS):
        table[column] = (present[class_id].to_numpy() > 0).astype(np.int64)
    table["n_classes"] = table[CLASS_COLUMNS].sum(axis=1)
    table["rle_known"] = 1
    return table


def load_dataset(root: str | Path) -> ExploreData:
    """Read a Kaggle-layout folder or the real sample for exploration.

    Args:
        root: a folder with ``train.csv`` (either format) or ``train_partial_newformat.csv``, and images
            in ``train_images/`` (and ``train_images_png/``). A ``train_labels_per_image.csv`` beside them
            gives the class table of the whole set; otherwise it comes from the masks, the CSV's image
            list and the images in the folder.

    Raises:
        FileNotFoundError: neither CSV is in ``root``.
    """
    root = Path(root)
    annotations = read_annotations(masks_csv(root))
    images = image_files(root)
    if (root / REAL_LABELS_CSV).is_file():
        classes = read_class_table(root / REAL_LABELS_CSV)
    else:
        classes = class_table(annotations.frame, set(annotations.image_ids) | set(images))
    log.info("%s: %d masks, %d images in the class table, %d image files", root, len(annotations.frame),
             len(classes), len(images))
    return ExploreData(root, annotations.frame, classes, images)


def dataset_summary(data: ExploreData) -> pd.DataFrame:
    """The headline numbers of a dataset, one row per fact (``what``, ``count``)."""
    classes = data.classes
    rows = [
        ("images in the class table", len(classes)),
        ("images with a defect", int((classes["n_classes"] > 0).sum())),
        ("defect-free images", int((classes["n_classes"] == 0).sum())),
        ("masks in the class table", int(classes["n_classes"].sum())),
        ("masks with a known RLE", len(data.masks)),
        ("images whose masks are all known", int(classes["rle_known"].sum())),
        ("image files in the folder", len(data.images)),
    ]
    return pd.DataFrame(rows, columns=["what", "count"])


def class_balance(data: ExploreData) -> pd.DataFrame:
    """Masks per class (rows 1..4) from the class table and, when some masks are unknown, from the known masks.

    Returns:
        One column per source: ``all N images`` (the class table), and ``masks with a known RLE`` when the
        class table holds images whose masks are not all in ``data.masks`` (the real sample).
    """
    counts = pd.DataFrame({f"all {len(data.classes):,} images": masks_per_class(data.classes)})
    if (data.classes["rle_known"] == 0).any():
        counts["masks with a known RLE"] = masks_per_class(class_table(data.masks, []))
    return counts


def masks_per_class(classes: pd.DataFrame) -> pd.Series:
    """Masks (images carrying the class) per class id, from a class table."""
    counts = classes[CLASS_COLUMNS].sum().to_numpy()
    return pd.Series(counts, index=pd.Index(CLASS_IDS, name="ClassId"), name="masks")


def images_per_class_count(classes: pd.DataFrame) -> pd.Series:
    """Images per number of classes on the image (0 = defect-free .. 4), from a class table."""
    counts = classes["n_classes"].value_counts()
    index = pd.Index(range(len(CLASS_IDS) + 1), name="classes on the image")
    return counts.reindex(index, fill_value=0).rename("images").astype(np.int64)


def mask_statistics(masks: pd.DataFrame, shape: tuple[int, int] = SHAPE,
                    connectivity: int = DEFAULT_CONNECTIVITY) -> pd.DataFrame:
    """Per mask: its area, its instances (connected components) and where it sits along the strip.

    Args:
        masks: one row per mask (``ImageId, ClassId, EncodedPixels``; an empty RLE is an empty mask).
        shape: ``(height, width)`` of the images.
        connectivity: 8 or 4, as :func:`severstal.data.instances.rles_to_instances`.

    Returns:
        Frame in the order of ``masks``: ``ImageId``, ``ClassId``, ``area`` (pixels), ``instances``
        (connected components), ``x0`` / ``x1`` (first and last column, NaN when empty) and ``x_centre``
        (the area-weighted mean column, pixels from the left edge; a run that wraps into the next
        column counts at its middle).
    """
    rles = masks["EncodedPixels"].fillna("").astype(str).tolist()
    class_ids = masks["ClassId"].astype(int).tolist()
    height = shape[0]
    runs = parse_rles(rles, shape)
    n = len(rles)
    area = np.bincount(runs.mask_index, weights=runs.lengths, minlength=n)
    # A run's pixel-weighted mean column: its flat centre over the column height.
    centre = (runs.starts + (runs.lengths - 1) / 2.0) // height
    weighted = np.bincount(runs.mask_index, weights=runs.lengths * centre, minlength=n)
    has_runs = np.diff(runs.offsets) > 0
    x0 = np.full(n, np.nan)
    x1 = np.full(n, np.nan)
    first, last = runs.offsets[:-1][has_runs], runs.offsets[1:][has_runs] - 1
    x0[has_runs] = runs.starts[first] // height
    x1[has_runs] = (runs.starts[last] + runs.lengths[last] - 1) // height
    instances = rles_to_instances(rles, class_ids, shape, connectivity=connectivity)
    return pd.DataFrame({
        "ImageId": masks["ImageId"].to_numpy(),
        "ClassId": np.asarray(class_ids, np.int64),
        "area": area.astype(np.int64),
        "instances": np.array([len(i) for i in instances], np.int64),
        "x0": x0,
        "x1": x1,
        "x_centre": np.where(area > 0, weighted / np.maximum(area, 1), np.nan),
    })


def image_statistics(stats: pd.DataFrame) -> pd.DataFrame:
    """Per image with a mask: ``masks``, ``instances`` and defect ``area`` (pixels), from :func:`mask_statistics`."""
    grouped = stats.groupby("ImageId", sort=True)
    return pd.DataFrame({"masks": grouped.size(), "instances": grouped["instances"].sum(),
                         "area": grouped["area"].sum()}).reset_index()


def defect_heatmaps(masks: pd.DataFrame, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """Where each class's defects sit: per pixel, the share of the class's masks that cover it.

    Returns:
        ``(4, height, width) float32`` in [0, 1], classes 1..4 in order (zeros for a class without masks).
    """
    height, width = shape
    n_pixels = height * width
    rles = masks["EncodedPixels"].fillna("").astype(str).tolist()
    runs = parse_rles(rles, shape)
    run_class = masks["ClassId"].to_numpy(np.int64)[runs.mask_index]
    maps = np.zeros((len(CLASS_IDS), height, width), np.float32)
    for k, class_id in enumerate(CLASS_IDS):
        n_masks = int((masks["ClassId"] == class_id).sum())
        chosen = run_class == class_id
        if not n_masks or not chosen.any():
            continue
        starts, ends = runs.starts[chosen], runs.starts[chosen] + runs.lengths[chosen]
        # Coverage as a difference array over the flat column-major pixels.
        steps = np.bincount(starts, minlength=n_pixels + 1) - np.bincount(ends, minlength=n_pixels + 1)
        coverage = np.cumsum(steps[:n_pixels]).reshape(width, height).T
        maps[k] = coverage / n_masks
    return maps


def pick_examples(data: ExploreData, per_class: int = 2) -> dict[int, list[Example]]:
    """Images to show for each class: local files whose masks are all known, the largest masks first.

    Args:
        data: the dataset.
        per_class: images per class (fewer when the folder holds fewer).

    Returns:
        Class id -> examples (each with every known mask of its image, not only the class's).
    """
    known = set(data.classes.loc[data.classes["rle_known"] == 1, "ImageId"]) & set(data.images)
    masks = data.masks[data.masks["ImageId"].isin(known)]
    stats = mask_statistics(masks)
    by_image = {image_id: dict(zip(group["ClassId"].astype(int), group["EncodedPixels"]))
                for image_id, group in masks.groupby("ImageId")}
    examples = {}
    for class_id in CLASS_IDS:
        ranked = stats[stats["ClassId"] == class_id].sort_values(["area", "ImageId"], ascending=[False, True])
        chosen = ranked["ImageId"].drop_duplicates().head(per_class)
        examples[class_id] = [Example(i, data.images[i], by_image[i]) for i in chosen]
    return examples


def pick_defect_free(data: ExploreData, count: int = 4) -> list[Example]:
    """Defect-free images with a local file, in ImageId order."""
    free = data.classes.loc[data.classes["n_classes"] == 0, "ImageId"]
    chosen = [i for i in free if i in data.images][:count]
    return [Example(i, data.images[i], {}) for i in chosen]


def showcase(data: ExploreData, count: int = 5) -> list[Example]:
    """Up to ``count`` images that show the whole set: one per class, then defect-free ones."""
    chosen = [examples[0] for examples in pick_examples(data, per_class=1).values() if examples]
    return (chosen + pick_defect_free(data, count))[:count]

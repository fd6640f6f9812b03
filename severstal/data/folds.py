"""Cross-validation data: which images have complete truth, stratified k folds, and a fold's training folder.

A labelled folder is either Kaggle's layout (``train.csv`` in either format + ``train_images/``) or the real
sample's (``train_partial_newformat.csv`` with only part of the masks, ``train_labels_per_image.csv`` with every
image's classes, images in ``train_images/`` and, found only as PNG, ``train_images_png/``). An image can be
scored only when its truth is complete: every class the per-image table gives it has its RLE (or the image is
defect-free). Without a per-image table every image of the folder is complete (Kaggle's ``train.csv`` lists all
masks). Images whose truth is incomplete are never trained on nor scored, and :class:`LabelledImages` counts them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from severstal import CLASS_IDS
from severstal.data.annotations import IMAGE_SUFFIXES, read_annotations
from severstal.files import REAL_LABELS_CSV, REAL_MASKS_CSV, TRAIN_CSV, TRAIN_IMAGES, write_text_atomic

log = logging.getLogger(__name__)

IMAGE_FOLDERS = (TRAIN_IMAGES, f"{TRAIN_IMAGES}_png")
"""Where a labelled folder keeps its images: the JPEGs, then those found only as PNG (named by the ImageId's stem)."""
CLASS_COLUMNS = [f"class{c}" for c in CLASS_IDS]
"""The class flags of a per-image class table (``train_labels_per_image.csv``)."""


def image_files(root: str | Path) -> dict[str, Path]:
    """ImageId -> file of every image in ``root``'s ``train_images/`` and ``train_images_png/``.

    A file of ``train_images_png/`` stands for the JPEG ImageId of the same stem (``x.png`` is ``x.jpg``).
    """
    files = {}
    for folder in IMAGE_FOLDERS:
        path = Path(root) / folder
        if not path.is_dir():
            continue
        for file in sorted(path.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                image_id = file.name if folder == IMAGE_FOLDERS[0] else f"{file.stem}.jpg"
                files.setdefault(image_id, file)
    return files


def read_class_table(path: str | Path) -> pd.DataFrame:
    """Read a per-image class table (the real sample's ``train_labels_per_image.csv``).

    Returns:
        Frame sorted by ImageId: ``ImageId``, ``class1`` .. ``class4`` (int 0/1), ``n_classes`` and ``rle_known``
        (1 when the table says every mask of the image is known; 1 for all when it has no such column).

    Raises:
        ValueError: a column is missing or a class flag is not 0/1, naming the file.
    """
    raw = pd.read_csv(path, dtype={"ImageId": str})
    missing = {"ImageId", *CLASS_COLUMNS} - set(raw.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    if not raw[CLASS_COLUMNS].isin([0, 1]).all().all():
        raise ValueError(f"{path}: class flags must be 0 or 1")
    table = raw[["ImageId", *CLASS_COLUMNS]].astype({c: np.int64 for c in CLASS_COLUMNS})
    table["n_classes"] = table[CLASS_COLUMNS].sum(axis=1)
    table["rle_known"] = raw["rle_known"].astype(np.int64) if "rle_known" in raw else 1
    return table.sort_values("ImageId").reset_index(drop=True)


@dataclass
class LabelledImages:
    """The images of a labelled folder that can be trained on and scored.

    Attributes:
        masks: every known mask of the complete images (``ImageId, ClassId, EncodedPixels``).
        files: ImageId -> image file, for the complete images only (sorted by ImageId).
        incomplete: ImageIds with a file whose truth is incomplete (left out).
    """

    masks: pd.DataFrame
    files: dict[str, Path]
    incomplete: list[str] = field(default_factory=list)

    @property
    def image_ids(self) -> list[str]:
        return list(self.files)

    def class_sets(self) -> dict[str, int]:
        """ImageId -> the set of its classes as bits (bit k: class k + 1; 0 for a defect-free image)."""
        bits = dict.fromkeys(self.files, 0)
        for image_id, class_id in zip(self.masks["ImageId"], self.masks["ClassId"]):
            bits[image_id] |= 1 << (int(class_id) - 1)
        return bits


def masks_csv(root: str | Path) -> Path:
    """The masks table of a labelled folder: ``train.csv``, else the real sample's partial table.

    Raises:
        FileNotFoundError: neither is there, naming the folder.
    """
    root = Path(root)
    csv = next((root / name for name in (TRAIN_CSV, REAL_MASKS_CSV) if (root / name).is_file()), None)
    if csv is None:
        raise FileNotFoundError(f"{root}: no {TRAIN_CSV} (Kaggle's layout) or {REAL_MASKS_CSV} (the real sample)")
    return csv


def read_labelled_images(root: str | Path) -> LabelledImages:
    """Read a labelled folder (Kaggle's layout or the real sample's, see the module) and keep its complete images.

    Raises:
        FileNotFoundError: no ``train.csv`` nor ``train_partial_newformat.csv``, or no image, naming the folder.
    """
    root = Path(root)
    csv = masks_csv(root)
    files = image_files(root)
    if not files:
        raise FileNotFoundError(f"{root}: no JPEG/PNG image in {' or '.join(IMAGE_FOLDERS)}")
    masks = read_annotations(csv).frame
    masks = masks[masks["ImageId"].isin(files)]
    incomplete: list[str] = []
    if (root / REAL_LABELS_CSV).is_file():
        table = read_class_table(root / REAL_LABELS_CSV).set_index("ImageId")
        unlisted = sorted(set(files) - set(table.index))
        if unlisted:
            raise ValueError(f"{root / REAL_LABELS_CSV}: {len(unlisted)} images of the folder are not listed, "
                             f"e.g. {unlisted[:3]}")
        known = set(zip(masks["ImageId"], masks["ClassId"].astype(int)))
        for image_id in files:
            flags = table.loc[image_id, CLASS_COLUMNS].to_numpy()
            if any(flag and (image_id, c) not in known for c, flag in zip(CLASS_IDS, flags)):
                incomplete.append(image_id)
    left_out = set(incomplete)
    return LabelledImages(masks=masks[~masks["ImageId"].isin(left_out)].reset_index(drop=True),
                          files={i: f for i, f in files.items() if i not in left_out}, incomplete=incomplete)


def stratified_folds(class_sets: Mapping[str, int], k: int = 5, seed: int = 0) -> list[list[str]]:
    """Split images into ``k`` folds, stratified by the set of classes on each image.

    Images are grouped by class set, each group shuffled by ``seed``, and the groups, one after the other, are
    dealt round the folds: every class set is spread as evenly as it can be, fold sizes differ by at most one,
    and no image is in two folds. The same inputs and seed give the same folds, whatever the mapping's order.

    Returns:
        ``k`` sorted lists of ImageIds.

    Raises:
        ValueError: ``k`` < 2 or more folds than images.
    """
    if k < 2 or k > len(class_sets):
        raise ValueError(f"folds must be between 2 and the number of images ({len(class_sets)}), got {k}")
    rng = np.random.default_rng(seed)
    groups: dict[int, list[str]] = {}
    for image_id in sorted(class_sets):
        groups.setdefault(class_sets[image_id], []).append(image_id)
    dealt = [group[i] for key in sorted(groups) for group in [groups[key]] for i in rng.permutation(len(group))]
    return [sorted(str(i) for i in dealt[fold::k]) for fold in range(k)]


def write_training_folder(out: str | Path, images: LabelledImages, image_ids: Sequence[str]) -> Path:
    """A folder in Kaggle's layout holding only ``image_ids``: ``train.csv`` (later format) and ``train_images/``
    (links to the files, named by ImageId; a PNG keeps its bytes under the ``.jpg`` name: decoders read the content).
    """
    out = Path(out)
    folder = out / TRAIN_IMAGES
    folder.mkdir(parents=True, exist_ok=True)
    for image_id in image_ids:
        link = folder / image_id
        if not link.exists():
            os.symlink(images.files[image_id].resolve(), link)
    masks = images.masks[images.masks["ImageId"].isin(set(image_ids))]
    write_text_atomic(out / TRAIN_CSV, masks.to_csv(index=False))
    return out

"""Severstal for Detectron2: standard dataset dicts, explicit registration, a stratified train/val split.

Load, then register: :func:`load_severstal_dicts` returns Detectron2's list of dicts from a
``train.csv`` and an image folder (opening no image), :func:`register_severstal` registers that under a
name with its metadata, :func:`unregister` removes it. Nothing registers at import.

Data live in folders laid out as Kaggle ships them: ``train.csv`` (either format) and ``train_images/``.
The default folder is ``$SEVERSTAL_DATA``, else ``datasets/severstal`` (relative to the working directory,
like Detectron2's ``$DETECTRON2_DATASETS``). :func:`register_data_dir` registers the train and val parts
of such a folder under the names the caller chooses.

A dict's ``image_id`` is the Kaggle ImageId (the file name, e.g. ``"0002cc93b.jpg"``), as Detectron2's own
Pascal VOC and Cityscapes loaders use names, so that predictions map straight back to submission rows.

Detectron2 (and with it torch) is imported inside the functions that need it, so that converting and
splitting annotations stays light.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from severstal import CLASS_IDS
from severstal.data.annotations import list_images, read_annotations
from severstal.data.instances import DEFAULT_CONNECTIVITY, rles_to_instances
from severstal.data.rle import SHAPE
from severstal.files import TRAIN_CSV, TRAIN_IMAGES, data_root

logger = logging.getLogger(__name__)

THING_CLASSES = tuple(f"class {c}" for c in CLASS_IDS)
"""Detectron2 ``thing_classes``: contiguous id ``k`` is Kaggle class ``k + 1``."""

def split_image_ids(
    frame: pd.DataFrame, image_ids: Iterable[str], val_fraction: float, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split images into train and val, stratified by the set of classes on each image.

    Images are grouped by their class set (none, {3}, {1, 3} ...); each group gives its share of val
    images, the rounding spread so that the total is ``round(len(image_ids) * val_fraction)``. The same
    inputs and seed always give the same split, whatever the order of ``image_ids``.

    Args:
        frame: masks as :func:`severstal.data.annotations.read_train_csv` returns (rows of images outside
            ``image_ids`` are ignored).
        image_ids: the images to split.
        val_fraction: share of images for val, in ``[0, 1)``.
        seed: seed of the random choice within each group.

    Returns:
        ``(train_ids, val_ids)``, each sorted.

    Raises:
        ValueError: ``val_fraction`` outside ``[0, 1)``.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    image_ids = sorted(set(image_ids))
    # The class set of an image as a bit mask (bit k: class k + 1); (image, class) pairs are unique.
    class_bits = pd.Series(np.left_shift(1, frame["ClassId"].to_numpy(np.int64) - 1), index=frame.index)
    class_sets = class_bits.groupby(frame["ImageId"]).sum().to_dict()
    groups: dict[int, list[str]] = {}
    for image_id in image_ids:
        groups.setdefault(class_sets.get(image_id, 0), []).append(image_id)
    keys = sorted(groups)
    shares = np.array([len(groups[k]) * val_fraction for k in keys])
    quota = np.floor(shares).astype(int)
    missing = round(len(image_ids) * val_fraction) - int(quota.sum())
    # Largest remainders first; ties go to the earlier group (a stable sort), so the result is deterministic.
    quota[np.argsort(-(shares - quota), kind="stable")[:missing]] += 1

    rng = np.random.default_rng(seed)
    val: list[str] = []
    for key, n_val in zip(keys, quota):
        members = groups[key]
        val.extend(members[i] for i in rng.permutation(len(members))[:n_val])
    val_set = set(val)
    return [i for i in image_ids if i not in val_set], sorted(val)


def load_severstal_dicts(
    csv: str | Path,
    image_root: str | Path,
    include_empty: bool = True,
    image_ids: Iterable[str] | None = None,
    min_area: int = 0,
    shape: tuple[int, int] = SHAPE,
    connectivity: int = DEFAULT_CONNECTIVITY,
) -> list[dict]:
    """Detectron2's standard dataset dicts for Severstal; opens no image.

    Args:
        csv: ``train.csv`` in either format.
        image_root: folder of the images.
        include_empty: keep images without instances (defect-free), with an empty ``annotations``.
        image_ids: the images to load (file names in ``image_root``), in this order; default every image
            there. Masks of other images are left out (a warning counts them when loading the folder).
        min_area: instances (connected components) with fewer pixels are dropped.
        shape: ``(height, width)`` of every image (Severstal: 256 x 1600); not read from the files.
        connectivity: 8 or 4, see :mod:`severstal.data.instances`.

    Returns:
        One dict per image: ``file_name``, ``image_id`` (the ImageId, e.g. ``"0002cc93b.jpg"``),
        ``height``, ``width``, ``annotations``: a list of ``{"bbox": [x, y, w, h], "bbox_mode":
        BoxMode.XYWH_ABS, "segmentation": {"size": [h, w], "counts": str}, "area": int,
        "category_id": 0..3}``.

    Raises:
        FileNotFoundError: the CSV or the folder is missing.
        ValueError: a bad CSV row (see :func:`severstal.data.annotations.read_annotations`), or ``image_ids``
            naming files that are not in ``image_root``.
    """
    from detectron2.structures import BoxMode

    image_root = Path(image_root)
    annotations = read_annotations(csv, shape)
    folder = list_images(image_root)
    if image_ids is None:
        selected = folder
        outside = int((~annotations.frame["ImageId"].isin(folder)).sum())
        if outside:
            logger.warning("%s: %d masks are of images not in %s; left out", csv, outside, image_root)
    else:
        selected = list(image_ids)
        absent = sorted(set(selected) - set(folder))
        if absent:
            raise ValueError(f"{len(absent)} image_ids are not in {image_root}, e.g. {absent[:3]}")
    frame = annotations.frame[annotations.frame["ImageId"].isin(selected)]
    instances = rles_to_instances(frame["EncodedPixels"], frame["ClassId"], shape, min_area, connectivity)
    per_image: dict[str, list[dict]] = {}
    for image_id, image_instances in zip(frame["ImageId"], instances):
        for instance in image_instances:
            instance["bbox_mode"] = BoxMode.XYWH_ABS
        per_image.setdefault(image_id, []).extend(image_instances)

    height, width = shape
    dicts = []
    for image_id in selected:
        records = per_image.get(image_id, [])
        if records or include_empty:
            dicts.append(
                {"file_name": str(image_root / image_id), "image_id": image_id, "height": height,
                 "width": width, "annotations": records}
            )
    return dicts


def register_severstal(
    name: str,
    csv: str | Path,
    image_root: str | Path,
    image_ids: Iterable[str] | None = None,
    include_empty: bool = True,
    min_area: int = 0,
    shape: tuple[int, int] = SHAPE,
):
    """Register a Severstal dataset with Detectron2's ``DatasetCatalog`` and ``MetadataCatalog``.

    The dicts are loaded when Detectron2 asks for them (:func:`load_severstal_dicts`).

    Args:
        name: the dataset name, e.g. ``"severstal_train"``.
        csv, image_root, image_ids, include_empty, min_area, shape: as :func:`load_severstal_dicts`.

    Returns:
        The dataset's ``Metadata``: ``thing_classes`` (:data:`THING_CLASSES`), ``evaluator_type``
        ``"coco"``, ``csv`` and ``image_root``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        raise ValueError(f"dataset {name!r} is already registered: unregister({name!r}) first")
    image_ids = None if image_ids is None else tuple(image_ids)
    DatasetCatalog.register(
        name,
        functools.partial(load_severstal_dicts, csv, image_root, include_empty, image_ids, min_area, shape),
    )
    return MetadataCatalog.get(name).set(
        thing_classes=list(THING_CLASSES), evaluator_type="coco", csv=str(csv), image_root=str(image_root)
    )


def register_data_dir(
    data_dir: str | Path | None,
    train_name: str | None,
    val_name: str | None,
    val_fraction: float = 0.2,
    seed: int = 0,
    image_ids: Iterable[str] | None = None,
    **kwargs,
) -> dict:
    """Register the train and val parts of a data folder (``train.csv`` + ``train_images/``).

    Args:
        data_dir: the folder; ``None`` or ``""``: :func:`data_root`.
        train_name: name to register the train part under; ``None`` registers no train part.
        val_name: name to register the val part under; ``None`` registers no val part.
        val_fraction, seed: the split (:func:`split_image_ids`) of every image in ``train_images/``.
        image_ids: the val images, instead of a split (e.g. a training run's saved val list); the train
            part is then every other image of the folder.
        **kwargs: passed on to :func:`register_severstal` (``include_empty``, ``min_area``, ``shape``).

    Returns:
        The split, JSON-ready: ``{"data_dir", "val_fraction", "seed", "train": [...], "val": [...]}``.

    Raises:
        FileNotFoundError: the CSV or the image folder is missing.
        ValueError: a bad CSV row, ``image_ids`` not in the folder, a name already registered.
    """
    data_dir = data_root() if not data_dir else Path(data_dir)
    csv, image_root = data_dir / TRAIN_CSV, data_dir / TRAIN_IMAGES
    folder = list_images(image_root)
    if image_ids is None:
        train_ids, val_ids = split_image_ids(read_annotations(csv).frame, folder, val_fraction, seed)
    else:
        val_ids = sorted(set(image_ids))
        absent = sorted(set(val_ids) - set(folder))
        if absent:
            raise ValueError(f"{len(absent)} image_ids are not in {image_root}, e.g. {absent[:3]}")
        train_ids = sorted(set(folder) - set(val_ids))
    for name, ids in ((train_name, train_ids), (val_name, val_ids)):
        if name is not None:
            register_severstal(name, csv, image_root, ids, **kwargs)
    return {"data_dir": str(data_dir), "val_fraction": val_fraction, "seed": seed, "train": train_ids, "val": val_ids}


def unregister(name: str) -> None:
    """Remove a dataset from Detectron2's ``DatasetCatalog`` and ``MetadataCatalog``.

    Raises:
        ValueError: ``name`` is not registered.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        raise ValueError(f"dataset {name!r} is not registered")
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)

"""COCO instance JSON from a Severstal ``train.csv``: ``train.json`` and ``val.json`` that pycocotools loads.

Each class mask becomes one instance per connected component (:mod:`severstal.data.instances`), with a COCO
RLE segmentation, so holes in a defect stay holes. Category ids are Detectron2's contiguous ids,
``ClassId - 1`` (0..3), named ``"class 1"`` .. ``"class 4"``. Image ids are the 1-based position of the
image in the sorted list of every image the CSV and the image folder name, so an image has the same id
in ``train.json`` and ``val.json`` whatever the split; annotation ids start at 1 (COCOeval reads id 0
as "unmatched"). The ImageId is the image's ``file_name``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from severstal import CLASS_IDS
from severstal.data.annotations import list_images, read_annotations, write_text_atomic
from severstal.data.datasets import THING_CLASSES, split_image_ids
from severstal.data.instances import DEFAULT_CONNECTIVITY, rles_to_instances
from severstal.data.rle import SHAPE, RLEError

logger = logging.getLogger(__name__)

CHUNK = 1000
"""Masks converted per call: big enough for vectorisation to pay, small enough for a moving progress bar."""
CATEGORIES = [{"id": c - 1, "name": name, "supercategory": "defect"} for c, name in zip(CLASS_IDS, THING_CLASSES)]


def _image_shapes(images: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """``(height, width)`` of each image, from the file header only (PIL decodes no pixels here)."""
    shapes = {}
    for name in tqdm(names, desc="image sizes", unit="image"):
        with Image.open(images / name) as image:
            width, height = image.size
        shapes[name] = (height, width)
    return shapes


def _frame_instances(
    frame: pd.DataFrame, shapes: dict[str, tuple[int, int]], min_area: int, connectivity: int, source: str
) -> list[list[dict]]:
    """Instances of every mask of ``frame`` (a row's list at its position), converted in chunks of the same
    image shape so that the progress bar moves."""
    instances: list[list[dict]] = [[] for _ in range(len(frame))]
    image_shapes = frame["ImageId"].map(shapes)
    with tqdm(total=len(frame), desc="instances", unit="mask") as progress:
        for shape in sorted(set(image_shapes)):
            same_shape = (image_shapes == shape).to_numpy().nonzero()[0]
            for start in range(0, same_shape.size, CHUNK):
                rows = same_shape[start : start + CHUNK]
                try:
                    converted = rles_to_instances(
                        frame["EncodedPixels"].iloc[rows], frame["ClassId"].iloc[rows], shape, min_area, connectivity
                    )
                except RLEError as err:
                    image_id = frame["ImageId"].iloc[rows[err.index]]
                    raise ValueError(f"{source}: mask of {image_id} ({shape[0]} x {shape[1]}): {err}") from None
                for row, found in zip(rows, converted):
                    instances[row] = found
                progress.update(rows.size)
    return instances


def _coco_file(images: list[dict], annotations: list[dict], source: str) -> dict:
    """A COCO instances file: its images, their annotations, the four categories."""
    return {
        "info": {"description": "Severstal steel defects, one instance per connected component", "source": source},
        "licenses": [],
        "categories": CATEGORIES,
        "images": images,
        "annotations": annotations,
    }


def convert_to_coco(
    csv: str | Path,
    out_dir: str | Path,
    images: str | Path | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    min_area: int = 0,
    connectivity: int = DEFAULT_CONNECTIVITY,
) -> dict:
    """Convert a ``train.csv`` into COCO instance files ``out_dir/train.json`` and ``out_dir/val.json``.

    Args:
        csv: ``train.csv`` in either format.
        out_dir: folder to write to (created if missing); both files are written atomically.
        images: image folder. With it, every image there is included (defect-free ones too) with its
            size read from the file header, and masks of images not there are left out (the summary
            counts them). Without it, the images are those the CSV names, 256 x 1600.
        val_fraction: share of images for ``val.json`` (stratified by class set, see
            :func:`severstal.data.datasets.split_image_ids`); 0 leaves ``val.json`` without images.
        seed: seed of the split.
        min_area: instances with fewer pixels are dropped.
        connectivity: 8 or 4, see :mod:`severstal.data.instances`.

    Returns:
        Summary: ``images``, ``train_images``, ``val_images``, ``instances``, ``instances_per_class``
        (Kaggle class id -> count), ``masks``, ``masks_left_out``, ``train_json``, ``val_json``.

    Raises:
        FileNotFoundError: the CSV or the image folder is missing.
        ValueError: a bad CSV row, or a mask that does not fit its image.
    """
    annotations = read_annotations(csv)
    if images is None:
        names = annotations.image_ids
        shapes = dict.fromkeys(names, SHAPE)
    else:
        names = list_images(images)
        shapes = _image_shapes(Path(images), names)
    numbers = {name: n for n, name in enumerate(sorted(set(annotations.image_ids) | set(names)), start=1)}
    inside = annotations.frame["ImageId"].isin(names)
    frame = annotations.frame[inside].reset_index(drop=True)
    if not inside.all():
        logger.warning("%s: %d masks are of images not in %s; left out", csv, int((~inside).sum()), images)

    instances = _frame_instances(frame, shapes, min_area, connectivity, str(csv))
    per_image: dict[str, list[dict]] = {}
    for image_id, found in zip(frame["ImageId"], instances):
        per_image.setdefault(image_id, []).extend(found)
    train_ids, val_ids = split_image_ids(frame, names, val_fraction, seed)

    per_class = dict.fromkeys(CLASS_IDS, 0)
    written = {}
    for part, part_ids in (("train", train_ids), ("val", val_ids)):
        coco_images, coco_annotations = [], []
        for image_id in part_ids:
            height, width = shapes[image_id]
            number = numbers[image_id]
            coco_images.append({"id": number, "file_name": image_id, "height": height, "width": width})
            for instance in per_image.get(image_id, []):
                coco_annotations.append({"id": len(coco_annotations) + 1, "image_id": number, "iscrowd": 0, **instance})
                per_class[instance["category_id"] + 1] += 1
        text = json.dumps(_coco_file(coco_images, coco_annotations, str(csv)), separators=(",", ":"))
        written[f"{part}_json"] = str(write_text_atomic(Path(out_dir) / f"{part}.json", text))
    return {
        "images": len(names),
        "train_images": len(train_ids),
        "val_images": len(val_ids),
        "instances": sum(per_class.values()),
        "instances_per_class": per_class,
        "masks": len(frame),
        "masks_left_out": int((~inside).sum()),
        **written,
    }

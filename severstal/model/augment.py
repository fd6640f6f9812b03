"""Training augmentation for steel strips: crops, flips both ways, brightness and contrast, copy-paste.

:class:`SteelMapper` turns a Detectron2 dataset dict into the model's training input as Detectron2's
``DatasetMapper`` does (bitmask instances), with two differences: before the geometric augmentation it may paste
the defect instances of another training image onto this one (:func:`copy_paste`), and after it every box is
recomputed from its mask, so that a crop that keeps only part of an instance keeps a tight box, and an instance
the crop leaves no pixel of is dropped. The config keys are ``SEVERSTAL.CROP_WIDTH``, ``BRIGHTNESS_CONTRAST`` and
``COPY_PASTE_PROB`` (``severstal.model.config``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

MIN_VISIBLE_PIXELS = 16
"""An instance left with fewer pixels after another is pasted over it is dropped."""


def training_augmentations(cfg) -> list[T.Augmentation]:
    """The geometric and photometric augmentation of a training image, in order."""
    augmentations: list[T.Augmentation] = []
    if cfg.SEVERSTAL.CROP_WIDTH:
        # "absolute" crops min(size, image size) on each side: the whole height, CROP_WIDTH of the width.
        augmentations.append(T.RandomCrop("absolute", (10**6, int(cfg.SEVERSTAL.CROP_WIDTH))))
    augmentations += [
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING),
        T.RandomFlip(horizontal=True, vertical=False),
        T.RandomFlip(horizontal=False, vertical=True),
    ]
    if cfg.SEVERSTAL.BRIGHTNESS_CONTRAST:
        x = float(cfg.SEVERSTAL.BRIGHTNESS_CONTRAST)
        augmentations += [T.RandomBrightness(1 - x, 1 + x), T.RandomContrast(1 - x, 1 + x)]
    return augmentations


def _decode(annotation: dict, shape: tuple[int, int]) -> np.ndarray:
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, np.ndarray):
        return segmentation.astype(bool)
    rle = dict(segmentation, counts=segmentation["counts"].encode()) if isinstance(segmentation["counts"], str) \
        else segmentation
    return mask_util.decode(rle).astype(bool).reshape(shape)


def _annotation(mask: np.ndarray, category_id: int) -> dict:
    """A dataset annotation (XYWH box, COCO RLE) for a boolean mask."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = (float(v) for v in mask_util.toBbox(rle))
    return {"bbox": [x, y, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": int(category_id),
            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()}, "area": int(mask.sum()),
            "iscrowd": 0}


def copy_paste(image: np.ndarray, annotations: Sequence[dict], donor_image: np.ndarray,
               donor_annotations: Sequence[dict], shift: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Paste the donor's defect instances onto ``image`` (Simple Copy-Paste, Ghiasi et al. 2021).

    Both images are of one size. The donor image and masks are rolled ``shift`` pixels to the right (wrapping);
    the donor's pixels replace the image's under the union of its masks; each instance of ``image`` loses the
    pixels pasted over it (and is dropped when fewer than :data:`MIN_VISIBLE_PIXELS` remain), its box shrinking
    to what is left.

    Returns:
        The new image and its annotations: the visible original instances, then the pasted ones.
    """
    if image.shape != donor_image.shape:
        raise ValueError(f"copy_paste needs images of one size, got {image.shape} and {donor_image.shape}")
    shape = image.shape[:2]
    pasted = [(np.roll(_decode(a, shape), shift, axis=1), a["category_id"]) for a in donor_annotations]
    pasted = [(m, c) for m, c in pasted if m.any()]
    if not pasted:
        return image, list(annotations)
    cover = np.logical_or.reduce([m for m, _ in pasted])
    out = image.copy()
    out[cover] = np.roll(donor_image, shift, axis=1)[cover]
    kept = []
    for a in annotations:
        visible = _decode(a, shape) & ~cover
        if visible.sum() >= MIN_VISIBLE_PIXELS:
            kept.append(_annotation(visible, a["category_id"]))
    return out, kept + [_annotation(m, c) for m, c in pasted]


class SteelMapper:
    """Dataset dict -> training input (``image`` tensor, ``instances`` with bitmasks), see the module.

    Args:
        cfg: the training config.
        donors: dataset dicts with defects whose instances may be pasted (``SEVERSTAL.COPY_PASTE_PROB``).
    """

    def __init__(self, cfg, donors: Sequence[dict] = ()):
        self.augmentations = T.AugmentationList(training_augmentations(cfg))
        self.image_format = cfg.INPUT.FORMAT
        self.copy_paste_prob = float(cfg.SEVERSTAL.COPY_PASTE_PROB)
        self.donors = [d for d in donors if d.get("annotations")]

    def __call__(self, dataset_dict: dict) -> dict:
        record = copy.deepcopy(dataset_dict)
        image = utils.read_image(record["file_name"], format=self.image_format)
        annotations = [a for a in record.pop("annotations", []) if not a.get("iscrowd", 0)]
        # np.random: Detectron2 seeds it in every data-loading worker, as it does for its own augmentations.
        if self.donors and np.random.rand() < self.copy_paste_prob:
            donor = self.donors[np.random.randint(len(self.donors))]
            if donor["file_name"] != record["file_name"]:
                donor_image = utils.read_image(donor["file_name"], format=self.image_format)
                image, annotations = copy_paste(image, annotations, donor_image, donor["annotations"],
                                                shift=int(np.random.randint(image.shape[1])))
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        shape = image.shape[:2]
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        annotations = [utils.transform_instance_annotations(a, transforms, shape) for a in annotations]
        instances = utils.annotations_to_instances(annotations, shape, mask_format="bitmask")
        if len(instances):
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        record["instances"] = utils.filter_empty_instances(instances)
        return record

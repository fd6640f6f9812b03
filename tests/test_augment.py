"""Training augmentation: copy-paste keeps boxes, masks and classes consistent; crops keep tight boxes."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import pytest

from severstal.data.datasets import load_severstal_dicts
from severstal.data.folds import read_labelled_images, write_training_folder
from severstal.model.augment import SteelMapper, _decode, copy_paste
from severstal.model.config import get_severstal_cfg

SHAPE = (32, 64)


def annotation(mask: np.ndarray, category_id: int) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()}, "category_id": category_id,
            "bbox": [float(v) for v in mask_util.toBbox(rle)], "bbox_mode": 1}


def box_of(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask)
    x, y = cols.min(), rows.min()
    return [float(x), float(y), float(cols.max() - x + 1), float(rows.max() - y + 1)]


def test_copy_paste_pastes_pixels_and_instances_and_occludes_what_lies_under():
    image = np.full((*SHAPE, 3), 10, np.uint8)
    donor = np.full((*SHAPE, 3), 200, np.uint8)
    own = np.zeros(SHAPE, bool)
    own[4:20, 10:40] = True  # class 1, half of it under the donor's defect
    hidden = np.zeros(SHAPE, bool)
    hidden[25:27, 30:33] = True  # class 2, 6 pixels, all under the donor's defect
    theirs = np.zeros(SHAPE, bool)
    theirs[0:32, 25:45] = True  # class 3 of the donor
    out, annotations = copy_paste(image, [annotation(own, 0), annotation(hidden, 1)], donor,
                                  [annotation(theirs, 2)], shift=0)
    assert (out[theirs] == 200).all() and (out[~theirs] == 10).all()
    assert [a["category_id"] for a in annotations] == [0, 2]  # the hidden instance is gone
    visible = own & ~theirs
    for a, mask in zip(annotations, [visible, theirs]):
        decoded = _decode(a, SHAPE)
        np.testing.assert_array_equal(decoded, mask)
        assert a["area"] == mask.sum() and a["bbox"] == box_of(mask)


def test_copy_paste_shifts_the_donor_with_its_masks():
    image = np.zeros((*SHAPE, 3), np.uint8)
    donor = np.zeros((*SHAPE, 3), np.uint8)
    theirs = np.zeros(SHAPE, bool)
    theirs[5:10, 60:64] = True
    donor[theirs] = 255
    out, [pasted] = copy_paste(image, [], donor, [annotation(theirs, 3)], shift=10)
    moved = np.roll(theirs, 10, axis=1)  # wraps round to columns 6..9
    np.testing.assert_array_equal(_decode(pasted, SHAPE), moved)
    assert (out[moved] == 255).all() and out[~moved].max() == 0
    assert pasted["bbox"] == box_of(moved) and pasted["category_id"] == 3


def test_copy_paste_refuses_images_of_two_sizes():
    with pytest.raises(ValueError, match="one size"):
        copy_paste(np.zeros((4, 4, 3), np.uint8), [], np.zeros((4, 5, 3), np.uint8), [])


@pytest.fixture(scope="module")
def real_dicts(real_data, tmp_path_factory):
    images = read_labelled_images(real_data)
    defective = sorted(set(images.masks["ImageId"]))[:6]
    folder = write_training_folder(tmp_path_factory.mktemp("fold"), images, defective)
    return load_severstal_dicts(folder / "train.csv", folder / "train_images")


def test_the_mapper_gives_tight_boxes_and_masks_of_the_crop_on_real_images(real_dicts):
    cfg = get_severstal_cfg("fewlabels", ["SEVERSTAL.COPY_PASTE_PROB", "1.0"])
    mapper = SteelMapper(cfg, real_dicts)
    np.random.seed(0)
    classes_seen, instances_seen = set(), 0
    for record in real_dicts * 3:
        out = mapper(record)
        height, width = out["image"].shape[1:]
        assert (height, width) == (128, 400)  # a 256 x 800 crop at half resolution
        instances = out["instances"]
        masks = instances.gt_masks.tensor.numpy()
        boxes = instances.gt_boxes.tensor.numpy()
        assert masks.shape == (len(instances), height, width)
        for mask, box in zip(masks, boxes):
            assert mask.any()
            rows, cols = np.nonzero(mask)
            np.testing.assert_allclose(box, [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        classes_seen |= set(instances.gt_classes.tolist())
        instances_seen += len(instances)
    assert instances_seen > len(real_dicts) and classes_seen <= {0, 1, 2, 3} and len(classes_seen) >= 2

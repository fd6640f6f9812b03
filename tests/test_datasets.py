"""severstal.data.datasets: Detectron2 dicts from the real data, explicit registration, the stratified split."""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_util

from severstal.data.annotations import read_annotations
from severstal.data.datasets import (
    THING_CLASSES,
    data_root,
    load_severstal_dicts,
    register_data_dir,
    register_severstal,
    split_image_ids,
    unregister,
)
from severstal.data.rle import rle_to_mask


@pytest.fixture(scope="module")
def real_csv(real_data):
    return real_data / "train_partial_newformat.csv"


@pytest.fixture(scope="module")
def labels(real_data):
    return pd.read_csv(real_data / "train_labels_per_image.csv")


@pytest.fixture
def data_dir(real_data, real_csv, tmp_path):
    """A data folder in Kaggle's layout: the real masks and the real images."""
    (tmp_path / "train.csv").write_bytes(real_csv.read_bytes())
    (tmp_path / "train_images").symlink_to(real_data / "train_images")
    return tmp_path


def class_set_counts(frame: pd.DataFrame, image_ids) -> Counter:
    sets = frame.groupby("ImageId")["ClassId"].agg(lambda c: tuple(sorted(c)))
    return Counter(sets.get(i, ()) for i in image_ids)


def test_split_is_stratified_by_class_set_and_deterministic(real_csv, labels):
    frame = read_annotations(real_csv).frame
    # Every known image: 5,902 defect-free plus the 4,479 with masks.
    image_ids = list(labels.loc[labels["rle_known"] == 1, "ImageId"])
    train, val = split_image_ids(frame, image_ids, 0.2, seed=7)
    assert len(val) == round(len(image_ids) * 0.2) and len(train) + len(val) == len(image_ids)
    assert not set(train) & set(val) and set(train) | set(val) == set(image_ids)
    assert train == sorted(train) and val == sorted(val)
    total, in_val = class_set_counts(frame, image_ids), class_set_counts(frame, val)
    for class_set, n in total.items():
        assert abs(in_val[class_set] - 0.2 * n) < 1, class_set
    assert split_image_ids(frame, image_ids[::-1], 0.2, seed=7) == (train, val)
    assert split_image_ids(frame, image_ids, 0.2, seed=8)[1] != val


def test_split_edge_cases(real_csv):
    frame = read_annotations(real_csv).frame
    ids = sorted(set(frame["ImageId"]))[:50]
    assert split_image_ids(frame, ids, 0.0) == (ids, [])
    assert len(split_image_ids(frame, ids, 0.5)[1]) == 25
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
            split_image_ids(frame, ids, bad)


def test_loader_returns_detectron2_dicts_for_every_image_of_the_folder(real_data, real_csv, labels):
    from detectron2.structures import BoxMode

    dicts = load_severstal_dicts(real_csv, real_data / "train_images")
    folder = sorted(p.name for p in (real_data / "train_images").iterdir())
    assert [d["image_id"] for d in dicts] == folder
    truth = pd.read_csv(real_csv)
    truth = truth[truth["ImageId"].isin(folder)]
    masks = dict(zip(zip(truth["ImageId"], truth["ClassId"]), truth["EncodedPixels"]))
    for d in dicts:
        assert d["file_name"] == str(real_data / "train_images" / d["image_id"])
        assert (d["height"], d["width"]) == (256, 1600)
        for ann in d["annotations"]:
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS and ann["category_id"] in (0, 1, 2, 3)
            assert isinstance(ann["segmentation"]["counts"], str)
        for class_id in {a["category_id"] + 1 for a in d["annotations"]}:
            segs = [a["segmentation"] for a in d["annotations"] if a["category_id"] + 1 == class_id]
            union = mask_util.decode(mask_util.merge(segs))
            assert np.array_equal(union, rle_to_mask(masks[(d["image_id"], class_id)]))
    assert sum(len({a["category_id"] for a in d["annotations"]}) for d in dicts) == len(masks)

    with_defects = load_severstal_dicts(real_csv, real_data / "train_images", include_empty=False)
    assert [d["image_id"] for d in with_defects] == [d["image_id"] for d in dicts if d["annotations"]]
    defect_free = set(labels.loc[labels["n_defect_classes"] == 0, "ImageId"])
    assert any(d["image_id"] in defect_free and not d["annotations"] for d in dicts)


def test_loader_takes_a_list_of_images_and_checks_it(real_data, real_csv):
    some = ["0a1cade03.jpg", "000a4bcdd.jpg"]
    assert [d["image_id"] for d in load_severstal_dicts(real_csv, real_data / "train_images", image_ids=some)] == some
    with pytest.raises(ValueError, match=r"1 image_ids are not in .*nope.jpg"):
        load_severstal_dicts(real_csv, real_data / "train_images", image_ids=["nope.jpg"])
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_severstal_dicts(real_csv, real_data / "absent")


def test_nothing_registers_at_import():
    from detectron2.data import DatasetCatalog

    assert "severstal.data.datasets" in sys.modules
    assert not [name for name in DatasetCatalog.list() if name.startswith("severstal")]


def test_register_and_unregister(real_data, real_csv):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    name = "severstal_test_register"
    metadata = register_severstal(name, real_csv, real_data / "train_images", image_ids=["0a1cade03.jpg"])
    try:
        assert metadata.thing_classes == list(THING_CLASSES) == ["class 1", "class 2", "class 3", "class 4"]
        assert metadata.evaluator_type == "coco" and metadata.csv == str(real_csv)
        assert [d["image_id"] for d in DatasetCatalog.get(name)] == ["0a1cade03.jpg"]
        with pytest.raises(ValueError, match="already registered"):
            register_severstal(name, real_csv, real_data / "train_images")
    finally:
        unregister(name)
    assert name not in DatasetCatalog.list() and name not in MetadataCatalog.list()
    with pytest.raises(ValueError, match="is not registered"):
        unregister(name)


def test_register_data_dir_registers_both_parts(data_dir):
    from detectron2.data import DatasetCatalog

    split = register_data_dir(data_dir, "severstal_test_train", "severstal_test_val", val_fraction=0.25, seed=3)
    try:
        assert len(split["train"]) + len(split["val"]) == 106 and len(split["val"]) == round(106 * 0.25)
        assert [d["image_id"] for d in DatasetCatalog.get("severstal_test_val")] == split["val"]
        assert [d["image_id"] for d in DatasetCatalog.get("severstal_test_train")] == split["train"]
    finally:
        unregister("severstal_test_train")
        unregister("severstal_test_val")

    chosen = split["val"][:3]
    again = register_data_dir(data_dir, None, "severstal_test_eval", image_ids=chosen)
    try:
        assert again["val"] == sorted(chosen) and len(again["train"]) == 103
        assert "severstal_test_train" not in DatasetCatalog.list()
        assert [d["image_id"] for d in DatasetCatalog.get("severstal_test_eval")] == sorted(chosen)
    finally:
        unregister("severstal_test_eval")


def test_data_root_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("SEVERSTAL_DATA", raising=False)
    assert str(data_root()) == "datasets/severstal"
    monkeypatch.setenv("SEVERSTAL_DATA", str(tmp_path))
    assert data_root() == tmp_path

"""severstal.data.coco: the real CSV converted to COCO files that pycocotools loads, checked mask for mask."""

from __future__ import annotations

import json
from collections import Counter

import cv2
import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from severstal.cli import main
from severstal.data.coco import convert_to_coco
from severstal.data.rle import rle_to_mask


@pytest.fixture(scope="module")
def real_csv(real_data):
    return real_data / "train_partial_newformat.csv"


@pytest.fixture(scope="module")
def converted(real_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("coco")
    return out, convert_to_coco(real_csv, out, val_fraction=0.2, seed=1)


def test_real_csv_converts_to_coco_that_pycocotools_loads(real_csv, converted):
    out, summary = converted
    truth = pd.read_csv(real_csv)
    # Expected instances, independently: OpenCV's 8-connected components of each decoded mask.
    components = {
        (image_id, class_id): cv2.connectedComponents(rle_to_mask(rle), connectivity=8)[0] - 1
        for image_id, class_id, rle in truth.itertuples(index=False)
    }
    per_class = Counter()
    for (_, class_id), n in components.items():
        per_class[class_id] += n
    assert summary["images"] == 4479 and summary["masks"] == 4908 and summary["masks_left_out"] == 0
    assert summary["train_images"] + summary["val_images"] == 4479 and summary["val_images"] == round(4479 * 0.2)
    assert summary["instances"] == sum(components.values()) == 13878
    assert summary["instances_per_class"] == {c: per_class[c] for c in (1, 2, 3, 4)}

    train, val = COCO(str(out / "train.json")), COCO(str(out / "val.json"))
    assert len(train.getImgIds()) == summary["train_images"] and len(val.getImgIds()) == summary["val_images"]
    assert len(train.getAnnIds()) + len(val.getAnnIds()) == summary["instances"]
    assert not set(train.getImgIds()) & set(val.getImgIds())
    assert sorted(train.getCatIds()) == [0, 1, 2, 3]
    assert [c["name"] for c in train.loadCats([0, 1, 2, 3])] == ["class 1", "class 2", "class 3", "class 4"]
    assert min(train.getAnnIds()) == 1 and min(val.getAnnIds()) == 1

    # The union of an image's instances of one class is that class's mask, exactly, for every mask.
    masks = dict(zip(zip(truth["ImageId"], truth["ClassId"]), truth["EncodedPixels"]))
    seen = 0
    for coco in (train, val):
        for image in coco.loadImgs(coco.getImgIds()):
            assert (image["height"], image["width"]) == (256, 1600)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            for category in {a["category_id"] for a in anns}:
                mine = [a for a in anns if a["category_id"] == category]
                assert len(mine) == components[(image["file_name"], category + 1)]
                union = mask_util.decode(mask_util.merge([a["segmentation"] for a in mine]))
                assert np.array_equal(union, rle_to_mask(masks[(image["file_name"], category + 1)]))
                assert sum(a["area"] for a in mine) == int(union.sum())
                seen += 1
    assert seen == 4908


def test_every_image_of_a_folder_is_included(real_csv, real_data, tmp_path):
    summary = convert_to_coco(real_csv, tmp_path, images=real_data / "train_images")
    folder = sorted(p.name for p in (real_data / "train_images").glob("*.jpg"))
    truth = pd.read_csv(real_csv)
    assert summary["images"] == summary["train_images"] == len(folder) == 106
    assert summary["val_images"] == 0
    assert summary["masks"] == int(truth["ImageId"].isin(folder).sum())
    assert summary["masks_left_out"] == 4908 - summary["masks"]
    train = COCO(str(tmp_path / "train.json"))
    images = train.loadImgs(train.getImgIds())
    assert sorted(i["file_name"] for i in images) == folder
    without = {i["file_name"] for i in images if not train.getAnnIds(imgIds=i["id"])}
    labels = pd.read_csv(real_data / "train_labels_per_image.csv").set_index("ImageId").loc[folder]
    defect_free = set(labels.index[labels["n_defect_classes"] == 0])
    unknown = set(labels.index[labels["rle_known"] == 0])  # defective, but their masks are not in the CSV
    assert len(defect_free) > 0 and without == defect_free | unknown
    assert json.loads((tmp_path / "val.json").read_text())["images"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.json", "val.json"]


def test_image_ids_agree_between_splits_and_seeds(real_csv, tmp_path):
    convert_to_coco(real_csv, tmp_path / "a", val_fraction=0.3, seed=0)
    convert_to_coco(real_csv, tmp_path / "b", val_fraction=0.0)
    ids = {}
    for path in [tmp_path / "a" / "train.json", tmp_path / "a" / "val.json", tmp_path / "b" / "train.json"]:
        for image in json.loads(path.read_text())["images"]:
            assert ids.setdefault(image["file_name"], image["id"]) == image["id"]
    assert sorted(ids.values()) == list(range(1, 4480))


def test_min_area_drops_small_instances(real_csv, tmp_path):
    summary = convert_to_coco(real_csv, tmp_path, min_area=100)
    areas = [a["area"] for a in json.loads((tmp_path / "train.json").read_text())["annotations"]]
    assert min(areas) >= 100 and len(areas) == summary["instances"] < 13878


def test_a_mask_that_does_not_fit_its_image_is_an_error(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 10)).save(images / "a.png")
    csv = tmp_path / "train.csv"
    csv.write_text("ImageId,ClassId,EncodedPixels\na.png,1,395 10\n")
    with pytest.raises(ValueError, match=r"mask of a.png \(10 x 40\): run 1 .* runs past the end"):
        convert_to_coco(csv, tmp_path / "out", images=images)
    csv.write_text("ImageId,ClassId,EncodedPixels\na.png,1,391 10\n")
    summary = convert_to_coco(csv, tmp_path / "out", images=images)
    coco = json.loads((tmp_path / "out" / "train.json").read_text())
    assert coco["images"] == [{"id": 1, "file_name": "a.png", "height": 10, "width": 40}]
    assert summary["instances"] == 1 and coco["annotations"][0]["bbox"] == [39, 0, 1, 10]


def test_cli_convert_prints_the_summary(real_csv, tmp_path, capsys):
    assert main(["convert", "--csv", str(real_csv), "--out", str(tmp_path), "--val-fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "4479 images (4031 train, 448 val), 4908 masks" in out
    assert "13878 instances (class 1: 2225, class 2: 227, class 3: 9987, class 4: 1439)" in out
    assert (tmp_path / "train.json").is_file() and (tmp_path / "val.json").is_file()

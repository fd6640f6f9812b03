"""Tests for severstal/synth.py: layout, determinism, class balance, and masks equal to the drawn defects."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from severstal import CLASS_IDS, IMAGE_HEIGHT, IMAGE_WIDTH
from severstal.cli import main
from severstal.data.rle import rle_to_mask
from severstal.data.synth import DEFECT_FREE_FRACTION, _image_id, make_synthetic_dataset, make_synthetic_image

N_IMAGES = 60
MIN_CONTRAST = 15.0
"""Grey levels by which every drawn defect must differ from the steel around it."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = make_synthetic_dataset(out, N_IMAGES, seed=3)
    return out, summary, pd.read_csv(out / "train.csv")


def test_layout_and_image_format(dataset):
    out, _, table = dataset
    assert (out / "train.csv").read_text().splitlines()[0] == "ImageId,ClassId,EncodedPixels"
    files = sorted(p.name for p in (out / "train_images").iterdir())
    assert len(files) == N_IMAGES
    assert all(re.fullmatch(r"[0-9a-f]{9}\.jpg", name) for name in files)
    assert set(table.ImageId) <= set(files)
    assert not table.duplicated(["ImageId", "ClassId"]).any()
    assert table.EncodedPixels.str.len().min() > 0
    with Image.open(out / "train_images" / files[0]) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (IMAGE_WIDTH, IMAGE_HEIGHT))
        pixels = np.asarray(image)
    assert np.abs(pixels[..., 0].astype(int) - pixels[..., 2]).max() <= 1  # grey content in 3 channels


def test_class_balance_and_summary(dataset):
    _, summary, table = dataset
    classes_per_image = table.groupby("ImageId").ClassId.count()
    assert summary["images"] == N_IMAGES
    assert summary["defect_free"] == N_IMAGES - classes_per_image.size
    assert abs(summary["defect_free"] / N_IMAGES - DEFECT_FREE_FRACTION) <= 0.05
    assert summary["masks_per_class"] == {c: int((table.ClassId == c).sum()) for c in CLASS_IDS}
    assert min(summary["masks_per_class"].values()) >= 3
    assert summary["masks_per_class"][3] == max(summary["masks_per_class"].values())
    assert summary["two_class_images"] == int((classes_per_image == 2).sum()) >= 1


def test_masks_are_the_drawn_defects(dataset):
    """Each connected piece of every mask differs from the steel around it: the masks are what was drawn."""
    out, _, table = dataset
    ring_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (11, 11))
    for image_id, rows in table.groupby("ImageId"):
        grey = cv2.imread(str(out / "train_images" / image_id), cv2.IMREAD_GRAYSCALE).astype(float)
        masks = [rle_to_mask(rle) for rle in rows.EncodedPixels]
        assert sum(m.astype(int) for m in masks).max() == 1  # classes never overlap
        defects = np.any(masks, axis=0)
        for mask in masks:
            n, labels = cv2.connectedComponents(mask.astype(np.uint8))
            for k in range(1, n):
                piece = (labels == k).astype(np.uint8)
                ring = cv2.dilate(piece, ring_kernel).astype(bool) & ~defects
                contrast = abs(grey[piece.astype(bool)].mean() - grey[ring].mean())
                assert contrast >= MIN_CONTRAST, (image_id, k, contrast)


def test_same_seed_same_bytes_other_seed_other_ids(tmp_path):
    first = make_synthetic_dataset(tmp_path / "a", 8, seed=5)
    make_synthetic_dataset(tmp_path / "b", 8, seed=5)
    make_synthetic_dataset(tmp_path / "c", 8, seed=6)
    assert first["images"] == 8
    assert (tmp_path / "a/train.csv").read_bytes() == (tmp_path / "b/train.csv").read_bytes()
    names = sorted(p.name for p in (tmp_path / "a/train_images").iterdir())
    for name in names:
        first_bytes = (tmp_path / "a/train_images" / name).read_bytes()
        assert first_bytes == (tmp_path / "b/train_images" / name).read_bytes()
    assert not set(names) & {p.name for p in (tmp_path / "c/train_images").iterdir()}


def test_image_ids_never_collide_across_seeds():
    ids = {_image_id(seed, index) for seed in (0, 1, 2, 65535) for index in range(5000)}
    assert len(ids) == 4 * 5000


def test_refuses_a_folder_holding_another_dataset(tmp_path):
    make_synthetic_dataset(tmp_path, 2, seed=1)
    with pytest.raises(ValueError, match="another dataset"):
        make_synthetic_dataset(tmp_path, 2, seed=2)


def test_make_synthetic_image():
    image, masks = make_synthetic_image((2, 4), seed=11)
    assert image.shape == (IMAGE_HEIGHT, IMAGE_WIDTH, 3) and image.dtype == np.uint8
    assert sorted(masks) == [2, 4]
    for mask in masks.values():
        assert mask.shape == (IMAGE_HEIGHT, IMAGE_WIDTH) and mask.dtype == np.uint8 and mask.sum() > 0
    assert not (masks[2] & masks[4]).any()
    # Class 2 is tall and thin, class 4 a wide blob.
    ys, xs = np.nonzero(masks[2])
    assert np.ptp(ys) > 3 * (masks[2].sum() / (np.ptp(ys) + 1))
    assert masks[4].sum() > 3000
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 4\)"):
        make_synthetic_image((5,))


def test_cli_synth(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--images", "4", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert "4 images" in printed and "class 3" in printed
    assert len(list((tmp_path / "train_images").glob("*.jpg"))) == 4


def test_real_shapes_draw_real_masks_and_leave_excluded_images_out(real_data, tmp_path):
    from severstal.data.annotations import read_train_csv
    from severstal.data.synth import RealShapes

    masks = read_train_csv(real_data / "train_partial_newformat.csv")
    excluded = sorted(set(masks["ImageId"]))[:50]
    shapes = RealShapes(masks, exclude=excluded)
    assert sum(len(r) for r in shapes.rles.values()) == int((~masks["ImageId"].isin(excluded)).sum())
    left_out = set(masks.loc[masks["ImageId"].isin(excluded), "EncodedPixels"])
    assert not left_out & {r for rles in shapes.rles.values() for r in rles}
    rng = np.random.default_rng(0)
    for class_id in CLASS_IDS:  # a sample is one of the class's real masks, or its mirror image
        mask = shapes.sample(class_id, rng).astype(bool)
        candidates = [rle_to_mask(r).astype(bool) for r in shapes.rles[class_id]]
        assert any((mask == m).all() or (mask == m[:, ::-1]).all() for m in candidates), class_id
    summary = make_synthetic_dataset(tmp_path, 12, seed=5, shapes=shapes)
    written = read_train_csv(tmp_path / "train.csv")
    assert len(written) == sum(summary["masks_per_class"].values())
    for image_id, group in written.groupby("ImageId"):  # classes never share a pixel
        union = sum(rle_to_mask(r).astype(int) for r in group["EncodedPixels"])
        assert union.max() == 1, image_id
    with pytest.raises(ValueError, match="no real mask of class"):
        RealShapes(masks[masks["ClassId"] != 2])

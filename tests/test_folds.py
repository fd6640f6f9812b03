"""Cross-validation data: complete truth on the real sample, stratified folds without leaks, a fold's folder."""

from __future__ import annotations

import collections

import pandas as pd
import pytest

from severstal.data.annotations import read_train_csv
from severstal.data.folds import read_labelled_images, stratified_folds, write_training_folder


@pytest.fixture(scope="module")
def labelled(real_data):
    return read_labelled_images(real_data)


def test_real_sample_keeps_the_100_images_with_complete_truth(labelled, real_data):
    # DESIGN.md: 100 of the 117 train images have every mask of their classes; 44 of them are defect-free.
    assert len(labelled.files) == 100 and len(labelled.incomplete) == 17
    assert not set(labelled.files) & set(labelled.incomplete)
    class_sets = labelled.class_sets()
    assert sum(bits == 0 for bits in class_sets.values()) == 44
    assert len(labelled.masks) == 68  # (image, class) pairs that hold a defect
    table = pd.read_csv(real_data / "train_labels_per_image.csv").set_index("ImageId")
    for image_id in labelled.incomplete:  # a class the table gives has no RLE
        flagged = {c for c in (1, 2, 3, 4) if table.loc[image_id, f"class{c}"]}
        assert flagged - set(labelled.masks.loc[labelled.masks["ImageId"] == image_id, "ClassId"]), image_id
    for image_id, bits in class_sets.items():  # and every complete image's classes are the table's
        assert bits == sum(1 << (c - 1) for c in (1, 2, 3, 4) if table.loc[image_id, f"class{c}"]), image_id
    # Images found only as PNG stand for their JPEG ImageId.
    assert any(path.suffix == ".png" for path in labelled.files.values())


def test_folds_cover_every_image_once_and_spread_each_class_set(labelled):
    class_sets = labelled.class_sets()
    folds = stratified_folds(class_sets, k=5, seed=0)
    everything = [i for fold in folds for i in fold]
    assert sorted(everything) == sorted(class_sets) and len(set(everything)) == len(everything)
    assert {len(f) for f in folds} == {20}
    overall = collections.Counter(class_sets.values())
    for fold in folds:
        counts = collections.Counter(class_sets[i] for i in fold)
        for key, total in overall.items():  # each class set spread as evenly as it can be
            assert total // 5 <= counts.get(key, 0) <= -(-total // 5), (key, counts)
    assert stratified_folds(dict(reversed(class_sets.items())), k=5, seed=0) == folds
    assert stratified_folds(class_sets, k=5, seed=1) != folds


def test_folds_refuse_impossible_counts():
    with pytest.raises(ValueError, match="between 2 and the number of images"):
        stratified_folds({"a.jpg": 0, "b.jpg": 1}, k=3)


def test_a_training_folder_holds_only_its_images_and_their_masks(labelled, tmp_path):
    held_out, *rest = stratified_folds(labelled.class_sets(), k=5, seed=0)
    train_ids = [i for fold in rest for i in fold]
    folder = write_training_folder(tmp_path / "fold", labelled, train_ids)
    assert sorted(p.name for p in (folder / "train_images").iterdir()) == sorted(train_ids)
    masks = read_train_csv(folder / "train.csv")
    assert set(masks["ImageId"]) <= set(train_ids) and not set(masks["ImageId"]) & set(held_out)
    expected = labelled.masks[labelled.masks["ImageId"].isin(train_ids)]
    assert len(masks) == len(expected)

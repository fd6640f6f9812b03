"""severstal.viz.stats: statistics checked against hand-computed values and the real per-image table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from severstal.data.annotations import read_train_csv
from severstal.data.rle import rle_to_mask
from severstal.viz import stats as data_stats


def _masks(rows):
    return pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"])


@pytest.fixture(scope="module")
def real(real_data):
    return data_stats.load_dataset(real_data)


def test_the_real_class_table_gives_the_competition_counts(real):
    assert data_stats.masks_per_class(real.classes).tolist() == [897, 247, 5150, 801]
    assert data_stats.images_per_class_count(real.classes).tolist() == [5902, 6239, 425, 2, 0]
    summary = dict(zip(*data_stats.dataset_summary(real).to_dict("list").values()))
    assert summary == {
        "images in the class table": 12568, "images with a defect": 6666, "defect-free images": 5902,
        "masks in the class table": 7095, "masks with a known RLE": 4908, "images whose masks are all known": 10381,
        "image files in the folder": 117,
    }


def test_class_balance_of_the_real_sample_sets_the_known_masks_beside_the_full_table(real):
    counts = data_stats.class_balance(real)
    assert list(counts.columns) == ["all 12,568 images", "masks with a known RLE"]
    assert counts["masks with a known RLE"].tolist() == [630, 175, 3479, 624]


def test_png_images_stand_for_their_jpeg_image_id(real):
    assert real.images["000789191.jpg"].name == "000789191.png"
    assert real.images["0002cc93b.jpg"].name == "0002cc93b.jpg"
    assert len(real.images) == 117


def test_class_table_from_masks_counts_defect_free_images():
    masks = _masks([("a.jpg", 1, "1 3"), ("a.jpg", 3, "5 2"), ("b.jpg", 3, "1 1")])
    table = data_stats.class_table(masks, ["a.jpg", "b.jpg", "c.jpg"])
    assert table["ImageId"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert table[data_stats.CLASS_COLUMNS].to_numpy().tolist() == [[1, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert table["n_classes"].tolist() == [2, 1, 0]
    assert data_stats.masks_per_class(table).tolist() == [1, 0, 2, 0]
    assert data_stats.images_per_class_count(table).tolist() == [1, 1, 1, 0, 0]


def test_mask_statistics_by_hand():
    # Height 256: "1 3 257 2" is rows 0-2 of column 0 and rows 0-1 of column 1 (one 8-connected piece);
    # "1 2 1025 2" is rows 0-1 of columns 0 and 4 (two pieces); "255 4" wraps from the bottom of
    # column 0 to the top of column 1, which are not neighbours (two pieces).
    masks = _masks([("a.jpg", 1, "1 3 257 2"), ("a.jpg", 2, "1 2 1025 2"), ("b.jpg", 4, "255 4")])
    stats = data_stats.mask_statistics(masks)
    assert stats["area"].tolist() == [5, 4, 4]
    assert stats["instances"].tolist() == [1, 2, 2]
    assert stats["x0"].tolist() == [0, 0, 0]
    assert stats["x1"].tolist() == [1, 4, 1]
    assert stats["x_centre"].iloc[:2].tolist() == pytest.approx([2 / 5, 2.0])
    per_image = data_stats.image_statistics(stats)
    assert per_image.to_dict("list") == {"ImageId": ["a.jpg", "b.jpg"], "masks": [2, 1], "instances": [3, 2],
                                         "area": [9, 4]}


def test_an_empty_mask_has_no_area_and_no_position():
    stats = data_stats.mask_statistics(_masks([("a.jpg", 1, ""), ("a.jpg", 2, "1 1")]))
    assert stats["area"].tolist() == [0, 1]
    assert stats["instances"].tolist() == [0, 1]
    assert np.isnan(stats["x0"].iloc[0]) and np.isnan(stats["x_centre"].iloc[0])


def test_heatmaps_by_hand():
    masks = _masks([("a.jpg", 1, "1 1"), ("b.jpg", 1, "1 2"), ("b.jpg", 3, "257 1")])
    heat = data_stats.defect_heatmaps(masks)
    assert heat.shape == (4, 256, 1600) and heat.dtype == np.float32
    assert heat[0, 0, 0] == 1.0 and heat[0, 1, 0] == 0.5 and heat[0].sum() == 1.5
    assert heat[2, 0, 1] == 1.0 and heat[2].sum() == 1.0
    assert not heat[1].any() and not heat[3].any()


def test_heatmaps_are_the_mean_of_the_decoded_masks(real):
    masks = real.masks[real.masks["ClassId"] == 3].iloc[:15]
    heat = data_stats.defect_heatmaps(masks)
    expected = np.mean([rle_to_mask(rle) for rle in masks["EncodedPixels"]], axis=0)
    np.testing.assert_allclose(heat[2], expected, atol=1e-6)


def test_real_mask_statistics_agree_with_the_decoded_masks(real):
    masks = real.masks.iloc[::500]
    stats = data_stats.mask_statistics(masks)
    for rle, area, x0, x1 in zip(masks["EncodedPixels"], stats["area"], stats["x0"], stats["x1"]):
        columns = np.flatnonzero(rle_to_mask(rle).any(axis=0))
        assert area == rle_to_mask(rle).sum() and (x0, x1) == (columns[0], columns[-1])


def test_examples_have_their_class_a_local_file_and_every_mask(real):
    examples = data_stats.pick_examples(real, per_class=2)
    assert sorted(examples) == [1, 2, 3, 4]
    for class_id, chosen in examples.items():
        assert len(chosen) == 2
        for example in chosen:
            assert class_id in example.classes and example.path.is_file()
            flags = real.classes.set_index("ImageId").loc[example.image_id]
            assert flags["rle_known"] == 1
            assert sorted(example.classes) == [c for c in (1, 2, 3, 4) if flags[f"class{c}"]]
    free = data_stats.pick_defect_free(real, count=3)
    assert len(free) == 3 and all(not e.classes and e.path.is_file() for e in free)
    assert [e.image_id for e in data_stats.showcase(real, count=5)][:4] == [c[0].image_id for c in examples.values()]


def test_a_kaggle_folder_without_a_class_table(synthetic_data):
    data = data_stats.load_dataset(synthetic_data)
    masks = read_train_csv(synthetic_data / "train.csv")
    assert len(data.classes) == 24 == len(data.images)
    assert data.masks.equals(masks)
    assert data_stats.masks_per_class(data.classes).sum() == len(masks)
    assert (data.classes["rle_known"] == 1).all()
    assert list(data_stats.class_balance(data).columns) == ["all 24 images"]


def test_choose_data_dir_prefers_the_users_folder_then_the_sample_then_synthetic(tmp_path, monkeypatch):
    assert data_stats.choose_data_dir(tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.setenv("SEVERSTAL_REAL_DATA", str(tmp_path / "absent"))
    folder = data_stats.choose_data_dir(None, tmp_path / "synthetic", synthetic_images=3)
    assert folder == tmp_path / "synthetic" and len(list((folder / "train_images").iterdir())) == 3


def test_a_folder_without_a_csv_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.csv"):
        data_stats.load_dataset(tmp_path)

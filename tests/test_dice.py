"""severstal.data.dice: the competition's mean Dice against hand-computed cases and against pixels."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from severstal.data.dice import dice, dice_per_class, dice_per_image, dice_table, mean_dice
from severstal.data.rle import rle_to_mask


def frame(*rows) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=["ImageId", "ClassId", "EncodedPixels"])


EMPTY = frame()


def test_dice_of_masks():
    a = np.zeros((4, 4), np.uint8)
    b = np.zeros((4, 4), bool)
    assert dice(a, b) == 1.0  # both empty
    a[0, :3] = 1
    assert dice(a, b) == 0.0  # one empty
    b[0, 1:] = True
    assert dice(a, b) == pytest.approx(2 * 2 / (3 + 3))
    assert dice(a, a * 255) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        dice(a, np.zeros((4, 5)))


def test_empty_prediction_on_empty_truth_scores_one():
    assert mean_dice(EMPTY, EMPTY, ["a.jpg", "b.jpg"]) == 1.0


def test_a_missed_mask_or_a_false_positive_costs_its_whole_pair():
    truth = frame(("a.jpg", 2, "1 10"))
    # 8 pairs: 7 empty/empty score 1, the missed pair scores 0.
    assert mean_dice(EMPTY, truth, ["a.jpg", "b.jpg"]) == 7 / 8
    assert mean_dice(truth, EMPTY, ["a.jpg", "b.jpg"]) == 7 / 8
    assert dice_per_class(EMPTY, truth, ["a.jpg", "b.jpg"]) == {1: 1.0, 2: 0.5, 3: 1.0, 4: 1.0}


def test_partial_overlap_over_several_images():
    truth = frame(("a.jpg", 1, "1 10"), ("b.jpg", 3, "101 20 301 20"), ("c.jpg", 4, "5 5"))
    pred = frame(
        ("a.jpg", 1, "6 10"),  # overlap 5: 2*5/(10+10) = 0.5
        ("b.jpg", 3, "111 20"),  # overlap 10 with the first run: 2*10/(20+40) = 1/3
        ("b.jpg", 2, "1 1"),  # false positive: 0
        ("c.jpg", 4, "5 5"),  # exact: 1
        ("z.jpg", 1, "1 1"),  # not a scored image: ignored
    )
    ids = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    table = dice_table(pred, truth, ids)
    # 16 pairs: the four above, 12 empty/empty pairs scoring 1.
    assert table["mean_dice"] == pytest.approx((0.5 + 1 / 3 + 0 + 1 + 12) / 16)
    assert table["dice_per_class"] == pytest.approx({1: (0.5 + 3) / 4, 2: 3 / 4, 3: (1 / 3 + 3) / 4, 4: 1.0})
    assert table["dice_nonempty"] == pytest.approx((0.5 + 1 / 3 + 1) / 3)
    assert table["pairs"] == 16 and table["nonempty_pairs"] == 3
    assert mean_dice(pred, truth, ids) == table["mean_dice"]


def test_runs_that_straddle_each_other_and_touching_runs():
    truth = frame(("a.jpg", 1, "10 5 20 5 30 5"))
    pred = frame(("a.jpg", 1, "12 20 40 1 41 2"))  # covers 12..31: overlap 3 + 5 + 2; touching runs 40, 41..42
    expected = 2 * 10 / (15 + 23)
    assert mean_dice(pred, truth, ["a.jpg"]) == pytest.approx((expected + 3) / 4)


def test_empty_rle_rows_are_empty_masks_and_nan_when_nothing_to_score():
    pred = frame(("a.jpg", 1, ""), ("a.jpg", 2, None))
    assert mean_dice(pred, EMPTY, ["a.jpg"]) == 1.0
    table = dice_table(EMPTY, EMPTY, [])
    assert math.isnan(table["mean_dice"]) and math.isnan(table["dice_nonempty"]) and table["pairs"] == 0


def test_bad_input_is_an_error():
    truth = frame(("a.jpg", 1, "1 10"))
    with pytest.raises(ValueError, match="more than one mask for the same"):
        mean_dice(pd.concat([truth, truth]), truth, ["a.jpg"])
    with pytest.raises(ValueError, match=r"class id\(s\) \[7\]"):
        mean_dice(frame(("a.jpg", 7, "1 1")), truth, ["a.jpg"])
    with pytest.raises(ValueError, match="prediction frame, mask of a.jpg: odd number of values"):
        mean_dice(frame(("a.jpg", 1, "1 1 1")), truth, ["a.jpg"])
    with pytest.raises(ValueError, match="lacks column"):
        mean_dice(truth.drop(columns="ClassId"), truth, ["a.jpg"])
    with pytest.raises(ValueError, match="more than once"):
        mean_dice(truth, truth, ["a.jpg", "a.jpg"])


def test_agrees_with_pixel_dice_on_real_masks(real_data):
    truth = pd.read_csv(real_data / "train_partial_newformat.csv").iloc[:400]
    rng = np.random.default_rng(0)

    def thin(rle: str) -> str:
        values = rle.split()
        keep = rng.random(len(values) // 2) < 0.6
        return " ".join(v for i, k in enumerate(keep) if k for v in values[2 * i : 2 * i + 2])

    pred = truth.assign(EncodedPixels=truth["EncodedPixels"].map(thin), ClassId=truth["ClassId"].where(
        rng.random(len(truth)) < 0.9, 5 - truth["ClassId"]))
    pred = pred.drop_duplicates(["ImageId", "ClassId"])
    ids = sorted(set(truth["ImageId"]))
    truth_masks = dict(zip(zip(truth["ImageId"], truth["ClassId"]), truth["EncodedPixels"]))
    pred_masks = dict(zip(zip(pred["ImageId"], pred["ClassId"]), pred["EncodedPixels"]))
    pixel = [dice(rle_to_mask(pred_masks.get((i, c), "")), rle_to_mask(truth_masks.get((i, c), "")))
             for i in ids for c in (1, 2, 3, 4)]
    assert mean_dice(pred, truth, ids) == pytest.approx(np.mean(pixel), abs=1e-12)


def test_dice_per_image_by_hand():
    truth = frame(("a.jpg", 1, "1 4"), ("c.jpg", 3, "10 5"))
    pred = frame(("a.jpg", 1, "3 2"), ("b.jpg", 2, "1 1"), ("c.jpg", 3, "10 5"))
    scores = dice_per_image(pred, truth, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    assert scores["ImageId"].tolist() == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert scores["dice_class_1"].tolist() == pytest.approx([2 * 2 / (2 + 4), 1, 1, 1])
    assert scores["dice_class_2"].tolist() == [1, 0, 1, 1]  # a false positive on an empty pair scores 0
    assert scores["mean_dice"].tolist() == pytest.approx([(2 / 3 + 3) / 4, 0.75, 1, 1])
    assert scores["true_classes"].tolist() == [1, 0, 1, 0]
    assert scores["mean_dice"].mean() == pytest.approx(mean_dice(pred, truth, scores["ImageId"]))

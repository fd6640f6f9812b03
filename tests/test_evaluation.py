"""Evaluation: the Dice evaluator agrees with severstal.data.dice, tuning finds the right thresholds."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from detectron2.data import DatasetCatalog

from severstal.data.annotations import read_train_csv
from severstal.data.datasets import register_data_dir, unregister
from severstal.data.dice import dice_per_class, mean_dice
from severstal.data.images import read_image
from severstal.data.rle import mask_to_rle
from severstal.model.config import load_bundle
from severstal.model.evaluation import (
    MIN_AREA_GRID,
    SCORE_GRID,
    DiceEvaluator,
    ImageDetections,
    detections_to_instances,
    records_frame,
    tune_thresholds,
)
from severstal.model.predict import CLASS_OFF, Detections, Predictor, make_record


def _box_detection(image_id, specs, shape=(256, 1600)):
    masks = np.zeros((len(specs), *shape), bool)
    for i, (_, _, (y0, y1, x0, x1)) in enumerate(specs):
        masks[i, y0:y1, x0:x1] = True
    det = Detections(shape[0], shape[1], np.zeros((len(specs), 4), np.float32),
                     np.array([s[1] for s in specs], np.float32), np.array([s[0] for s in specs], np.int64), masks)
    return ImageDetections.from_detections(image_id, det)


def test_tuning_drops_weak_false_positives_and_small_specks():
    truth_mask = np.zeros((256, 1600), np.uint8)
    truth_mask[0:50, 0:100] = 1
    truth = pd.DataFrame([("a.jpg", 1, mask_to_rle(truth_mask))], columns=["ImageId", "ClassId", "EncodedPixels"])
    detections = [
        _box_detection("a.jpg", [(1, 0.95, (0, 50, 0, 100))]),
        _box_detection("b.jpg", [(1, 0.45, (0, 50, 0, 100))]),  # weak false positive on an empty image
        _box_detection("c.jpg", [(1, 0.99, (0, 5, 0, 5))]),  # strong but tiny false positive
    ]
    tuned = tune_thresholds(detections, truth)
    assert tuned["score_thresholds"][0] >= 0.5
    assert 25 < tuned["min_areas"][0] <= 5000
    assert tuned["dice_per_class"][1] == pytest.approx(1.0)
    assert tuned["dice_per_class"][2] == pytest.approx(1.0)  # nothing predicted, nothing true
    curve = tuned["curves"][1][SCORE_GRID[0]]
    assert len(curve) == len(MIN_AREA_GRID) and curve[0] == pytest.approx((1 + 0 + 0) / 3)


def test_a_class_that_never_beats_empty_is_turned_off_and_ties_go_to_the_safer_choice():
    truth_mask = np.zeros((256, 1600), np.uint8)
    truth_mask[0:50, 0:100] = 1
    truth = pd.DataFrame([("a.jpg", 1, mask_to_rle(truth_mask)), ("c.jpg", 2, mask_to_rle(truth_mask))],
                         columns=["ImageId", "ClassId", "EncodedPixels"])
    detections = [
        # class 1: half the true mask on a (Dice 0.67), and as strong a false mask on b: open 0.33 + 0 + 1 < empty 2
        _box_detection("a.jpg", [(1, 0.9, (0, 25, 0, 100))]),
        _box_detection("b.jpg", [(1, 0.9, (0, 50, 0, 100)), (2, 0.9, (0, 50, 0, 100))]),
        # class 2: the true mask found on c (1 point) and a false one on b (-1 point): a tie with empty
        _box_detection("c.jpg", [(2, 0.9, (0, 50, 0, 100))]),
    ]
    tuned = tune_thresholds(detections, truth)
    assert tuned["min_areas"][:2] == [CLASS_OFF, CLASS_OFF]
    assert tuned["dice_per_class"][1] == pytest.approx(2 / 3) and tuned["dice_per_class"][2] == pytest.approx(2 / 3)
    records = [make_record(d.to_detections(), tuned["score_thresholds"], tuned["min_areas"]) for d in detections]
    assert all(r["classes"]["1"] == r["classes"]["2"] == "" for r in records)


def test_dice_evaluator_agrees_with_mean_dice_on_the_same_predictions(trained_run, synthetic_data):
    bundle = load_bundle(trained_run, device="cpu")
    bundle.cfg.SEVERSTAL.SCORE_THRESHOLDS = [0.06] * 4  # let the barely-trained model predict something
    predictor = Predictor(bundle.cfg)
    split = register_data_dir(synthetic_data, None, "test_dice_eval", image_ids=bundle.val_image_ids)
    try:
        dicts = DatasetCatalog.get("test_dice_eval")
        evaluator = DiceEvaluator("test_dice_eval", bundle.cfg)
        evaluator.reset()
        images = [read_image(d["file_name"]) for d in dicts]
        dets = predictor.detect(images)
        evaluator.process(dicts, [{"instances": detections_to_instances(d)} for d in dets])
        result = evaluator.evaluate()["dice"]
    finally:
        unregister("test_dice_eval")
    records = predictor.predict(images)
    ids = [d["image_id"] for d in dicts]
    pred = records_frame(ids, records)
    truth = read_train_csv(synthetic_data / "train.csv")
    assert ids == split["val"]
    assert result["mean_dice"] == pytest.approx(mean_dice(pred, truth, ids))
    assert result["empty_baseline"] == pytest.approx(mean_dice(truth.iloc[0:0], truth, ids))
    assert 0 <= result["mean_dice"] <= 1 and 0 <= result["dice_nonempty"] <= 1


@pytest.mark.slow
def test_evaluate_with_tuning_reports_the_documented_keys_and_saves_thresholds(trained_run, tmp_path, capsys):
    from severstal.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["evaluate", "--weights", str(run), "--tune", "--json"]) == 0  # evaluate, then draw its figures
    results = json.loads(capsys.readouterr().out.splitlines()[-1])
    for key in ("mean_dice", "dice_per_class", "dice_nonempty", "empty_baseline", "segm_AP", "bbox_AP",
                "score_thresholds", "min_areas", "mean_dice_untuned"):
        assert key in results, key
    assert 0 <= results["mean_dice"] <= 1 and 0 <= results["empty_baseline"] <= 1
    assert results["mean_dice"] >= results["mean_dice_untuned"] - 1e-9  # tuning never loses on its own split
    assert set(results["dice_per_class"]) == {"1", "2", "3", "4"} and results["images"] == 6
    saved = json.loads((run / "thresholds.json").read_text())
    assert saved["score_thresholds"] == results["score_thresholds"]
    assert list(load_bundle(run).cfg.SEVERSTAL.MIN_AREAS) == results["min_areas"]
    curves = results["threshold_curves"]
    assert curves["min_areas"] == list(MIN_AREA_GRID) and set(curves["dice"]) == {"1", "2", "3", "4"}
    assert all(len(row) == len(MIN_AREA_GRID) for by_score in curves["dice"].values() for row in by_score.values())
    assert set(json.loads((run / "eval" / "evaluation.json").read_text())) == set(results)
    for name in ("dice_per_class.png", "threshold_curves.png", "evaluation.json"):
        assert (run / "eval" / name).stat().st_size > 0


def test_tuning_reports_the_dice_that_prediction_gets_with_the_same_thresholds(low_floor_run, synthetic_data):
    """Tuning (on COCO RLEs) and prediction (on pixel masks) apply one class-mask rule: same thresholds, same Dice."""
    bundle = load_bundle(low_floor_run, device="cpu")
    predictor = Predictor(bundle.cfg)
    truth = read_train_csv(synthetic_data / "train.csv")
    ids = sorted(p.name for p in (synthetic_data / "train_images").iterdir())[:12]
    images = [read_image(synthetic_data / "train_images" / i) for i in ids]
    detections = [ImageDetections.from_detections(i, d) for i, d in zip(ids, predictor.detect(images))]
    score_grid, area_grid = (0.001, 0.003, 0.01, 0.03), (0, 100, 1000)
    tuned = tune_thresholds(detections, truth, score_grid=score_grid, min_area_grid=area_grid)

    def predicted_dice(thresholds, min_areas):
        bundle.cfg.SEVERSTAL.SCORE_THRESHOLDS = list(thresholds)
        bundle.cfg.SEVERSTAL.MIN_AREAS = list(min_areas)
        return dice_per_class(records_frame(ids, predictor.predict(images)), truth, ids)

    chosen = predicted_dice(tuned["score_thresholds"], tuned["min_areas"])
    assert chosen == pytest.approx(tuned["dice_per_class"])
    loosest = predicted_dice([score_grid[0]] * 4, [area_grid[0]] * 4)
    assert loosest == pytest.approx({c: tuned["curves"][c][score_grid[0]][0] for c in loosest})
    assert any(r["classes"][c] for r in predictor.predict(images) for c in r["classes"]), "nothing predicted"

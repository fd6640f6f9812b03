"""``severstal cv``: folds trained, tuned and scored on the real sample; cv.json; resume; the ROC AUC."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from severstal.cli import main
from severstal.files import WEIGHTS_FILE
from severstal.model import cv as cv_module
from severstal.model.cv import presence_auc

TINY = ["SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.META_ARCHITECTURE", "PresenceRCNN", "SEVERSTAL.CROP_WIDTH", "800", "SEVERSTAL.COPY_PASTE_PROB", "0.5"]


def test_presence_auc_is_the_rank_statistic():
    assert presence_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert presence_auc(np.array([0.2, 0.2]), np.array([0, 1])) == 0.5
    assert np.isnan(presence_auc(np.array([0.2, 0.3]), np.array([1, 1])))


@pytest.mark.slow
def test_cv_scores_every_complete_image_once_against_all_empty_and_resumes(real_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cv"
    assert main(["cv", "--data", str(real_data), "--out", str(out), "--folds", "2", *TINY]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "cv.json").read_text())
    folds, plan = report["folds"], report["plan"]
    assert len(plan["left_out_incomplete"]) == 17 and plan["images"] == 100
    assert "17 left out (incomplete truth)" in printed and "mean" in printed
    held_out = [set(ids) for ids in plan["folds"]]
    assert not held_out[0] & held_out[1] and len(held_out[0] | held_out[1]) == 100
    for k, fold in enumerate(folds):
        assert fold["images"] == 50
        # All-empty scores 1 on each empty pair: 1 - (pairs with a defect) / (all pairs).
        assert fold["all_empty"] == pytest.approx(1 - fold["defect_pairs"] / (4 * 50))
        assert fold["gain"] == pytest.approx(fold["dice"] - fold["all_empty"])
        assert 0.0 <= fold["dice_defect_pairs"] <= 1.0 and 0.0 <= fold["dice"] <= 1.0
        # The gate and the minimum areas only empty masks: on a pair with a defect that never raises its Dice.
        assert fold["dice_defect_pairs"] <= fold["dice_defect_pairs_ungated"] <= 1.0
        # Thresholds tuned on the scored images themselves beat (or tie) any tuned elsewhere on the same grid.
        assert fold["dice"] <= fold["dice_tuning_ceiling"] + 1e-9 and fold["dice_tuning_ceiling"] >= fold["all_empty"]
        run = out / f"fold{k}" / "run"
        trained_on = json.loads((run / "split.json").read_text())
        assert not set(trained_on["train"] + trained_on["val"]) & held_out[k]  # no leak into training or tuning
        assert len(fold["presence_thresholds"]) == 4
        # the recipe's presence forest was fitted after training and saved with the weights; from texture alone it
        # ranks the held-out strips with a scratch (class 3) well above chance, however short the training
        forest = torch.load(run / WEIGHTS_FILE, map_location="cpu", weights_only=True)["model"]
        assert torch.isfinite(forest["presence_forest.threshold"]).any()
        assert fold["presence_auc"]["3"] > 0.65
    assert sum(f["defect_pairs"] for f in folds) == 68
    assert report["mean"]["dice"] == pytest.approx(np.mean([f["dice"] for f in folds]))
    assert "the most tuning could reach" in printed
    assert report["spread"]["dice"] == pytest.approx(np.std([f["dice"] for f in folds]))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr("severstal.model.train.train", no_training)
    again = cv_module.cross_validate(real_data, out, opts=TINY, folds=2)
    assert again["folds"] == folds
    with pytest.raises(ValueError, match="other folds"):
        cv_module.cross_validate(real_data, out, opts=TINY, folds=3)

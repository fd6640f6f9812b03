"""Configs: named YAMLs load, overrides apply, bad names list the valid ones, run folders reload."""

from __future__ import annotations

import pytest

from severstal.model.config import (
    NAMED_CONFIGS,
    get_severstal_cfg,
    load_bundle,
    resolve_config,
    use_scratch_weights,
)
from severstal.model.run import Thresholds, copy_run


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_named_configs_load_with_severstal_keys(name):
    cfg = get_severstal_cfg(name)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 4
    assert cfg.INPUT.MASK_FORMAT == "bitmask"
    assert len(cfg.SEVERSTAL.SCORE_THRESHOLDS) == 4 and len(cfg.SEVERSTAL.MIN_AREAS) == 4


def test_small_is_a_slim_groupnorm_r18_and_r50_starts_from_the_model_zoo():
    small, r50 = get_severstal_cfg("small"), get_severstal_cfg("r50")
    assert (small.MODEL.RESNETS.DEPTH, small.MODEL.RESNETS.NORM, small.MODEL.FPN.OUT_CHANNELS) == (18, "GN", 64)
    assert small.MODEL.WEIGHTS == "" and small.MODEL.BACKBONE.FREEZE_AT == 0
    assert small.SEVERSTAL.OPTIMIZER == "AdamW" and small.DATALOADER.FILTER_EMPTY_ANNOTATIONS is True
    assert r50.SEVERSTAL.OPTIMIZER == "SGD" and r50.DATALOADER.FILTER_EMPTY_ANNOTATIONS is False
    assert r50.MODEL.RESNETS.DEPTH == 50 and r50.MODEL.WEIGHTS.startswith("detectron2://")
    assert (r50.INPUT.MIN_SIZE_TEST, r50.INPUT.MAX_SIZE_TEST) == (256, 1600)
    assert list(r50.SEVERSTAL.TTA_FLIPS) == ["horizontal", "vertical"]


def test_overrides_apply_like_detectron2_tools():
    cfg = get_severstal_cfg("small", ["SOLVER.MAX_ITER", "7", "SEVERSTAL.MIN_AREAS", "[1, 2, 3, 4]"])
    assert cfg.SOLVER.MAX_ITER == 7 and list(cfg.SEVERSTAL.MIN_AREAS) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (["SOLVER.MAX_ITER"], "KEY VALUE pairs"),
        (["SEVERSTAL.MIN_AREAS", "[1, 2]"], "one value per class"),
        (["SEVERSTAL.TTA_FLIPS", "['diagonal']"], "allowed: \\['horizontal', 'vertical'\\]"),
        (["SEVERSTAL.OPTIMIZER", "Adam"], "allowed: \\['SGD', 'AdamW'\\]"),
    ],
)
def test_bad_overrides_say_what_is_allowed(opts, message):
    with pytest.raises(ValueError, match=message):
        get_severstal_cfg("small", opts)


def test_unknown_config_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown config 'tiny'.*\['fewlabels', 'r50', 'small'\]"):
        resolve_config("tiny")


def test_scratch_weights_switch_to_groupnorm_without_frozen_stages():
    cfg = get_severstal_cfg("r50")
    use_scratch_weights(cfg)
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.RESNETS.NORM == "GN" and cfg.MODEL.BACKBONE.FREEZE_AT == 0


def test_bundle_reloads_config_and_applies_tuned_thresholds(scratch_run, tmp_path):
    bundle = load_bundle(scratch_run / "model_final.pth", device="cpu")
    assert bundle.folder == scratch_run and bundle.cfg.MODEL.RESNETS.DEPTH == 18
    assert list(bundle.cfg.SEVERSTAL.SCORE_THRESHOLDS) == [0.1] * 4
    run = copy_run(scratch_run, tmp_path / "run")
    Thresholds(score_thresholds=[0.3, 0.4, 0.5, 0.6], min_areas=[5, 6, 7, 8]).write(run)
    tuned = load_bundle(run)
    assert list(tuned.cfg.SEVERSTAL.SCORE_THRESHOLDS) == [0.3, 0.4, 0.5, 0.6]
    assert list(tuned.cfg.SEVERSTAL.MIN_AREAS) == [5, 6, 7, 8]
    assert tuned.cfg.MODEL.WEIGHTS == str(run / "model_final.pth")


def test_bundle_without_config_says_what_is_missing(tmp_path):
    (tmp_path / "model_final.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):
        load_bundle(tmp_path)


@pytest.mark.parametrize("opts, words", [
    (["SEVERSTAL.COPY_PASTE_PROB", "1.5"], "COPY_PASTE_PROB must be in"),
    (["SEVERSTAL.BRIGHTNESS_CONTRAST", "1.0"], "BRIGHTNESS_CONTRAST must be in"),
    (["SEVERSTAL.CROP_WIDTH", "-1"], "CROP_WIDTH must be 0"),
    (["SEVERSTAL.PRESENCE_THRESHOLDS", "[0.5]"], "PRESENCE_THRESHOLDS needs one value per class"),
])
def test_few_label_levers_are_validated_early(opts, words):
    with pytest.raises(ValueError, match=words):
        get_severstal_cfg("fewlabels", opts)


def test_the_fewlabels_recipe_turns_its_levers_on():
    cfg = get_severstal_cfg("fewlabels")
    assert cfg.MODEL.META_ARCHITECTURE == "PresenceRCNN"
    assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    assert cfg.SEVERSTAL.CROP_WIDTH > 0 and cfg.SEVERSTAL.COPY_PASTE_PROB > 0 and cfg.SEVERSTAL.BRIGHTNESS_CONTRAST > 0
    assert not cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS

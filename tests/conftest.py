"""Shared fixtures: the real Severstal sample, and small models to predict with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from severstal.files import real_data_root


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real competition sample (``severstal.files.real_data_root``: ``$SEVERSTAL_REAL_DATA``, else beside the
    checkout); skips only where it is absent outside CI."""
    folder = real_data_root()
    if not folder.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"real data missing at {folder}: CI must run the real-data tests")
        pytest.skip(f"real data not found at {folder}")
    return folder


@pytest.fixture(scope="session")
def scratch_run(tmp_path_factory) -> Path:
    """A run folder (config.yaml + model_final.pth) of the ``small`` config with random weights.

    Its score thresholds are low so that even random weights give defects to check answers against.
    """
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from severstal.files import CONFIG_FILE, WEIGHTS_FILE
    from severstal.model.config import get_severstal_cfg

    folder = tmp_path_factory.mktemp("scratch_run")
    torch.manual_seed(0)
    cfg = get_severstal_cfg("small", ["MODEL.DEVICE", "cpu", "SEVERSTAL.SCORE_THRESHOLDS", "[0.1, 0.1, 0.1, 0.1]",
                                      "TEST.DETECTIONS_PER_IMAGE", "10"])
    DetectionCheckpointer(build_model(cfg), save_dir=str(folder)).save(Path(WEIGHTS_FILE).stem)
    (folder / CONFIG_FILE).write_text(cfg.dump())
    return folder


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A small synthetic dataset in Kaggle's layout (train.csv + train_images/)."""
    from severstal.data.synth import make_synthetic_dataset

    folder = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(folder, 24, seed=3)
    return folder


@pytest.fixture(scope="session")
def trained_run(synthetic_data, tmp_path_factory) -> Path:
    """A run folder from a few iterations of the ``small`` config on :func:`synthetic_data`, seeded (same
    initial weights and data order; threads still round differently): the tests that need its weak detections
    on real images, near their 0.005 thresholds, failed now and then with unseeded runs."""
    from severstal.model.train import train

    out = tmp_path_factory.mktemp("run")
    train(synthetic_data, "small", out, ["SOLVER.MAX_ITER", "6", "SOLVER.IMS_PER_BATCH", "2",
                                          "SOLVER.WARMUP_ITERS", "2", "SEVERSTAL.VAL_FRACTION", "0.25",
                                          "DATALOADER.NUM_WORKERS", "0", "SEED", "0",
                                          # whole strips, as before `small` trained on crops: six iterations of
                                          # crops left real-image scores under the raised floor in one CI run in three
                                          "SEVERSTAL.CROP_WIDTH", "0"])
    return out


@pytest.fixture(scope="session")
def low_floor_run(trained_run, tmp_path_factory) -> Path:
    """:func:`trained_run`'s weights with a score floor of 0.001, 20 detections, thresholds of 0.005, and the
    defect classes' logits and the mask logits raised by a constant.

    Six iterations leave real-image scores between about 0.001 and 0.2, and where they land moves with the CPU's
    kernels (one CI machine's model found nothing on the first three real images). The raised biases put every
    image's top detections well above the thresholds with non-empty masks, so that exported and PyTorch outputs
    always have something to compare. ``trained_run`` is untouched.
    """
    import torch

    from severstal.files import WEIGHTS_FILE
    from severstal.model.run import copy_run

    run = copy_run(trained_run, tmp_path_factory.mktemp("low_floor_run"),
                   ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.001", "TEST.DETECTIONS_PER_IMAGE", "20",
                    "SEVERSTAL.SCORE_THRESHOLDS", "[0.005, 0.005, 0.005, 0.005]"])
    checkpoint = torch.load(run / WEIGHTS_FILE, map_location="cpu", weights_only=False)
    weights = checkpoint["model"]
    weights["roi_heads.box_predictor.cls_score.bias"][:-1] += 3.0  # the last logit is the background's
    weights["roi_heads.mask_head.predictor.bias"] += 2.0
    (run / WEIGHTS_FILE).unlink()  # a hard link to trained_run's file: write a new one
    torch.save(checkpoint, run / WEIGHTS_FILE)
    return run


@pytest.fixture(scope="session")
def onnx_export(low_floor_run, tmp_path_factory) -> Path:
    """An export folder of :func:`low_floor_run` (simplified ``model.onnx``, opset 17, ``config.yaml``)."""
    from severstal.model.export import export_onnx

    return export_onnx(low_floor_run, tmp_path_factory.mktemp("onnx_export")).parent

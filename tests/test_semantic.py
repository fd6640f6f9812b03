"""The per-pixel head (``SEVERSTAL.SEMANTIC_HEAD``): trained with the detector, its class masks applied the same way
by predict, the ONNX export and the handler, and its pixel thresholds tuned."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from detectron2.structures import BitMasks, ImageList, Instances

from severstal.data.dice import dice
from severstal.data.images import read_image
from severstal.data.rle import mask_to_rle, rle_to_mask
from severstal.files import METRICS_FILE
from severstal.model.config import get_severstal_cfg
from severstal.model.evaluation import ImageDetections, tune_thresholds
from severstal.model.predict import Detections, Predictor
from severstal.model.presence import has_semantic, semantic_targets
from severstal.model.run import Thresholds
from severstal.serve.worker import ServingModel


def test_semantic_targets_label_each_instance_and_ignore_the_padding():
    instances = Instances((4, 6))
    masks = torch.zeros(2, 4, 6, dtype=torch.bool)
    masks[0, 0:2, 0:3] = True
    masks[1, 1:3, 2:5] = True  # overlaps the first at (1, 2)
    instances.gt_masks, instances.gt_classes = BitMasks(masks), torch.tensor([2, 0])
    empty = Instances((3, 5))
    empty.gt_masks = BitMasks(torch.zeros(0, 3, 5, dtype=torch.bool))
    empty.gt_classes = torch.zeros(0, dtype=torch.long)
    images = ImageList(torch.zeros(2, 3, 4, 8), [(4, 6), (3, 5)])
    labels = semantic_targets([instances, empty], images, ignore_value=255)
    assert labels.shape == (2, 4, 8) and labels.dtype == torch.long
    assert labels[0, 0, 0] == 3 and labels[0, 1, 2] == 1 and labels[0, 2, 4] == 1 and labels[0, 3, 0] == 0
    assert (labels[0, :, 6:] == 255).all() and int((labels[0] == 3).sum()) == 5
    assert (labels[1, :3, :5] == 0).all() and (labels[1, 3] == 255).all() and (labels[1, :, 5:] == 255).all()


def test_the_head_needs_the_presence_architecture_and_a_background_channel():
    with pytest.raises(ValueError, match='SEVERSTAL.SEMANTIC_HEAD needs MODEL.META_ARCHITECTURE "PresenceRCNN"'):
        get_severstal_cfg("small", ["SEVERSTAL.SEMANTIC_HEAD", "True"])
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.NUM_CLASSES must be MODEL.ROI_HEADS.NUM_CLASSES"):
        get_severstal_cfg("fewlabels", ["SEVERSTAL.SEMANTIC_HEAD", "True", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4"])


@pytest.fixture(scope="module")
def images(real_data) -> list[np.ndarray]:
    return [read_image(p) for p in sorted((real_data / "train_images").glob("*.jpg"))[:4]]


@pytest.fixture(scope="module")
def semantic_run(synthetic_data, tmp_path_factory, images):
    """Four iterations of the fewlabels recipe with the per-pixel head on synthetic strips; pixel thresholds at
    each class's 95th percentile on :func:`images`, so that every class mask has pixels in and out."""
    from severstal.model.train import train

    out = tmp_path_factory.mktemp("semantic_run")
    train(synthetic_data, "fewlabels", out, ["SEVERSTAL.SEMANTIC_HEAD", "True", "SOLVER.MAX_ITER", "4",
                                             "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2",
                                             "SEVERSTAL.PRESENCE_FOREST_TREES", "4", "DATALOADER.NUM_WORKERS", "0",
                                             "SEVERSTAL.VAL_FRACTION", "0.25", "SEED", "0"])
    probs = np.stack([d.class_probs for d in Predictor.from_weights(out, device="cpu").detect(images)])
    pixels = [float(np.quantile(probs[:, k], 0.95)) for k in range(4)]
    Thresholds(score_thresholds=[0.05] * 4, min_areas=[0] * 4, presence_thresholds=[0.0] * 4,
               pixel_thresholds=pixels).write(out)
    return out


def test_training_adds_the_pixel_loss(semantic_run):
    rows = [json.loads(line) for line in (semantic_run / METRICS_FILE).read_text().splitlines()]
    losses = [r["loss_sem_seg"] for r in rows if "loss_sem_seg" in r]
    assert losses and all(np.isfinite(losses)) and losses[0] > 0


def test_class_masks_are_the_pixels_at_their_threshold(semantic_run, images):
    predictor = Predictor.from_weights(semantic_run, device="cpu")
    assert has_semantic(predictor.backend.model)
    thresholds = predictor.pixel_thresholds
    for det, record in zip(predictor.detect(images), predictor.predict(images)):
        assert det.class_probs.shape == (4, 256, 1600) and det.class_probs.dtype == np.float32
        assert ((det.class_probs >= 0) & (det.class_probs <= 1)).all()
        assert (det.class_probs.sum(0) <= 1 + 1e-5).all()  # softmax with the background left out
        for k, c in enumerate("1234"):
            mask = rle_to_mask(record["classes"][c], (256, 1600)).astype(bool)
            assert np.array_equal(mask, det.class_probs[k] >= thresholds[k]), c
    assert any(record["classes"][c] for record in predictor.predict(images) for c in "1234")


def test_predict_the_onnx_export_and_the_handler_give_the_same_class_masks(semantic_run, images, tmp_path):
    import onnx

    from severstal.model.export import export_onnx

    reference = Predictor.from_weights(semantic_run, device="cpu").predict(images)
    exported = export_onnx(semantic_run, tmp_path / "export")
    assert [o.name for o in onnx.load(exported, load_external_data=False).graph.output][-1] == "class_probs"
    others = [Predictor.from_weights(exported.parent, device="cpu").predict(images),
              ServingModel.load(semantic_run).predict(images),
              ServingModel.load(exported.parent, weights_name=exported.name).predict(images)]
    compared = 0
    for other in others:
        for mine, theirs in zip(reference, other):
            for c in "1234":
                a, b = (rle_to_mask(r["classes"][c], (256, 1600)).astype(bool) for r in (mine, theirs))
                assert dice(a, b) >= 0.99, c
                compared += a.any()
    assert compared


def test_tuning_picks_the_pixel_threshold_and_keeps_the_score_thresholds():
    """One image whose class-2 truth is the pixels with probability >= 0.6: tuning finds 0.6 and a Dice of 1."""
    probs = np.zeros((4, 8, 8), np.float32)
    probs[1] = np.linspace(0.0, 0.9, 64).reshape(8, 8)
    truth_mask = probs[1] >= 0.6
    det = Detections(8, 8, np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                     np.zeros((0, 8, 8), bool), None, probs)
    truth = pd.DataFrame({"ImageId": ["a.jpg"], "ClassId": [2], "EncodedPixels": [mask_to_rle(truth_mask)]})
    tuned = tune_thresholds([ImageDetections.from_detections("a.jpg", det)], truth, shape=(8, 8),
                            score_thresholds=(0.1, 0.2, 0.3, 0.4))
    assert tuned["pixel_thresholds"][1] == 0.6 and tuned["dice_per_class"][2] == 1.0
    assert tuned["score_thresholds"] == [0.1, 0.2, 0.3, 0.4]
    assert tuned["dice_per_class"][1] == 1.0 and tuned["min_areas"][0] > 8 * 8  # class 1: off, empty is right


def test_thresholds_json_carries_the_pixel_thresholds(tmp_path):
    saved = Thresholds([0.5] * 4, [0] * 4, [0.0] * 4, [0.3, 0.4, 0.5, 0.6])
    saved.write(tmp_path)
    assert Thresholds.read(tmp_path).pixel_thresholds == (0.3, 0.4, 0.5, 0.6)
    cfg = get_severstal_cfg("fewlabels")
    Thresholds.read(tmp_path).apply(cfg)
    assert list(cfg.SEVERSTAL.PIXEL_THRESHOLDS) == [0.3, 0.4, 0.5, 0.6]
    with pytest.raises(ValueError, match=r"thresholds.json: pixel_thresholds needs 4 values in \[0, 1\]"):
        (tmp_path / "thresholds.json").write_text(json.dumps({**saved.to_dict(), "pixel_thresholds": [2, 0, 0, 0]}))
        Thresholds.read(tmp_path)

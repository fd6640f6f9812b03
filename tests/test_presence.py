"""The presence gate: trained with the detector, applied the same way by predict, the ONNX export and the handler."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from severstal.data.dice import dice
from severstal.data.images import read_image
from severstal.data.rle import mask_to_rle, rle_to_mask
from severstal.model.config import CONFIG_FILE, get_severstal_cfg
from severstal.model.evaluation import ImageDetections, tune_thresholds
from severstal.model.predict import Detections, Predictor, make_record, network_input, prediction_resize
from severstal.model.presence import (
    NUM_TEXTURE_FEATURES,
    PresenceForest,
    PresenceRCNN,
    fit_presence_forest,
    has_presence,
    presence_targets,
    texture_features,
)
from severstal.model.run import Thresholds
from severstal.serve.worker import ServingModel


def test_presence_targets_mark_the_classes_of_each_image():
    from detectron2.structures import Instances

    first, second = Instances((4, 4)), Instances((4, 4))
    first.gt_classes = torch.tensor([2, 0, 2])
    second.gt_classes = torch.tensor([], dtype=torch.int64)
    np.testing.assert_array_equal(presence_targets([first, second], 4).numpy(), [[1, 0, 1, 0], [0, 0, 0, 0]])


def test_the_forest_answers_as_scikit_learn_with_shallow_branches_padded():
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    features = rng.normal(size=(80, 5)).astype(np.float32)
    labels = (features[:, 0] + 0.5 * features[:, 3] > 0.2).astype(int)
    # min_samples_leaf 12 stops many branches above depth 5: those are padded
    fitted = RandomForestClassifier(15, max_depth=5, min_samples_leaf=12, random_state=0).fit(features, labels)
    depths = [e.tree_.max_depth for e in fitted.estimators_]
    assert min(depths) < 5 and max(depths) > 2
    forest = PresenceForest(num_classes=2, trees=15, depth=5)
    forest.load_forest(1, fitted.estimators_)
    new = rng.normal(size=(40, 5)).astype(np.float32)
    probs = forest(torch.from_numpy(new)).numpy()
    np.testing.assert_allclose(probs[:, 1], fitted.predict_proba(new)[:, 1], atol=1e-6)
    assert probs[:, 1].max() - probs[:, 1].min() > 0.3  # not a constant
    np.testing.assert_array_equal(probs[:, 0], 0.0)  # class 0 was not loaded: leaves 0
    with pytest.raises(ValueError, match="depth"):
        PresenceForest(1, 15, 2).load_forest(0, fitted.estimators_)


def test_texture_features_see_a_scratch():
    plain = torch.full((1, 3, 128, 800), 100.0)
    scratched = plain.clone()
    scratched[:, :, 60:62, 100:400] = 30.0  # a dark line two pixels high
    a, b = texture_features(plain), texture_features(scratched)
    assert a.shape == (1, NUM_TEXTURE_FEATURES)
    assert torch.count_nonzero(a[0, 4:]) == 0  # a flat image has no edges
    assert b[0, 2] < a[0, 2]  # its darkest 1% is darker
    assert torch.count_nonzero(b[0, 4:]) > 10


@pytest.fixture(scope="module")
def images(real_data) -> list[np.ndarray]:
    return [read_image(p) for p in sorted((real_data / "train_images").glob("*.jpg"))[:6]]


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory, images):
    """A run of the fewlabels recipe with random weights, its presence forest fitted on :func:`images` with made-up
    labels, a low score threshold, and presence thresholds at each class's median presence on :func:`images`, so that
    the gate empties some class masks and keeps others."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    folder = tmp_path_factory.mktemp("gated_run")
    torch.manual_seed(0)
    cfg = get_severstal_cfg("fewlabels", ["MODEL.DEVICE", "cpu", "TEST.DETECTIONS_PER_IMAGE", "10",
                                          "SEVERSTAL.SCORE_THRESHOLDS", "[0.1, 0.1, 0.1, 0.1]"])
    model = build_model(cfg)
    assert has_presence(model) and model.presence_forest is not None
    resize = prediction_resize(cfg)
    labels = np.array([[k % 2, k // 3, (k + 1) % 2, k % 3 == 0] for k in range(len(images))])
    fit_presence_forest(model, [network_input(image, resize) for image in images], labels)
    DetectionCheckpointer(model, save_dir=str(folder)).save("model_final")
    (folder / CONFIG_FILE).write_text(cfg.dump())
    presence = np.stack([d.presence for d in Predictor.from_weights(folder, device="cpu").detect(images)])
    gates = [float(v) for v in np.median(presence, axis=0)]
    Thresholds(score_thresholds=[0.1] * 4, min_areas=[0] * 4, presence_thresholds=gates).write(folder)
    return folder


def class_masks(record: dict) -> dict[str, np.ndarray]:
    return {c: rle_to_mask(rle, shape=(record["height"], record["width"])).astype(bool)
            for c, rle in record["classes"].items()}


def test_the_gate_empties_exactly_the_class_masks_under_their_presence_threshold(gated_run, images):
    predictor = Predictor.from_weights(gated_run, device="cpu")
    gates = predictor.presence_thresholds
    assert gates != [0.0] * 4  # thresholds.json was applied
    scores, areas = predictor.thresholds
    emptied = kept = 0
    for det in predictor.detect(images):
        open_gate = make_record(det, scores, areas)
        gated = make_record(det, scores, areas, gates)
        for k, c in enumerate("1234"):
            if det.presence[k] < gates[k]:
                assert gated["classes"][c] == ""
                emptied += open_gate["classes"][c] != ""
            else:
                assert gated["classes"][c] == open_gate["classes"][c]
                kept += open_gate["classes"][c] != ""
        assert all(det.presence[d["class_id"] - 1] >= gates[d["class_id"] - 1] for d in gated["defects"])
    assert emptied and kept  # the test sees both sides of the gate


def test_predict_the_onnx_export_and_the_handler_gate_alike(gated_run, images, tmp_path):
    from severstal.model.export import export_onnx

    reference = Predictor.from_weights(gated_run, device="cpu").predict(images)
    exported = export_onnx(gated_run, tmp_path / "export")
    onnx_records = Predictor.from_weights(exported.parent, device="cpu").predict(images)
    handler_records = ServingModel.load(gated_run).predict(images)
    onnx_handler_records = ServingModel.load(exported.parent, weights_name=exported.name).predict(images)
    assert handler_records == reference
    for other in (onnx_records, onnx_handler_records):
        for mine, theirs in zip(reference, other):
            a, b = class_masks(mine), class_masks(theirs)
            for c in a:
                assert a[c].any() == b[c].any(), c  # the same pairs are gated
                assert dice(a[c], b[c]) >= 0.99


def test_tuning_picks_a_gate_that_keeps_empty_pairs_empty():
    """Two images with the same class-1 detection; only the first truly has the defect, and only it has a high
    presence. Without a gate one of them is always wrong; with the tuned gate both are right."""
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 2:6, 2:6] = True

    def detections(presence: float) -> Detections:
        return Detections(8, 8, np.array([[2, 2, 6, 6]], np.float32), np.array([0.9], np.float32),
                          np.array([1]), mask.copy(), np.array([presence, 0.1, 0.1, 0.1], np.float32))

    truth = pd.DataFrame({"ImageId": ["a.jpg"], "ClassId": [1], "EncodedPixels": [mask_to_rle(mask[0])]})
    dets = [ImageDetections.from_detections("a.jpg", detections(0.9)),
            ImageDetections.from_detections("b.jpg", detections(0.3))]
    tuned = tune_thresholds(dets, truth, shape=(8, 8))
    assert 0.3 < tuned["presence_thresholds"][0] <= 0.9
    assert tuned["dice_per_class"][1] == 1.0
    without = tune_thresholds([ImageDetections(d.image_id, replace(d.det, presence=None), d.rles) for d in dets],
                              truth, shape=(8, 8))
    assert without["presence_thresholds"] == [0.0] * 4 and without["dice_per_class"][1] == 0.5


def test_a_model_without_the_head_is_not_gated(scratch_run, images):
    predictor = Predictor.from_weights(scratch_run, device="cpu")
    assert not isinstance(predictor.backend.model, PresenceRCNN)
    assert all(det.presence is None for det in predictor.detect(images[:1]))

"""Export: ONNX parity with PyTorch on real images, dynamic sizes, simplification, metadata, TensorRT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from severstal.data.dice import dice
from severstal.data.images import read_image
from severstal.model.backends import BackendUnavailable, OnnxRuntimeBackend, tensorrt_missing
from severstal.model.config import load_bundle
from severstal.model.export import (
    INPUT_NAME,
    METADATA_KEYS,
    OUTPUT_NAMES,
    _simplify,
    _zero_safe_group_norm,
    export_onnx,
    export_tensorrt,
    read_metadata,
)
from severstal.model.predict import Predictor, TorchBackend

TENSORRT_MISSING = tensorrt_missing()


def real_images(real_data: Path, count: int) -> list[np.ndarray]:
    return [read_image(p) for p in sorted((real_data / "train_images").glob("*.jpg"))[:count]]


def assert_same_detections(reference, other, box_tolerance: float, min_dice: float) -> None:
    """Same instances per class, each reference box within ``box_tolerance`` px of one of ``other``'s boxes
    of its class, and per-class union masks with Dice >= ``min_dice``."""
    assert len(other.scores) == len(reference.scores)
    for class_id in (1, 2, 3, 4):
        mine, theirs = reference.class_ids == class_id, other.class_ids == class_id
        assert mine.sum() == theirs.sum()
        if mine.any():
            gaps = np.abs(reference.boxes[mine][:, None] - other.boxes[theirs][None]).max(axis=2)
            assert gaps.min(axis=1).max() <= box_tolerance
        assert dice(reference.masks[mine].any(axis=0), other.masks[theirs].any(axis=0)) >= min_dice


def test_export_writes_a_checked_model_with_its_config_beside_and_inside(onnx_export):
    path = onnx_export / "model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    [graph_input] = model.graph.input
    assert graph_input.name == INPUT_NAME
    assert [d.dim_value or d.dim_param for d in graph_input.type.tensor_type.shape.dim] == [3, "height", "width"]
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    metadata = read_metadata(path)
    assert json.loads(metadata[METADATA_KEYS["thresholds"]]) == {"score_thresholds": [0.005] * 4,
                                                                 "min_areas": [0, 0, 0, 0],
                                                                 "presence_thresholds": [0.0] * 4}
    assert json.loads(metadata[METADATA_KEYS["class_names"]]) == ["class 1", "class 2", "class 3", "class 4"]
    assert metadata[METADATA_KEYS["detections_per_image"]] == "20"
    assert "SCORE_THRESH_TEST: 0.001" in metadata[METADATA_KEYS["config"]]
    bundle = load_bundle(onnx_export, device="cpu")  # the folder alone is enough
    assert bundle.weights == path
    assert list(bundle.cfg.SEVERSTAL.SCORE_THRESHOLDS) == [0.005] * 4 and bundle.cfg.TEST.DETECTIONS_PER_IMAGE == 20


def test_onnxruntime_matches_pytorch_on_real_images(onnx_export, low_floor_run, real_data):
    torch_predictor = Predictor.from_weights(low_floor_run, device="cpu", precision="fp32")
    onnx_predictor = Predictor.from_weights(onnx_export, device="cpu")
    assert isinstance(onnx_predictor.backend, OnnxRuntimeBackend)
    images = real_images(real_data, 6)
    reference, exported = torch_predictor.detect(images), onnx_predictor.detect(images)
    assert sum(len(d.scores) for d in reference) > 0, "the comparison needs detections"
    for ref, other in zip(reference, exported):
        assert_same_detections(ref, other, box_tolerance=0.05, min_dice=0.99)


@pytest.mark.parametrize("size", [(256, 1600), (200, 904)])
def test_exported_model_runs_at_a_size_it_was_not_traced_with(onnx_export, low_floor_run, real_data, size):
    # The export was traced at 128 x 800 (the small config's input); feed other sizes straight to the network.
    image = real_images(real_data, 1)[0][: size[0], : size[1]]
    tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32)
    [ref] = TorchBackend(load_bundle(low_floor_run, device="cpu").cfg).run([tensor])
    [out] = OnnxRuntimeBackend(onnx_export / "model.onnx").run([tensor])
    assert len(ref.scores) > 0 and len(out.scores) == len(ref.scores)
    order_ref, order_out = ref.scores.argsort(descending=True), out.scores.argsort(descending=True)
    assert torch.equal(ref.classes[order_ref], out.classes[order_out])
    assert torch.allclose(ref.boxes[order_ref], out.boxes[order_out], atol=0.05)
    assert torch.allclose(ref.mask_probs[order_ref], out.mask_probs[order_out], atol=1e-3)


def test_simplified_and_unsimplified_give_the_same_outputs(onnx_export, low_floor_run, real_data, tmp_path):
    from severstal.cli import main

    assert main(["export", "--weights", str(low_floor_run), "--format", "onnx", "--out", str(tmp_path),
                 "--no-simplify"]) == 0
    plain, simplified = onnx.load(str(tmp_path / "model.onnx")), onnx.load(str(onnx_export / "model.onnx"))
    assert len(simplified.graph.node) < len(plain.graph.node)
    predictor = Predictor.from_weights(low_floor_run, device="cpu")
    tensors = [predictor.preprocess(image) for image in real_images(real_data, 2)]
    for a, b in zip(OnnxRuntimeBackend(tmp_path / "model.onnx").run(tensors),
                    OnnxRuntimeBackend(onnx_export / "model.onnx").run(tensors)):
        assert len(a.scores) == len(b.scores) > 0
        for name in ("boxes", "scores", "mask_probs"):
            assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-4)
        assert torch.equal(a.classes, b.classes)


def test_export_refuses_old_opsets_and_exported_weights(onnx_export, tmp_path):
    with pytest.raises(ValueError, match="opset 11 is too old: use 16 or newer"):
        export_onnx(onnx_export, tmp_path, opset=11)
    with pytest.raises(ValueError, match=r"export needs PyTorch weights \(.pth\)"):
        export_onnx(onnx_export / "model.onnx", tmp_path)


def tiny_model() -> onnx.ModelProto:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "tiny", [x], [y])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_a_failing_simplifier_keeps_the_unsimplified_graph(monkeypatch, caplog):
    import onnxsim

    model = tiny_model()

    def broken(*args, **kwargs):
        raise RuntimeError("no luck")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    assert _simplify(model) is model
    assert "onnx-simplifier failed (RuntimeError: no luck); keeping the unsimplified graph" in caplog.text
    monkeypatch.setattr(onnxsim, "simplify", lambda m: (m, False))
    assert _simplify(model) is model
    assert "could not validate" in caplog.text


def test_images_without_detections_match_pytorch(trained_run, real_data, tmp_path):
    """With a score floor no detection reaches, the exported graph answers empty outputs like PyTorch
    (a GroupNorm mask head used to fail there in ONNX Runtime)."""
    from severstal.model.run import copy_run

    run = copy_run(trained_run, tmp_path / "run", ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.999"])
    export_onnx(run, tmp_path / "onnx")
    tensors = [Predictor.from_weights(tmp_path / "onnx", device="cpu").preprocess(image)
               for image in real_images(real_data, 2)]
    reference = TorchBackend(load_bundle(run, device="cpu").cfg).run(tensors)
    exported = OnnxRuntimeBackend(tmp_path / "onnx" / "model.onnx").run(tensors)
    assert [len(r.scores) for r in reference] == [len(o.scores) for o in exported] == [0, 0]
    assert all(o.mask_probs.shape == (0, 28, 28) and o.boxes.shape == (0, 4) for o in exported)


def test_group_norm_exports_for_an_empty_batch(tmp_path):
    """A mask head with GroupNorm sees zero boxes on an image without detections."""
    import onnxruntime as ort

    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.GroupNorm(4, 16)).eval()
    torch.nn.init.normal_(head[1].weight)
    x = torch.randn(3, 8, 14, 14)
    with _zero_safe_group_norm(head):
        assert not isinstance(head[1], torch.nn.GroupNorm)
        torch.onnx.export(head, (x,), str(tmp_path / "head.onnx"), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}})
    assert isinstance(head[1], torch.nn.GroupNorm)
    session = ort.InferenceSession(str(tmp_path / "head.onnx"))
    assert session.run(None, {"x": np.zeros((0, 8, 14, 14), np.float32)})[0].shape == (0, 16, 14, 14)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], head(x).numpy(), atol=1e-5)


@pytest.mark.skipif(TENSORRT_MISSING is None, reason="TensorRT and a GPU are here: the engine tests run instead")
def test_tensorrt_export_says_what_is_missing(onnx_export, tmp_path, capsys):
    from severstal.cli import main

    with pytest.raises(BackendUnavailable, match="TensorRT is unavailable: ") as err:
        export_tensorrt(onnx_export / "model.onnx", tmp_path)
    assert "pip install 'severstal[tensorrt]'" in str(err.value) or "CUDA" in str(err.value)
    assert main(["export", "--weights", str(onnx_export / "model.onnx"), "--format", "tensorrt",
                 "--out", str(tmp_path)]) == 2
    assert "severstal export: error: TensorRT is unavailable" in capsys.readouterr().err
    assert not (tmp_path / "model.engine").exists()


@pytest.mark.skipif(TENSORRT_MISSING is not None, reason=f"TensorRT engine tests need it: {TENSORRT_MISSING}")
@pytest.mark.parametrize("fp16", [False, True])
def test_tensorrt_engine_matches_pytorch(onnx_export, low_floor_run, real_data, tmp_path, fp16):
    from severstal.model.backends import TensorRTBackend

    engine = export_tensorrt(onnx_export / "model.onnx", tmp_path, fp16=fp16)
    assert engine.name == "model.engine" and load_bundle(tmp_path, device="cuda").weights == engine
    torch_predictor = Predictor.from_weights(low_floor_run, device="cuda")
    engine_predictor = Predictor.from_weights(tmp_path, device="cuda")
    assert isinstance(engine_predictor.backend, TensorRTBackend)
    images = real_images(real_data, 4)
    for ref, other in zip(torch_predictor.detect(images), engine_predictor.detect(images)):
        if fp16:  # half precision may reorder near-equal scores at the cap: compare counts only
            assert abs(len(other.scores) - len(ref.scores)) <= 2
        else:
            assert_same_detections(ref, other, box_tolerance=0.5, min_dice=0.99)


def test_an_export_freezes_the_lowest_tuned_threshold_as_its_floor(low_floor_run, onnx_export, real_data, tmp_path):
    from severstal.cli import main
    from severstal.model.export import export_score_floor
    from severstal.model.run import Thresholds, copy_run

    run = copy_run(low_floor_run, tmp_path / "run")
    assert export_score_floor(load_bundle(run, device="cpu")) == pytest.approx(0.001)  # untuned: the config's
    Thresholds(score_thresholds=[0.3, 0.02, 0.4, 0.5], min_areas=[0] * 4).write(run)
    assert export_score_floor(load_bundle(run, device="cpu")) == pytest.approx(0.02)

    # A floor that drops about half of the rows of the export with the config's floor (0.001).
    tensors = [Predictor.from_weights(run, device="cpu").preprocess(image) for image in real_images(real_data, 3)]
    full = OnnxRuntimeBackend(onnx_export / "model.onnx").run(tensors)
    scores = np.sort(torch.cat([r.scores for r in full]).numpy())
    floor = float(scores[len(scores) // 2 - 1 : len(scores) // 2 + 1].mean())  # between two scores, equal to none
    assert main(["export", "--weights", str(run), "--format", "onnx", "--out", str(tmp_path / "onnx"),
                 "--score-floor", str(floor)]) == 0
    assert load_bundle(tmp_path / "onnx", device="cpu").cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == pytest.approx(floor)
    raised = OnnxRuntimeBackend(tmp_path / "onnx" / "model.onnx").run(tensors)
    assert 0 < sum(len(r.scores) for r in raised) < sum(len(r.scores) for r in full)
    for a, b in zip(raised, OnnxRuntimeBackend(onnx_export / "model.onnx").run(tensors, min_score=floor)):
        assert torch.equal(a.classes, b.classes)
        assert torch.allclose(a.scores, b.scores, atol=1e-5) and torch.allclose(a.boxes, b.boxes, atol=1e-3)

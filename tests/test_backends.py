"""Backends: names validated early, the backend follows the model file, ONNX Runtime in prediction and serving."""

from __future__ import annotations

import re
import zipfile

import onnx
import pytest
import torch

import severstal.serve
from severstal import files
from severstal.data.dice import dice
from severstal.data.images import decode_image
from severstal.data.rle import rle_to_mask
from severstal.files import BACKENDS, backend_for, check_backend
from severstal.model.backends import (
    BackendUnavailable,
    OnnxRuntimeBackend,
    TensorRTBackend,
    make_backend,
    tensorrt_missing,
)
from severstal.model.config import load_bundle
from severstal.model.predict import Predictor, TorchBackend
from severstal.serve import archive as serve_archive
from severstal.serve import worker as serve_worker

VALID = "valid backends: ['torch', 'onnxruntime', 'openvino', 'tensorrt']"


def test_an_unknown_backend_lists_the_valid_ones(scratch_run, tmp_path, capsys):
    from severstal.cli import main

    with pytest.raises(ValueError, match=re.escape(f"unknown backend 'tensorflow'; {VALID}")):
        check_backend("tensorflow")
    cfg = load_bundle(scratch_run, device="cpu").cfg
    with pytest.raises(ValueError, match=re.escape(f"unknown backend 'tensorflow'; {VALID}")):
        make_backend("tensorflow", cfg)
    with pytest.raises(ValueError, match="backend 'openvino' cannot run model_final.pth: that file is for 'torch'"):
        make_backend("openvino", cfg)
    assert main(["predict", "--weights", str(scratch_run), "--images", str(tmp_path), "--out",
                 str(tmp_path / "s.csv"), "--backend", "tflite"]) == 2
    assert f"unknown backend 'tflite'; {VALID}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown backend 'onnx'; allowed: "):
        serve_worker.HandlerSettings.from_mapping({"backend": "onnx"})
    assert files.BACKENDS == BACKENDS


def test_the_backend_follows_the_model_file():
    assert [backend_for(name) for name in ("model_final.pth", "model.onnx", "model.engine", "m.plan")] == [
        "torch", "onnxruntime", "tensorrt", "tensorrt"]
    with pytest.raises(ValueError, match=r"model files end in \['.engine', '.onnx', '.pkl', '.plan', '.pth'\]"):
        backend_for("model.pt")
    assert serve_worker.HandlerSettings.from_mapping({}).backend is None  # null: follow the archived file


def test_a_backend_refuses_a_model_file_for_another(onnx_export, low_floor_run):
    exported = load_bundle(onnx_export, device="cpu").cfg
    assert isinstance(make_backend(None, exported), OnnxRuntimeBackend)
    with pytest.raises(ValueError, match="backend 'torch' cannot run model.onnx: that file is for 'onnxruntime'"):
        make_backend("torch", exported)
    with pytest.raises(ValueError, match="backend 'onnxruntime' cannot run model_final.pth"):
        make_backend("onnxruntime", load_bundle(low_floor_run, device="cpu"))
    assert isinstance(make_backend("torch", load_bundle(low_floor_run, device="cpu")), TorchBackend)


def test_predictions_from_an_export_match_pytorch_records(onnx_export, low_floor_run, real_data):
    images = [decode_image(p.read_bytes()) for p in sorted((real_data / "train_images").glob("*.jpg"))[:3]]
    exported = Predictor.from_weights(onnx_export, device="cpu")
    assert exported.backend.providers == ["CPUExecutionProvider"]
    records = exported.predict(images)
    assert sum(len(r["defects"]) for r in records) > 0
    reference = Predictor.from_weights(low_floor_run, device="cpu", precision="fp32")
    for ref, rec in zip(reference.predict(images), records):
        assert len(rec["defects"]) == len(ref["defects"])
        for c, rle in ref["classes"].items():
            assert dice(rle_to_mask(rec["classes"][c]), rle_to_mask(rle)) >= 0.99


def test_onnxruntime_caps_detections_below_the_exported_cap(onnx_export, low_floor_run, real_data, caplog):
    path = onnx_export / "model.onnx"
    image = decode_image(next((real_data / "train_images").glob("*.jpg")).read_bytes())
    tensor = Predictor.from_weights(low_floor_run, device="cpu").preprocess(image)
    [full] = OnnxRuntimeBackend(path).run([tensor])
    [capped] = OnnxRuntimeBackend(path, max_detections=5).run([tensor])
    assert len(full.scores) == 20 and len(capped.scores) == 5
    assert torch.equal(capped.scores, full.scores[:5]) and bool((full.scores[:-1] >= full.scores[1:]).all())
    OnnxRuntimeBackend(path, max_detections=50)
    assert "exported with at most 20 detections per image; 50 asked" in caplog.text


def test_onnxruntime_refuses_foreign_models_and_missing_providers(tmp_path, onnx_export):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "foreign", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), tmp_path / "f.onnx")
    with pytest.raises(ValueError, match=r"is not a severstal export: inputs \['x'\], outputs \['y'\]"):
        OnnxRuntimeBackend(tmp_path / "f.onnx")
    with pytest.raises(ValueError, match=r"\['NoSuchExecutionProvider'\] are not available here; available: "):
        OnnxRuntimeBackend(onnx_export / "model.onnx", providers=["NoSuchExecutionProvider"])
    with pytest.raises(FileNotFoundError, match="severstal export --format onnx"):
        OnnxRuntimeBackend(tmp_path / "missing.onnx")


@pytest.mark.skipif(tensorrt_missing() is None, reason="TensorRT and a GPU are here: tests/test_export.py runs engines")
def test_tensorrt_backend_says_what_is_missing(tmp_path):
    with pytest.raises(BackendUnavailable, match="TensorRT is unavailable: ") as err:
        TensorRTBackend(tmp_path / "model.engine")
    assert str(err.value).endswith(tensorrt_missing())


def test_the_server_runs_an_onnx_export(onnx_export, real_data):
    body = next((real_data / "train_images").glob("*.jpg")).read_bytes()
    model = serve_worker.ServingModel.load(onnx_export, "model.onnx")
    assert isinstance(model.predictor.backend, OnnxRuntimeBackend)
    [record] = model.predict([decode_image(body)])
    assert (record["height"], record["width"]) == (256, 1600) and set(record["classes"]) == {"1", "2", "3", "4"}
    with pytest.raises(ValueError, match="backend 'torch' cannot run model.onnx"):
        serve_worker.ServingModel.load(onnx_export, "model.onnx", handler_block={"backend": "torch"})


def test_archive_accepts_an_onnx_export(onnx_export, tmp_path):
    path = serve_archive.archive(onnx_export, tmp_path / "store")
    with zipfile.ZipFile(path) as mar:
        names = set(mar.namelist())
    assert {"model.onnx", "config.yaml", "handler.py", "model-config.yaml"} <= names
    assert "model_final.pth" not in names
    pinned = tmp_path / "torch-config.yaml"
    pinned.write_text(severstal.serve.MODEL_CONFIG_FILE.read_text().replace("backend: null", "backend: torch"))
    with pytest.raises(ValueError, match="sets backend 'torch', which cannot run model.onnx"):
        serve_archive.archive(onnx_export, tmp_path / "other", model_config=pinned)

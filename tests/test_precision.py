"""Precision and the default backend: fp32 by default, bf16 on request (native or emulated, by the CPU's flags)
and close to fp32 on real images, OpenVINO fp32 beside ONNX Runtime keeping the answers (Dice >= 0.99)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from severstal.bench.predict import PARITY_DICE, available_variants, parse_variants
from severstal.data.images import decode_image
from severstal.files import PRECISION_ENV, backends_for, check_precision
from severstal.model import backends
from severstal.model.backends import (
    BackendUnavailable,
    OpenVinoBackend,
    choose_backend,
    cpu_flags,
    cpu_has_bf16,
    describe_backend,
    make_backend,
    openvino_missing,
)
from severstal.model.config import load_bundle
from severstal.model.predict import Predictor, records_dice

AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})  # AMD Zen 3 / older Xeons: bf16 only emulated
AMX = AVX2 | {"avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile"}  # Sapphire Rapids
needs_openvino = pytest.mark.skipif(openvino_missing() is not None, reason=str(openvino_missing()))


def real_images(real_data: Path, count: int | None = None) -> list:
    return [decode_image(p.read_bytes()) for p in sorted((real_data / "train_images").glob("*.jpg"))[:count]]


@pytest.fixture(autouse=True)
def no_precision_env(monkeypatch):
    monkeypatch.delenv(PRECISION_ENV, raising=False)


@pytest.mark.parametrize("name, value", [("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"),
                                         ("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni")])
def test_kernels_capped_below_bf16_count_as_no_bf16(monkeypatch, name, value):
    monkeypatch.setattr(backends, "cpu_flags", lambda: AMX)
    assert cpu_has_bf16()
    monkeypatch.setenv(name, value)
    assert not cpu_has_bf16()
    assert cpu_has_bf16(AMX)  # another CPU's flags are judged without this process's settings
    monkeypatch.setenv(name, "AVX512_CORE_AMX" if name == "ONEDNN_MAX_CPU_ISA" else "avx512")
    assert cpu_has_bf16()


def test_fp32_is_the_default_and_bf16_runs_when_asked(monkeypatch):
    assert cpu_has_bf16(AMX) and not cpu_has_bf16(AVX2)
    assert str(choose_backend("run/model_final.pth", flags=AMX)) == "torch fp32 (runs the model file; torch's default)"
    assert choose_backend("m.pth", flags=AVX2).precision == "fp32"
    assert choose_backend("m.pth", precision="bf16", flags=AMX).reason == "runs the model file; asked"
    assert "emulated" in choose_backend("m.pth", precision="bf16", flags=AVX2).reason
    onnx = choose_backend("export/model.onnx", flags=AMX)
    assert (onnx.backend, onnx.precision) == ("onnxruntime", "fp32")
    assert choose_backend("model.onnx", backend="openvino", precision="fp32").reason == "asked; asked"
    with pytest.raises(ValueError, match=re.escape("unknown precision 'bf16' for backend 'openvino'; valid precisions: "
                                                   "['fp32', 'int8']")):  # lost answers on AMX (OpenVinoBackend)
        choose_backend("model.onnx", backend="openvino", precision="bf16")
    gpu = choose_backend("m.pth", device="cuda:0", fp16=True, flags=AMX)
    assert (gpu.backend, gpu.precision) == ("torch", "fp16")
    monkeypatch.setenv(PRECISION_ENV, "fp32")
    assert choose_backend("m.pth", flags=AMX).precision == "fp32"
    assert choose_backend("m.pth", flags=AMX).reason.endswith(f"${PRECISION_ENV}")
    assert backends_for("model.onnx") == ("onnxruntime", "openvino") and backends_for("m.pth") == ("torch",)
    assert isinstance(cpu_flags(), frozenset)


def test_unknown_or_unsupported_precisions_list_the_valid_ones(scratch_run, monkeypatch):
    with pytest.raises(ValueError, match=re.escape("unknown precision 'int4'; valid precisions: ['fp32', 'bf16', "
                                                   "'fp16', 'int8']")):
        check_precision("int4")
    with pytest.raises(ValueError, match=re.escape("unknown precision 'bf16' for backend 'onnxruntime'; valid "
                                                   "precisions: ['fp32', 'int8']")):
        choose_backend("model.onnx", precision="bf16")
    with pytest.raises(ValueError, match="torch fp16 runs on a CUDA GPU only"):
        make_backend(None, load_bundle(scratch_run, device="cpu"), precision="fp16")
    monkeypatch.setenv(PRECISION_ENV, "half")
    with pytest.raises(ValueError, match="unknown precision 'half' for backend 'torch'"):
        choose_backend("m.pth")
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        parse_variants("torch,torch:fp8")
    assert parse_variants("onnxruntime,torch:bf16,onnxruntime") == [("torch", "fp32"), ("onnxruntime", "fp32"),
                                                                   ("torch", "bf16")]
    assert available_variants()[0] == ("torch", "fp32")
    assert (("torch", "bf16") in available_variants()) == cpu_has_bf16()


def test_make_backend_says_what_runs_and_why(scratch_run, caplog, monkeypatch, capsys, real_data, tmp_path):
    from severstal.cli import main

    monkeypatch.setattr(backends, "cpu_flags", lambda: AVX2)
    with caplog.at_level(logging.INFO, logger="severstal.model.backends"):
        backend = make_backend(None, load_bundle(scratch_run, device="cpu"))
    expected = "torch fp32 (runs the model file; torch's default)"
    assert describe_backend(backend) == expected and f"prediction backend: {expected}" in caplog.text
    monkeypatch.setattr(backends, "cpu_flags", lambda: AMX)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(next((real_data / "train_images").glob("*.jpg")).read_bytes())
    assert main(["predict", "--weights", str(scratch_run), "--images", str(images), "--out", str(tmp_path / "s.csv"),
                 "--precision", "fp32"]) == 0
    assert "backend: torch fp32 (runs the model file; asked)" in capsys.readouterr().out


def test_torch_bf16_stays_close_to_fp32_on_real_images(low_floor_run, real_data):
    # Where bf16 is native the whole real sample; elsewhere it is emulated (~8x slower, same rounding): 12 images.
    # The 6-iteration model's many detections sit at its 0.005 thresholds, the hardest case for any rounding:
    # it scored 0.982-0.995 here, which is why bf16 is not a default; the demo's trained model keeps 1.0000
    # (severstal bench predict).
    images = real_images(real_data, None if cpu_has_bf16() else 12)
    reference = Predictor.from_weights(low_floor_run, device="cpu", precision="fp32")
    bf16 = Predictor.from_weights(low_floor_run, device="cpu", precision="bf16")
    assert (reference.backend.precision, bf16.backend.precision) == ("fp32", "bf16")
    expected, records = reference.predict(images), bf16.predict(images)
    assert sum(len(r["defects"]) for r in expected) >= len(images)  # detections to compare
    assert records_dice(records, expected) >= 0.97


@needs_openvino
def test_openvino_matches_pytorch_fp32_on_real_images(onnx_export, low_floor_run, real_data):
    images = real_images(real_data, 12)
    openvino = Predictor.from_weights(onnx_export, device="cpu", backend="openvino", precision="fp32")
    assert isinstance(openvino.backend, OpenVinoBackend) and openvino.backend.precision == "fp32"
    # The precision is set explicitly: OpenVINO would pick bf16 by itself on a CPU that has it.
    assert str(openvino.backend.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")
    expected = Predictor.from_weights(low_floor_run, device="cpu", precision="fp32").predict(images)
    records = openvino.predict(images)
    assert sum(len(r["defects"]) for r in expected) >= len(images)
    assert [len(r["defects"]) for r in records] == [len(r["defects"]) for r in expected]
    assert records_dice(records, expected) >= PARITY_DICE
    tensor = openvino.preprocess(images[0])
    reference = Predictor.from_weights(low_floor_run, precision="fp32")
    [full], [torch_raw] = openvino.backend.run([tensor]), reference.backend.run([tensor])
    assert torch.allclose(full.scores, torch_raw.scores, atol=1e-3)


@needs_openvino
def test_openvino_handles_images_without_detections_and_caps(trained_run, onnx_export, real_data, tmp_path):
    from severstal.model.export import export_onnx
    from severstal.model.run import copy_run

    image = real_images(real_data, 1)[0]
    run = copy_run(trained_run, tmp_path / "run", ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.999"])
    path = export_onnx(run, tmp_path / "plain")  # a score floor that no detection reaches
    predictor = Predictor.from_weights(path.parent, device="cpu", backend="openvino")
    [raw] = predictor.backend.run([predictor.preprocess(image)])
    assert raw.boxes.shape == (0, 4) and raw.mask_probs.shape[0] == 0
    assert predictor.predict([image])[0]["defects"] == []
    [capped] = OpenVinoBackend(onnx_export / "model.onnx", max_detections=5).run([predictor.preprocess(image)])
    assert len(capped.scores) == 5


def test_openvino_missing_says_how_to_install(monkeypatch, onnx_export):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else
                        real_find_spec(name, *a))
    with pytest.raises(BackendUnavailable, match=re.escape("OpenVINO is unavailable: the openvino package is not "
                                                           "installed (pip install 'severstal[openvino]')")):
        make_backend("openvino", load_bundle(onnx_export, device="cpu"))
    assert choose_backend("model.onnx").backend == "onnxruntime"


def test_importing_the_package_loads_no_optional_engine():
    import subprocess
    import sys

    code = ("import sys, severstal, severstal.model.backends, severstal.model.predict, severstal.cli; "
            "print(sorted(m for m in ('openvino', 'tensorrt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""int8: static quantization of the export, written only when its class masks match fp32's on held-back images."""

from __future__ import annotations

import onnx
import pytest

from severstal.data.images import read_image
from severstal.model.backends import METADATA_KEYS, choose_backend, make_backend
from severstal.model.config import load_bundle
from severstal.model.predict import Predictor, records_dice
from severstal.model.quantize import CALIBRATION_IMAGES, PARITY_IMAGES, ParityError, quantize_export


@pytest.fixture(scope="module")
def int8_export(onnx_export, real_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    path, report = quantize_export(onnx_export / "model.onnx", real_data / "train_images", out, calibration_images=4,
                                   parity_images=3, min_dice=0.0)
    return path, report


def test_int8_model_quantizes_the_backbone_convolutions_but_the_stem(int8_export, onnx_export):
    path, report = int8_export
    model = onnx.load(str(path))
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    int8_convs = {n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dequantized}
    fp32_convs = [n for n in onnx.load(str(onnx_export / "model.onnx")).graph.node if n.op_type == "Conv"]
    heads = [n.name for n in fp32_convs if not n.name.startswith("/backbone/")]
    stem = [n.name for n in fp32_convs if n.name.startswith("/backbone/bottom_up/stem/")]
    assert heads and len(stem) == 1
    assert int8_convs == {n.name for n in fp32_convs} - set(heads) - set(stem)
    assert report["quantized_convs"] == len(int8_convs)
    props = {p.key: p.value for p in model.metadata_props}
    assert props[METADATA_KEYS["precision"]] == "int8" and METADATA_KEYS["config"] in props
    assert (path.parent / "config.yaml").is_file()


def test_the_parity_figure_is_the_class_mask_dice_on_images_not_calibrated_on(int8_export, onnx_export, real_data):
    path, report = int8_export
    held_back = sorted((real_data / "train_images").iterdir())[4:7]
    images = [read_image(p) for p in held_back]
    fp32 = Predictor.from_weights(onnx_export, device="cpu").predict(images)
    int8 = Predictor.from_weights(path.parent, device="cpu").predict(images)
    assert report["parity_images"] == 3 and report["parity_dice"] == pytest.approx(records_dice(int8, fp32))


def test_an_int8_model_runs_as_int8_and_says_so(int8_export):
    path, _ = int8_export
    choice = choose_backend(path, "cpu")
    assert (choice.backend, choice.precision) == ("onnxruntime", "int8") and "fixed at export" in choice.reason
    backend = make_backend(None, load_bundle(path, device="cpu"))
    assert backend.precision == "int8"
    with pytest.raises(ValueError, match="int8 model"):
        choose_backend(path, "cpu", precision="fp32")


def test_a_model_that_fails_parity_is_refused_and_nothing_is_written(onnx_export, real_data, tmp_path):
    with pytest.raises(ParityError, match="under the 1.01 required"):
        quantize_export(onnx_export / "model.onnx", real_data / "train_images", tmp_path / "int8",
                        calibration_images=2, parity_images=2, min_dice=1.01)
    assert not (tmp_path / "int8" / "model-int8.onnx").exists()


def test_the_command_line_defaults_are_the_measured_ones():
    from severstal.cli import build_parser

    args = build_parser().parse_args(["export", "--weights", "w", "--format", "onnx", "--out", "o"])
    assert (args.calibration_images, args.parity_images) == (CALIBRATION_IMAGES, PARITY_IMAGES) == (16, 64)


def test_calibration_needs_images_left_for_parity(onnx_export, tmp_path):
    with pytest.raises(ValueError, match="at least one more"):
        quantize_export(onnx_export / "model.onnx", tmp_path, tmp_path / "int8")


@pytest.mark.parametrize(("present", "device", "chosen"), [
    (["model_final.pth", "model.onnx", "model-int8.onnx"], "cpu", "model-int8.onnx"),
    (["model_final.pth", "model.onnx"], "cpu", "model.onnx"),
    (["model_final.pth"], "cpu", "model_final.pth"),
    (["model_final.pth", "model.onnx", "model-int8.onnx"], "cuda:0", "model_final.pth"),
    (["model_final.pth", "model.engine"], "cuda", "model.engine"),
    (["model.engine"], "cpu", "model.engine"),
])
def test_a_folder_serves_its_fastest_model_for_the_device(tmp_path, present, device, chosen):
    from severstal.files import model_file_in

    for name in present:
        (tmp_path / name).touch()
    assert model_file_in(tmp_path, device).name == chosen

"""int8: static quantization of the exported ONNX graph, kept only where its answers match fp32.

ONNX Runtime's ``quantize_static`` rewrites the convolutions of the backbone and the FPN as QDQ int8 (weights
per output channel, activations calibrated by min/max on real images); the RPN and ROI heads, whose outputs the
thresholds read directly, stay fp32, and so does the ResNet's stem (``FP32_PREFIXES``). int8 convolutions run on
VNNI/AMX and, slower, on AVX2 (u8s8 kernels).

Parity is checked before anything is written: the int8 and the fp32 graph predict the same held-back images
(never used for calibration) through the same :class:`severstal.model.predict.Predictor`, and the mean Dice of
their class masks over every (image, class) pair must reach ``min_dice``; otherwise :class:`ParityError` says by
how much it failed and no int8 model is written. The int8 file has the export's contract and metadata, plus
``severstal.precision`` = ``int8`` (``severstal.model.backends.METADATA_KEYS``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from severstal.data.annotations import list_images
from severstal.data.images import read_image
from severstal.files import INT8_ONNX_FILE, atomic_path

log = logging.getLogger(__name__)

QUANTIZED_PREFIXES = ("/backbone/",)
"""Node-name prefixes of the convolutions that are quantized (the ResNet and the FPN), less ``FP32_PREFIXES``."""
FP32_PREFIXES = ("/backbone/bottom_up/stem/",)
"""Backbone convolutions kept fp32: the stem's 7x7 convolution, 1 of the backbone's and FPN's convolutions and
about 5% of their multiply-adds. Its int8 weights and output moved the class masks of real steel more than any
other: with it fp32, a model trained on real images kept its answers on real images, which no calibration option
(more images, percentile, entropy, symmetric or averaged ranges) achieved (docs/cpu-speed.md has the measurements)."""
MIN_PARITY_DICE = 0.99
CALIBRATION_IMAGES = 16
PARITY_IMAGES = 64
"""A pair (image, class) whose mask appears or vanishes costs 1 / (4 x images) of the mean Dice, so 8 images (a
flip costing 0.031) could not tell a model that keeps its answers from one that does not."""


class ParityError(ValueError):
    """The int8 model's answers differ too much from fp32's; nothing was written."""


def _split_images(folder: str | Path, calibration: int, parity: int) -> tuple[list[Path], list[Path]]:
    names = list_images(folder)
    if len(names) < calibration + 1:
        raise ValueError(f"{folder} has {len(names)} images: int8 needs {calibration} for calibration and at least "
                         "one more, never calibrated on, for the parity check")
    paths = [Path(folder) / n for n in names]
    return paths[:calibration], paths[calibration : calibration + parity]


def quantize_export(fp32_onnx: str | Path, calibration_dir: str | Path, out_dir: str | Path,
                    calibration_images: int = CALIBRATION_IMAGES, parity_images: int = PARITY_IMAGES,
                    min_dice: float = MIN_PARITY_DICE) -> tuple[Path, dict]:
    """Quantize an exported ``model.onnx`` to ``out_dir/model-int8.onnx`` (with its config) if it keeps the answers.

    Args:
        fp32_onnx: the fp32 export (``severstal.model.export.export_onnx``), ``config.yaml`` beside it.
        calibration_dir: folder of real images: the first ``calibration_images`` (by name) calibrate, the next
            up to ``parity_images`` check parity.
        out_dir: folder for ``model-int8.onnx`` and the export's other files (the fp32 export's own folder: then
            both models sit side by side and the folder serves int8 on a CPU, ``severstal.files.FASTEST_FIRST``).
        min_dice: the least mean class-mask Dice against fp32 that is accepted.

    Returns:
        The int8 model's path and ``{"parity_dice", "parity_images", "calibration_images", "quantized_convs"}``.

    Raises:
        ParityError: parity below ``min_dice`` (the int8 model is not written).
    """
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from severstal.model.backends import METADATA_KEYS, OnnxRuntimeBackend
    from severstal.model.config import load_bundle
    from severstal.model.export import copy_run_files
    from severstal.model.predict import Predictor, records_dice

    fp32_onnx = Path(fp32_onnx)
    bundle = load_bundle(fp32_onnx, device="cpu")
    calibrate, check = _split_images(calibration_dir, calibration_images, parity_images)
    predictor = Predictor(bundle.cfg, backend=OnnxRuntimeBackend(fp32_onnx))

    class Images(CalibrationDataReader):
        def __init__(self):
            self.paths = iter(calibrate)

        def get_next(self):
            path = next(self.paths, None)
            return None if path is None else {"image": predictor.preprocess(read_image(path)).numpy()}

    onnxruntime.set_default_logger_severity(3)  # calibration sessions warn about every unused initializer
    model = onnx.load(str(fp32_onnx))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv" and n.name.startswith(QUANTIZED_PREFIXES)
             and not n.name.startswith(FP32_PREFIXES)]
    with tempfile.TemporaryDirectory() as tmp:
        int8_path = Path(tmp) / INT8_ONNX_FILE
        quantize_static(str(fp32_onnx), str(int8_path), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=convs,
                        op_types_to_quantize=["Conv"])
        int8 = onnx.load(str(int8_path))
        props = {p.key: p.value for p in model.metadata_props} | {METADATA_KEYS["precision"]: "int8"}
        onnx.helper.set_model_props(int8, props)
        onnx.save(int8, str(int8_path))
        images = [read_image(p) for p in check]
        reference = predictor.predict(images)
        quantized = Predictor(bundle.cfg, backend=OnnxRuntimeBackend(int8_path)).predict(images)
        parity = records_dice(quantized, reference)
        report = {"parity_dice": parity, "parity_images": len(images), "calibration_images": len(calibrate),
                  "quantized_convs": len(convs)}
        if not parity >= min_dice:
            raise ParityError(f"int8 parity failed: class-mask Dice {parity:.4f} against fp32 on {len(images)} images "
                              f"not used for calibration, {min_dice - parity:.4f} under the {min_dice} required; "
                              "no int8 model written (the fp32 export serves as it is)")
        out = Path(out_dir) / INT8_ONNX_FILE
        with atomic_path(out) as target:
            shutil.copyfile(int8_path, target)
    copy_run_files(bundle, Path(out_dir), INT8_ONNX_FILE)
    log.info("int8: %d convolutions quantized, class-mask Dice %.4f against fp32 on %d held-back images: %s",
             len(convs), parity, len(images), out)
    return out, report

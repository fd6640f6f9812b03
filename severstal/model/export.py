"""Export: a trained Mask R-CNN -> ONNX (simplified, checked) -> TensorRT engine.

The ONNX graph is Detectron2's model traced through ``TracingAdapter`` around
``model.inference(..., do_postprocess=False)`` and exported with the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``; the dynamo exporter fails on Detectron2). Its contract:

* input ``image``: one image, ``(3, H, W) float32``, BGR, unnormalised 0..255, already resized by
  ``Predictor.preprocess``; H and W are dynamic (any size, padding to the FPN stride is in the graph).
  **One image per call**: Detectron2 batches by padding a list of images and splits per-image results
  in Python, which a trace turns into a fixed batch size; the ONNX Runtime and TensorRT backends loop.
* outputs, in the coordinates of that input (exactly ``severstal.model.predict.RawOutput``):
  ``boxes (N, 4) float32`` XYXY, ``scores (N,) float32``, ``classes (N,) int64`` (0-based),
  ``mask_probs (N, 28, 28) float32`` (sigmoid probabilities inside each box; pasting is the caller's).
* constants frozen at export: the score floor (``MODEL.ROI_HEADS.SCORE_THRESH_TEST``, raised by default to
  the run's lowest tuned threshold: :func:`export_score_floor`), the NMS IoU and ``TEST.DETECTIONS_PER_IMAGE``;
  rows come sorted by decreasing score, so a smaller cap is a slice. Tuning thresholds under the frozen floor
  needs a new export (``severstal export --score-floor``).

The trace runs on a fixed noise frame of Severstal's size; what it records does not depend on how many
detections that frame gives (the tests compare with PyTorch on real images, at other sizes, and with none).
GroupNorm in the ROI heads is traced in a form with explicit sizes (:func:`_zero_safe_group_norm`): the
exporter's own form fails in ONNX Runtime on an image without detections.

Opset 17 by default; at least 16 is required (ONNX ``RoiAlign`` gains half-pixel alignment in 16; opset
11 loses detections). The config (``config.yaml``, thresholds applied) and, when the run has them,
``thresholds.json`` and ``split.json`` are written beside ``model.onnx`` so that
``severstal.model.config.load_bundle`` works on the export's folder, and the config, thresholds and class
names are also kept in the model's ``metadata_props`` (:data:`METADATA_KEYS`) so the file alone says
what it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

from severstal.data.datasets import THING_CLASSES
from severstal.data.rle import SHAPE
from severstal.files import CONFIG_FILE, ENGINE_FILE, ONNX_FILE, atomic_path
from severstal.model.backends import (
    CLASS_PROBS_NAME,
    INPUT_NAME,
    METADATA_KEYS,
    OUTPUT_NAMES,
    PRESENCE_NAME,
    TorchBackend,
    _onnx_metadata,
    require_tensorrt,
)
from severstal.model.config import load_bundle
from severstal.model.predict import Predictor
from severstal.model.presence import has_presence, has_semantic
from severstal.model.run import Thresholds, files_with_model

log = logging.getLogger(__name__)

MIN_OPSET = 16


def _trace_sample(cfg):
    """A deterministic Severstal-sized frame (256 x 1600), preprocessed as prediction does."""
    import numpy as np


    rng = np.random.default_rng(0)
    frame = rng.integers(40, 140, size=(*SHAPE, 3), dtype=np.uint8)
    return Predictor(cfg, backend=_NoBackend()).preprocess(frame)


class _NoBackend:
    """Stands in for a backend where only ``Predictor.preprocess`` is used."""

    def run(self, images):
        raise RuntimeError("no backend: this predictor only preprocesses")


@contextlib.contextmanager
def _zero_safe_group_norm(module) -> Iterator[None]:
    """Trace the GroupNorms under ``module`` with explicit reshape sizes, restoring them afterwards.

    The exporter writes GroupNorm as ``Reshape(x, [0, G, -1])``, which ONNX Runtime refuses for an empty
    batch (a -1 among zero elements), so a mask head with GroupNorm failed on images without detections.
    """
    import torch

    class ZeroSafeGroupNorm(torch.nn.Module):
        def __init__(self, norm: torch.nn.GroupNorm):
            super().__init__()
            self.norm = norm

        def forward(self, x):
            groups = self.norm.num_groups
            grouped = x.unflatten(1, (groups, x.shape[1] // groups))
            centred = grouped - grouped.mean(dim=(2, 3, 4), keepdim=True)
            variance = centred.pow(2).mean(dim=(2, 3, 4), keepdim=True)
            normed = (centred * torch.rsqrt(variance + self.norm.eps)).reshape(x.shape)
            return normed * self.norm.weight[:, None, None] + self.norm.bias[:, None, None]

    swapped = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if isinstance(child, torch.nn.GroupNorm)]
    for parent, name, child in swapped:
        setattr(parent, name, ZeroSafeGroupNorm(child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def _trace_to_onnx(model, sample, opset: int) -> bytes:
    """Trace ``model.inference(do_postprocess=False)`` on ``sample`` and return the ONNX bytes."""
    import io

    import torch
    from detectron2.export import TracingAdapter

    gated, semantic = has_presence(model), has_semantic(model)
    output_names = list(OUTPUT_NAMES) + [PRESENCE_NAME] * gated + [CLASS_PROBS_NAME] * semantic

    def raw_outputs(model, image):
        # The stages of model.inference(do_postprocess=False), keeping the features for the image-level heads.
        batch = model.preprocess_image([{"image": image}])
        features = model.backbone(batch.tensor)
        proposals, _ = model.proposal_generator(batch, features, None)
        instances = model.roi_heads(batch, features, proposals, None)[0][0]
        out = (instances.pred_boxes.tensor, instances.scores, instances.pred_classes, instances.pred_masks[:, 0])
        out += (model.presence_probs(batch.tensor, features)[0],) if gated else ()
        return out + ((model.class_probs(features)[0],) if semantic else ())

    adapter = TracingAdapter(model, sample, raw_outputs)
    dynamic = {INPUT_NAME: {1: "height", 2: "width"}} | {name: {0: "detections"} for name in OUTPUT_NAMES}
    dynamic |= {CLASS_PROBS_NAME: {1: "map_height", 2: "map_width"}} if semantic else {}
    buffer = io.BytesIO()
    # The tracer warns at every Python branch on a tensor (dozens of lines); the branches that matter are
    # covered by the parity tests, so the warnings are logged at DEBUG level instead of printed.
    with warnings.catch_warnings(record=True) as caught, _zero_safe_group_norm(model.roi_heads):
        warnings.simplefilter("always")
        try:
            torch.onnx.export(adapter, (sample,), buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=output_names, dynamic_axes=dynamic,
                              do_constant_folding=True)
        finally:
            model.eval()  # the exporter leaves the model in training mode
    for warning in caught:
        log.debug("export: %s", warning.message)
    log.info("traced at %s with %d tracer warnings (logged at DEBUG)", tuple(sample.shape), len(caught))
    return buffer.getvalue()


def _simplify(model):
    """onnx-simplifier on ``model``; the unsimplified model, with a warning, when it fails."""
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as err:  # onnxsim raises many types (RuntimeError, onnx and ORT errors)
        log.warning("onnx-simplifier failed (%s: %s); keeping the unsimplified graph", type(err).__name__, err)
        return model
    if not ok:
        log.warning("onnx-simplifier could not validate the simplified graph; keeping the unsimplified graph")
        return model
    log.info("onnx-simplifier: %d -> %d nodes", len(model.graph.node), len(simplified.graph.node))
    return simplified


def copy_run_files(bundle, out_dir: Path, model_name: str) -> None:
    """Write the files that go with the model (``severstal.model.run.WITH_MODEL``) into ``out_dir``, unless it
    is the run's own folder: the config with the thresholds applied and the exported file as its weights, and
    copies of the others the run has."""
    if out_dir.resolve() == bundle.folder.resolve():
        return
    cfg = bundle.cfg.clone()
    cfg.MODEL.WEIGHTS = model_name
    for path in files_with_model(bundle.folder):
        with atomic_path(out_dir / path.name) as tmp:
            if path.name == CONFIG_FILE:
                tmp.write_text(cfg.dump())
            else:
                shutil.copyfile(path, tmp)


def export_score_floor(bundle) -> float:
    """The score floor an export freezes by default: the run's lowest tuned class threshold when it has
    ``thresholds.json`` (nothing under it reaches an answer, and the mask head then runs only on what does),
    else the config's ``MODEL.ROI_HEADS.SCORE_THRESH_TEST``. Never below the config's floor."""
    floor = float(bundle.cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST)
    if Thresholds.read(bundle.folder) is not None:
        floor = max(floor, min(float(t) for t in bundle.cfg.SEVERSTAL.SCORE_THRESHOLDS))
    return floor


def export_onnx(weights_or_folder: str | Path, out_dir: str | Path, opset: int = 17, simplify: bool = True,
                score_floor: float | None = None) -> Path:
    """Export a training run's Mask R-CNN to ``out_dir/model.onnx`` (see the module docstring for the graph).

    Args:
        weights_or_folder: a ``.pth`` weights file or its run folder (``config.yaml`` beside it).
        out_dir: folder for ``model.onnx``, ``config.yaml`` and the run's ``thresholds.json`` / ``split.json``.
        opset: ONNX opset, at least 16.
        simplify: run onnx-simplifier (on failure the unsimplified graph is kept, with a warning).
        score_floor: the graph's frozen score floor; default :func:`export_score_floor`'s.

    Returns:
        The path of ``model.onnx``, written atomically and passed by ``onnx.checker.check_model``.

    Raises:
        ValueError: ``opset`` below 16, or weights that are not PyTorch weights.
    """
    import onnx


    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: use {MIN_OPSET} or newer (RoiAlign needs half-pixel alignment)")
    bundle = load_bundle(weights_or_folder, device="cpu")
    if bundle.weights.suffix not in (".pth", ".pkl"):
        raise ValueError(f"export needs PyTorch weights (.pth), got {bundle.weights}")
    cfg = bundle.cfg
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = export_score_floor(bundle) if score_floor is None else float(score_floor)
    model = TorchBackend(cfg).model
    model_proto = onnx.load_from_string(_trace_to_onnx(model, _trace_sample(cfg), opset))
    if simplify:
        model_proto = _simplify(model_proto)
    metadata = {
        METADATA_KEYS["config"]: cfg.dump(),
        METADATA_KEYS["thresholds"]: json.dumps(Thresholds.from_cfg(cfg).to_dict()),
        METADATA_KEYS["class_names"]: json.dumps(list(THING_CLASSES)),
        METADATA_KEYS["detections_per_image"]: str(cfg.TEST.DETECTIONS_PER_IMAGE),
        METADATA_KEYS["source"]: bundle.weights.name,
    }
    onnx.helper.set_model_props(model_proto, metadata)
    model_proto.doc_string = "Severstal Mask R-CNN: one 3xHxW float32 BGR image -> boxes, scores, classes, mask_probs"
    onnx.checker.check_model(model_proto)
    out_dir = Path(out_dir)
    path = out_dir / ONNX_FILE
    with atomic_path(path) as tmp:
        onnx.save(model_proto, str(tmp))
    copy_run_files(bundle, out_dir, ONNX_FILE)
    log.info("exported %s (opset %d, %.1f MB)", path, opset, path.stat().st_size / 1e6)
    return path


def read_metadata(onnx_path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (see :data:`METADATA_KEYS`)."""
    return _onnx_metadata(onnx_path)


def export_tensorrt(onnx_path: str | Path, out_dir: str | Path, fp16: bool = False,
                    workspace_gib: float = 4.0) -> Path:
    """Build a serialized TensorRT engine (``out_dir/model.engine``) from an exported ONNX model.

    The engine takes the same dynamic input as the ONNX graph; its optimisation profile spans
    32 x 32 up to ``MAX_SIZE_TEST`` square, tuned for a Severstal frame after the config's resize.

    Args:
        onnx_path: ``model.onnx`` of :func:`export_onnx` (its ``config.yaml`` beside it).
        out_dir: folder for the engine; the config and thresholds are copied beside it.
        fp16: allow half-precision kernels.
        workspace_gib: builder workspace limit.

    Returns:
        The path of the engine, written atomically.

    Raises:
        severstal.model.backends.BackendUnavailable: ``tensorrt`` is not installed or there is no CUDA GPU.
        RuntimeError: TensorRT cannot parse the ONNX model or build the engine (its messages included).
    """

    trt = require_tensorrt()
    bundle = load_bundle(onnx_path, device="cuda")
    if bundle.weights.suffix != ".onnx":
        raise ValueError(f"a TensorRT engine is built from an exported .onnx model, got {bundle.weights}")
    cfg = bundle.cfg
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle.weights)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT {trt.__version__} cannot parse {bundle.weights}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        if not builder.platform_has_fast_fp16:
            log.warning("this GPU has no fast fp16: the engine will gain little from --fp16")
        config.set_flag(trt.BuilderFlag.FP16)
    opt = tuple(_trace_sample(cfg).shape)
    largest = int(cfg.INPUT.MAX_SIZE_TEST)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (3, 32, 32), opt, (3, largest, largest))
    config.add_optimization_profile(profile)
    log.info("building a TensorRT %s engine (%s) for inputs up to 3x%dx%d", trt.__version__,
             "fp16" if fp16 else "fp32", largest, largest)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT {trt.__version__} could not build an engine from {bundle.weights} "
                           "(see its log above)")
    out_dir = Path(out_dir)
    path = out_dir / ENGINE_FILE
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(serialized))
    copy_run_files(bundle, out_dir, ENGINE_FILE)
    log.info("built %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path

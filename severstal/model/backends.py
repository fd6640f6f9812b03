"""Backends: what runs the Mask R-CNN network; everything around it is shared (:mod:`severstal.model.predict`).

Every backend implements :class:`Backend`: ``run(list of (3, H, W) float32 BGR tensors) -> list[RawOutput]``
in the coordinates of the network input, so resizing, mask pasting, thresholds and RLE are one implementation
for all of them. This module depends on nothing above it: prediction and export use it, never the reverse;
it also owns the exported graph's contract (:data:`INPUT_NAME`, :data:`OUTPUT_NAMES`, :data:`METADATA_KEYS`).

=========== ============================== ==================================
name        class                          model file
=========== ============================== ==================================
torch       :class:`TorchBackend`          ``.pth`` (training run)
onnxruntime :class:`OnnxRuntimeBackend`    ``.onnx`` (``severstal export``)
openvino    :class:`OpenVinoBackend`       ``.onnx`` (the same export; ``pip install 'severstal[openvino]'``)
tensorrt    :class:`TensorRTBackend`       ``.engine`` / ``.plan``
=========== ============================== ==================================

**Which backend and precision run by default** (:func:`choose_backend`, used by :func:`make_backend`, so
``severstal predict``, the TorchServe handler and ``Predictor.from_weights`` all follow it and log it):

* the backend runs the model file: a ``.pth`` only runs on PyTorch (export it for the others), an engine
  only on TensorRT; an ``.onnx`` runs on ONNX Runtime (:data:`ONNX_DEFAULT`, the fastest that
  ``severstal bench predict`` found on the CPUs it ran on; OpenVINO runs it when asked);
* the precision is fp32, or fp16 autocast on a GPU when ``fp16`` is asked. PyTorch's bf16 backbone
  (:func:`bf16_backbone`) runs when asked, on a CPU with bf16 instructions (AVX512-BF16 or AMX, read from
  the CPU's flags, :func:`cpu_has_bf16`; elsewhere it is emulated and slower). It is not the default: its
  gain end to end is small (the backbone is about half the time), and although it keeps a trained model's
  answers it moves those of a barely trained model, whose many detections sit at their thresholds
  (``tests/test_precision.py``). The figures, with their commands: docs/cpu-speed.md.
* ``$SEVERSTAL_PRECISION`` asks a precision wherever none is passed (the handler), as ``--precision`` does.

The exported graph takes one image per call (see :mod:`severstal.model.export`); the ONNX Runtime and TensorRT
backends loop over a batch. Its score floor, NMS IoU and detection cap are frozen at export: a lower
``TEST.DETECTIONS_PER_IMAGE`` is applied by slicing the score-sorted rows, a higher one cannot be.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import yaml

from severstal.files import PRECISION_ENV, backends_for, check_backend, check_precision
from severstal.model.presence import has_presence, has_semantic

log = logging.getLogger(__name__)

INPUT_NAME = "image"
"""The exported graph's one input: a ``(3, H, W) float32`` BGR image, already resized."""
OUTPUT_NAMES = ("boxes", "scores", "classes", "mask_probs")
"""The graph's outputs, in order: the fields of :class:`RawOutput`."""
PRESENCE_NAME = "presence"
"""An output of the graph when the model has the presence head: ``(num_classes,) float32`` probabilities."""
CLASS_PROBS_NAME = "class_probs"
"""An output of the graph when the model has the per-pixel head: ``(num_classes, H/4, W/4) float32``."""
IMAGE_OUTPUTS = (PRESENCE_NAME, CLASS_PROBS_NAME)
"""The graph's optional outputs, after :data:`OUTPUT_NAMES` in this order: one per image, not per detection."""
METADATA_KEYS = {
    "config": "severstal.config",
    "thresholds": "severstal.thresholds",
    "class_names": "severstal.class_names",
    "detections_per_image": "severstal.detections_per_image",
    "source": "severstal.source_weights",
    "precision": "severstal.precision",
}
"""``metadata_props`` of an exported model: the config YAML, the thresholds JSON (``{"score_thresholds",
"min_areas", "presence_thresholds", "pixel_thresholds"}``), the class names JSON (Detectron2's ``thing_classes``,
indexed by the 0-based class), the frozen detection cap, the name of the weights file and, for an int8 model, its
precision (absent: fp32)."""

@dataclass
class RawOutput:
    """What a backend returns for one image, in the coordinates of the resized network input.

    Attributes:
        boxes: (N, 4) float32, XYXY.
        scores: (N,) float32.
        classes: (N,) int64, Detectron2's 0-based category ids.
        mask_probs: (N, M, M) float32 mask probabilities inside each box (M = 28 for Mask R-CNN).
        presence: (num_classes,) float32 image-level probability of each class, for a model with the presence
            head (``severstal.model.presence``); None otherwise.
        class_probs: (num_classes, h, w) float32 probability of each class at each pixel, at the stride of the
            per-pixel head (``SEVERSTAL.SEMANTIC_HEAD``) over the padded input; None for a model without it.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    mask_probs: torch.Tensor
    presence: torch.Tensor | None = None
    class_probs: torch.Tensor | None = None


class Backend(Protocol):
    """Runs the network on a batch of preprocessed images (3 x H x W float32, BGR, unnormalised).

    ``run`` returns the detections above the model's score floor that score at least ``min_score``. The
    caller passes its lowest class threshold (the others would be dropped anyway) so that a backend can skip
    work on them: PyTorch computes masks only for them (:meth:`TorchBackend.detect_boxes`); an exported
    graph's floor is frozen at export (``severstal export --score-floor``), so its rows are only filtered.
    """

    def run(self, images: list[torch.Tensor], min_score: float = 0.0) -> list[RawOutput]: ...


class TorchBackend:
    """The Detectron2 model itself, in eval mode, without its own post-processing.

    bf16 runs the backbone (ResNet + FPN: most of the arithmetic) in bfloat16 and the RPN and ROI heads in
    fp32: with the heads in bf16 too, the thresholded 28x28 mask logits moved enough to lose answers
    (Dice 0.970 against fp32 on 12 real images with a briefly trained model, 0.995 with the backbone alone).

    Args:
        cfg: a Severstal config; ``MODEL.WEIGHTS`` is loaded and ``MODEL.DEVICE`` chosen.
        fp16: half precision on a GPU (autocast); ignored on a CPU. Same as ``precision="fp16"`` on a GPU.
        precision: "fp32", "bf16" (backbone autocast to bfloat16: fast on CPUs with AVX512-BF16 or AMX,
            emulated, much slower, elsewhere) or "fp16" (GPU autocast of the whole model); None: from ``fp16``.
    """

    def __init__(self, cfg, fp16: bool = False, precision: str | None = None):
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.modeling import build_model

        self.device = torch.device(cfg.MODEL.DEVICE)
        if precision is None:
            precision = "fp16" if fp16 and self.device.type == "cuda" else "fp32"
        check_precision(precision, "torch")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError(f"torch fp16 runs on a CUDA GPU only (device {self.device}); on a CPU use bf16 or fp32")
        self.model = build_model(cfg).eval()
        DetectionCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.precision = precision
        self.fp16 = precision == "fp16"
        if precision == "bf16":
            bf16_backbone(self.model.backbone)

    def autocast(self):
        """The context the model runs in: inference mode, and fp16 autocast for the whole model on a GPU."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16))
        return stack

    def features(self, batch) -> dict[str, torch.Tensor]:
        """The backbone's feature maps of a padded ``ImageList`` (fp32; computed as :func:`bf16_backbone` says for
        precision "bf16")."""
        return self.model.backbone(batch.tensor)

    def detect_boxes(self, features: dict[str, torch.Tensor], proposals, min_score: float = 0.0):
        """The ROI box head and per-class NMS (Detectron2's ``_forward_box``), keeping detections that score at
        least ``min_score`` as well as above the config's floor (``MODEL.ROI_HEADS.SCORE_THRESH_TEST``).

        The same detections as the config's floor, less those under ``min_score``: NMS only lets a box suppress
        lower-scoring ones, and the cap keeps the highest scores. The mask head, which runs per detection,
        then has less to do (with a floor of 0.05 most of its detections are ones no class threshold keeps).
        """
        heads = self.model.roi_heads
        box_predictor = heads.box_predictor
        # fast_rcnn_inference keeps scores strictly above its floor: the largest float32 under min_score.
        floor = float(np.nextafter(np.float32(min_score), np.float32(-np.inf)))
        if floor <= box_predictor.test_score_thresh:
            return heads._forward_box(features, proposals)
        from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference

        pooled = heads.box_pooler([features[name] for name in heads.box_in_features],
                                  [p.proposal_boxes for p in proposals])
        predictions = box_predictor(heads.box_head(pooled))
        instances, _ = fast_rcnn_inference(box_predictor.predict_boxes(predictions, proposals),
                                           box_predictor.predict_probs(predictions, proposals),
                                           [p.image_size for p in proposals], floor, box_predictor.test_nms_thresh,
                                           box_predictor.test_topk_per_image)
        return instances

    def run(self, images: list[torch.Tensor], min_score: float = 0.0) -> list[RawOutput]:
        # The stages of GeneralizedRCNN.inference(do_postprocess=False), with the backbone at this precision.
        model = self.model
        with self.autocast():
            batch = model.preprocess_image([{"image": image.to(self.device)} for image in images])
            features = self.features(batch)
            proposals, _ = model.proposal_generator(batch, features, None)
            instances = self.detect_boxes(features, proposals, min_score)
            results = model.roi_heads.forward_with_given_boxes(features, instances)
            presence = (model.presence_probs(batch.tensor, features).float().cpu() if has_presence(model)
                        else [None] * len(images))
            class_probs = (model.class_probs(features).float().cpu() if has_semantic(model)
                           else [None] * len(images))
        return [raw_output(r, p, c) for r, p, c in zip(results, presence, class_probs)]


def bf16_backbone(backbone: torch.nn.Module) -> None:
    """Make a Detectron2 backbone (ResNet + FPN) compute in bfloat16 on the CPU and hand on fp32 features.

    Its convolutions run under bf16 autocast; its GroupNorm layers run in fp32, so the normalisation and the
    residual additions after them stay fp32 (CPU autocast would leave both in bf16). The RPN and ROI heads
    then get fp32 features: with the heads in bf16 too the thresholded mask logits moved enough to lose answers.
    Prediction (precision "bf16") and training (``SOLVER.AMP.ENABLED`` on a CPU) both use it; the module's
    weights and state dict are unchanged.
    """
    for norm in backbone.modules():
        if isinstance(norm, torch.nn.GroupNorm):
            norm.forward = functools.partial(_forward_in_fp32, norm.forward)
    forward = backbone.forward

    def bf16_forward(images):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = forward(images)
        return {name: value.float() for name, value in features.items()}

    backbone.forward = bf16_forward


def _forward_in_fp32(forward, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", enabled=False):
        return forward(x.float())


def raw_output(instances, presence: torch.Tensor | None = None,
               class_probs: torch.Tensor | None = None) -> RawOutput:
    """Detectron2 ``Instances`` of ``model.inference(..., do_postprocess=False)`` (and the image's presence and
    pixel probabilities, if any) -> :class:`RawOutput` (CPU, fp32)."""
    return RawOutput(boxes=instances.pred_boxes.tensor.float().cpu(), scores=instances.scores.float().cpu(),
                     classes=instances.pred_classes.cpu(), mask_probs=instances.pred_masks[:, 0].float().cpu(),
                     presence=presence, class_probs=class_probs)


def exported_output(out: dict[str, torch.Tensor], max_detections: int | None, min_score: float) -> RawOutput:
    """An exported graph's outputs for one image (rows sorted by decreasing score) -> :class:`RawOutput`: the
    first ``max_detections`` rows, of those the ones scoring at least ``min_score``."""
    presence, class_probs = (out.pop(name, None) for name in IMAGE_OUTPUTS)
    out = {name: value[:max_detections] for name, value in out.items()}
    keep = out["scores"] >= min_score
    return RawOutput(boxes=out["boxes"][keep].float(), scores=out["scores"][keep].float(),
                     classes=out["classes"][keep].long(), mask_probs=out["mask_probs"][keep].float(),
                     presence=None if presence is None else presence.reshape(-1).float(),
                     class_probs=None if class_probs is None else class_probs.float())


class BackendUnavailable(RuntimeError):
    """A backend's software or hardware is missing here; the message says what and how to get it."""


BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags (``/proc/cpuinfo``) of native bfloat16 arithmetic: AVX512-BF16 (Cooper Lake, Zen 4 and later)
or AMX (Sapphire Rapids and later)."""
ONNX_DEFAULT = "onnxruntime"
"""The backend an ``.onnx`` model runs on by default: the faster of the two against PyTorch fp32 end to end in
``severstal bench predict`` on every CPU it was run on (docs/cpu-speed.md); OpenVINO runs when asked
(``--backend openvino``)."""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in ``/proc/cpuinfo`` (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


ISA_CAPS_WITHOUT_BF16 = {
    "ATEN_CPU_CAPABILITY": ("default", "avx2"),
    "ONEDNN_MAX_CPU_ISA": ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"),
}
"""Settings that make PyTorch run kernels below bfloat16 (as on an AVX2-only CPU) on a CPU that has it."""


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether PyTorch computes bfloat16 natively here: the CPU has one of :data:`BF16_FLAGS` and no setting of
    :data:`ISA_CAPS_WITHOUT_BF16` holds its kernels below them (then bf16 would be emulated). ``flags`` stands for
    another CPU's flags, without the settings of this process."""
    if flags is None:
        capped = any(os.environ.get(name, "").strip().upper() in (v.upper() for v in values)
                     for name, values in ISA_CAPS_WITHOUT_BF16.items())
        return not capped and bool(set(BF16_FLAGS) & cpu_flags())
    return bool(set(BF16_FLAGS) & flags)


@dataclass(frozen=True)
class BackendChoice:
    """What runs a model file: ``backend`` and ``precision`` names, and ``reason``, a phrase saying why."""

    backend: str
    precision: str
    reason: str

    def __str__(self) -> str:
        return f"{self.backend} {self.precision} ({self.reason})"


def choose_backend(model_file: str | Path, device: str = "cpu", backend: str | None = None,
                   precision: str | None = None, fp16: bool = False,
                   flags: frozenset[str] | None = None) -> BackendChoice:
    """The backend and precision that run ``model_file`` (see the module docstring for the rules).

    Args:
        model_file: ``.pth``/``.pkl``, ``.onnx`` or ``.engine``/``.plan``.
        device: "cpu" or "cuda[:N]".
        backend: one of ``BACKENDS`` that can run the file; None: the default for the file.
        precision: one of the backend's ``BACKEND_PRECISIONS``; None: ``$SEVERSTAL_PRECISION`` when set,
            else fp32 (fp16 on a GPU when ``fp16``).
        fp16: the handler's ``fp16`` setting: on a GPU, half precision for torch (TensorRT: the engine's).
        flags: CPU flags that tell whether bf16 is native (default: this CPU's, :func:`cpu_flags`).

    Raises:
        ValueError: an unknown backend or precision (the message lists the valid ones), or a backend that
            cannot run the file.
    """
    runs = backends_for(model_file)
    cpu = not str(device).startswith("cuda")
    if backend is None:
        backend, reason = runs[0], "runs the model file"
        if ONNX_DEFAULT in runs and (ONNX_DEFAULT != "openvino" or openvino_missing() is None):
            backend, reason = ONNX_DEFAULT, "the fastest measured for .onnx"
    else:
        check_backend(backend)
        if backend not in runs:
            name = Path(model_file).name
            raise ValueError(f"backend {backend!r} cannot run {name}: that file is for {' or '.join(map(repr, runs))} "
                             f"(export it first: severstal export --weights {model_file} --format onnx|tensorrt)")
        reason = "asked"
    if precision is None and os.environ.get(PRECISION_ENV):
        precision, why = os.environ[PRECISION_ENV], f"${PRECISION_ENV}"
    elif precision is not None:
        why = "asked"
    elif backend in ("torch", "tensorrt") and not cpu:
        precision, why = ("fp16", "fp16 asked") if fp16 else ("fp32", "GPU default")
    else:
        precision, why = "fp32", f"{backend}'s default"
    fixed = onnx_precision(model_file) if backend in ("onnxruntime", "openvino") else None
    if fixed is not None and precision != fixed and why != "asked":
        precision, why = fixed, "fixed at export"
    check_precision(precision, backend)
    if fixed is not None and precision != fixed:
        raise ValueError(f"{Path(model_file).name} is an {fixed} model: its precision was fixed at export "
                         f"(export again for {precision})")
    if precision == "bf16" and not cpu_has_bf16(flags):
        why += "; emulated: this CPU has no bf16 instructions, expect it several times slower than fp32"
    return BackendChoice(backend, precision, f"{reason}; {why}")


def onnx_precision(model_file: str | Path) -> str:
    """The precision an exported ``.onnx`` file was written in: ``int8`` (``severstal export --int8``) or fp32."""
    path = Path(model_file)
    return _onnx_metadata(path).get(METADATA_KEYS["precision"], "fp32") if path.is_file() else "fp32"


def make_backend(name: str | None, cfg, fp16: bool = False, providers: list | None = None,
                 threads: int | None = None, precision: str | None = None) -> Backend:
    """Build the backend ``name`` for the model file ``cfg.MODEL.WEIGHTS`` (as ``load_bundle`` sets it).

    The backend and precision are :func:`choose_backend`'s; the choice is logged and kept on the backend as
    ``backend.choice`` (a :class:`BackendChoice`; ``backend.precision`` is the precision it runs).

    Args:
        name: one of :data:`BACKENDS` that runs the model file; None: :func:`choose_backend`'s default.
        cfg: a Severstal config, or a ``ModelBundle`` (its ``cfg`` is used); ``MODEL.DEVICE`` picks the device
            and ``TEST.DETECTIONS_PER_IMAGE`` caps the exported backends' detections.
        fp16: half precision on a GPU (torch: autocast; a TensorRT engine's precision is chosen when it is
            built); ignored on a CPU.
        providers: ONNX Runtime execution providers (default: CUDA when the config's device is a GPU and
            ONNX Runtime has it, else CPU).
        threads: ONNX Runtime's and OpenVINO's threads (default: theirs, one per physical core); PyTorch's
            are process-wide (``torch.set_num_threads``), so the caller sets them.
        precision: "fp32", "bf16" or "fp16" where the backend has it (``BACKEND_PRECISIONS``); None: the default.

    Raises:
        ValueError: an unknown name or precision, or a model file that the named backend cannot run.
        BackendUnavailable: TensorRT or a GPU is missing for ``tensorrt``, or OpenVINO for ``openvino``.
    """
    cfg = getattr(cfg, "cfg", cfg)
    weights = Path(cfg.MODEL.WEIGHTS)
    device = str(cfg.MODEL.DEVICE)
    choice = choose_backend(weights, device, name, precision, fp16=fp16)
    max_detections = int(cfg.TEST.DETECTIONS_PER_IMAGE)
    if choice.backend == "torch":
        backend = TorchBackend(cfg, precision=choice.precision)
    elif choice.backend == "onnxruntime":
        backend = OnnxRuntimeBackend(weights, providers=providers, device=device, threads=threads,
                                     max_detections=max_detections)
    elif choice.backend == "openvino":
        backend = OpenVinoBackend(weights, precision=choice.precision, threads=threads, max_detections=max_detections)
    else:
        backend = TensorRTBackend(weights, device=device if device.startswith("cuda") else "cuda",
                                  max_detections=max_detections)
    backend.choice = choice
    backend.precision = getattr(backend, "precision", choice.precision)
    log.info("prediction backend: %s", describe_backend(backend))
    return backend


def describe_backend(backend) -> str:
    """One line saying what runs the network and why, e.g. ``onnxruntime fp32 (default for .onnx; ...)``."""
    choice = getattr(backend, "choice", None)
    if choice is None:
        return f"{type(backend).__name__} {getattr(backend, 'precision', 'fp32')}"
    if backend.precision != choice.precision:
        return f"{choice.backend} {backend.precision} ({choice.reason}; {choice.precision} is not available here)"
    return str(choice)


def _check_io(names_in: list[str], names_out: list[str], source: str) -> tuple[str, ...]:
    """The output names to fetch from an exported model (with those of :data:`IMAGE_OUTPUTS` it has)."""
    if names_in != [INPUT_NAME] or sorted(set(names_out) - set(IMAGE_OUTPUTS)) != sorted(OUTPUT_NAMES):
        raise ValueError(f"{source} is not a severstal export: inputs {names_in}, outputs {names_out}; expected "
                         f"[{INPUT_NAME!r}] -> {list(OUTPUT_NAMES)} [+ {' + '.join(map(repr, IMAGE_OUTPUTS))}] "
                         "(severstal export --format onnx)")
    return OUTPUT_NAMES + tuple(name for name in IMAGE_OUTPUTS if name in names_out)


def _frozen_cap(exported: int | None, wanted: int | None, source: str) -> int | None:
    """The slice to apply to an exported model's detections, warning when ``wanted`` exceeds the frozen cap."""
    if wanted is not None and exported is not None and wanted > exported:
        log.warning("%s was exported with at most %d detections per image; %d asked: re-export to raise it",
                    source, exported, wanted)
    return wanted


class OnnxRuntimeBackend:
    """Runs an exported ``model.onnx`` with ONNX Runtime, one image per ``session.run``.

    Args:
        onnx_path: the file of ``severstal.model.export.export_onnx``.
        providers: execution providers; default CUDA (on ``device`` "cuda[:N]") when available, else CPU.
        device: "cpu" or "cuda[:N]", used only to choose the default providers.
        threads: intra-op threads; None: ONNX Runtime's default (one per physical core).
        max_detections: keep at most this many detections per image (the highest scoring).

    Session options: all graph optimisations; sequential execution (the graph is a chain: parallel
    execution only adds scheduling on a few cores); no spin-waiting of idle intra-op threads, which
    would take the cores from the post-processing that follows each run (on busy cores it slows the
    network itself).
    """

    def __init__(self, onnx_path: str | Path, providers: list | None = None, device: str = "cpu",
                 threads: int | None = None, max_detections: int | None = None):
        import onnxruntime as ort

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path}: create one with severstal export --format onnx")
        available = ort.get_available_providers()
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if device.startswith("cuda") and "CUDAExecutionProvider" in available:
                index = int(device.partition(":")[2] or 0)
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        unknown = [p for p in providers if (p[0] if isinstance(p, tuple) else p) not in available]
        if unknown:
            raise ValueError(f"ONNX Runtime providers {unknown} are not available here; available: {available}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # the unsimplified graph's unused initializers warn at every load
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.output_names = _check_io([i.name for i in self.session.get_inputs()],
                                      [o.name for o in self.session.get_outputs()], str(self.path))
        exported = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEYS["detections_per_image"])
        self.max_detections = _frozen_cap(int(exported) if exported else None, max_detections, self.path.name)
        self.providers = self.session.get_providers()
        self.precision = onnx_precision(self.path)

    def run(self, images: list[torch.Tensor], min_score: float = 0.0) -> list[RawOutput]:
        """Args: ``(3, H, W) float32`` tensors (BGR, 0..255). Returns one :class:`RawOutput` per image."""
        results = []
        for image in images:
            values = self.session.run(list(self.output_names), {INPUT_NAME: image.detach().cpu().numpy()})
            out = dict(zip(self.output_names, (torch.from_numpy(np.asarray(v)) for v in values)))
            results.append(exported_output(out, self.max_detections, min_score))
        return results


def openvino_missing() -> str | None:
    """Why the OpenVINO backend cannot run here (None when it can): the ``openvino`` package is not installed."""
    if importlib.util.find_spec("openvino") is None:
        return "the openvino package is not installed (pip install 'severstal[openvino]')"
    return None


class OpenVinoBackend:
    """Runs an exported ``model.onnx`` with OpenVINO on the CPU, one image per inference request.

    fp32 is set explicitly: OpenVINO's CPU plugin otherwise runs the whole graph in bf16 by itself on CPUs with
    AVX512-BF16/AMX, and that loses answers (Dice 0.969 against PyTorch fp32 on 24 real images with the demo's
    model, 2 AMX cores; the ROI heads' mask logits move), so it is not offered.

    Args:
        onnx_path: the file of ``severstal.model.export.export_onnx``.
        precision: "fp32", or "int8" for a model quantized at export (its QDQ nodes decide; the hint stays f32).
        threads: inference threads; None: OpenVINO's default (one per physical core).
        max_detections: keep at most this many detections per image (the highest scoring).

    Raises:
        BackendUnavailable: the ``openvino`` package is not installed.
    """

    def __init__(self, onnx_path: str | Path, precision: str = "fp32", threads: int | None = None,
                 max_detections: int | None = None):
        missing = openvino_missing()
        if missing:
            raise BackendUnavailable(f"OpenVINO is unavailable: {missing}")
        import openvino

        check_precision(precision, "openvino")
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ONNX model at {self.path}: create one with severstal export --format onnx")
        core = openvino.Core()
        model = core.read_model(str(self.path))
        output_names = _check_io([name for i in model.inputs for name in sorted(i.get_names())],
                                 [name for o in model.outputs for name in sorted(o.get_names())], str(self.path))
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = precision
        self.outputs = {name: self.compiled.output(name) for name in output_names}
        metadata = _onnx_metadata(self.path)
        exported = metadata.get(METADATA_KEYS["detections_per_image"])
        self.max_detections = _frozen_cap(int(exported) if exported else None, max_detections, self.path.name)
        config = yaml.safe_load(metadata.get(METADATA_KEYS["config"]) or "{}")
        heads = config.get("MODEL", {}).get("ROI_HEADS", {})
        self.score_floor = float(heads.get("SCORE_THRESH_TEST", 0.0))
        self.num_classes = int(heads.get("NUM_CLASSES", 4))

    def run(self, images: list[torch.Tensor], min_score: float = 0.0) -> list[RawOutput]:
        """Args: ``(3, H, W) float32`` tensors (BGR, 0..255). Returns one :class:`RawOutput` per image."""
        results = []
        for image in images:
            values = self.request.infer({INPUT_NAME: image.detach().cpu().numpy()})
            # Copies: the request reuses its output memory on the next call.
            out = {name: torch.from_numpy(np.array(values[port])) for name, port in self.outputs.items()}
            # OpenVINO 2026.4 answers an image without detections with one row of uninitialised memory
            # instead of none: real rows have a probability between the graph's floor and 1, a valid class and
            # finite boxes.
            valid = (out["scores"] >= self.score_floor) & (out["scores"] <= 1.0) & (out["classes"] >= 0)
            valid &= (out["classes"] < self.num_classes) & torch.isfinite(out["boxes"]).all(dim=1)
            rows = {name: value if name in IMAGE_OUTPUTS else value[valid] for name, value in out.items()}
            results.append(exported_output(rows, self.max_detections, min_score))
        return results


def _onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (see :data:`METADATA_KEYS`), without loading its weights twice."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


def tensorrt_missing() -> str | None:
    """Why the TensorRT backend cannot run here (None when it can): no ``tensorrt`` package or no CUDA GPU."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return ("the tensorrt package is not installed (pip install 'severstal[tensorrt]', on a machine with an "
                "NVIDIA GPU)")
    if not torch.cuda.is_available():
        return ("no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False); TensorRT runs on NVIDIA "
                "GPUs only")
    return None


def require_tensorrt():
    """Import and return the ``tensorrt`` module; :class:`BackendUnavailable` says what is missing."""
    missing = tensorrt_missing()
    if missing:
        raise BackendUnavailable(f"TensorRT is unavailable: {missing}")
    import tensorrt

    return tensorrt


def _torch_dtype(trt, dtype) -> torch.dtype:
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
            trt.int64: torch.int64, trt.bool: torch.bool}[dtype]


class TensorRTBackend:
    """Runs a serialized TensorRT engine (``severstal export --format tensorrt``) on a CUDA GPU.

    The outputs have data-dependent sizes (the number of detections), so TensorRT asks an output allocator
    for their memory during the run; buffers are PyTorch CUDA tensors and the run uses PyTorch's current
    stream. One image per call, like the ONNX graph it was built from.

    Args:
        engine_path: the ``.engine`` / ``.plan`` file, built for this GPU and TensorRT version.
        device: "cuda" or "cuda:N".
        max_detections: keep at most this many detections per image (the highest scoring).

    Raises:
        BackendUnavailable: no ``tensorrt`` package or no CUDA GPU.
    """

    def __init__(self, engine_path: str | Path, device: str = "cuda", max_detections: int | None = None):
        trt = require_tensorrt()
        self.trt = trt
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no TensorRT engine at {self.path}: build one with "
                                    "severstal export --format tensorrt")
        self.device = torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT {trt.__version__} cannot load {self.path}: an engine runs only on the "
                                   "TensorRT version and GPU model it was built with")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = _check_io(inputs, [n for n in names if n not in inputs], str(self.path))
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.allocator = _make_output_allocator(trt, self.device)
        for name in self.output_names:
            self.context.set_output_allocator(name, self.allocator)
        self.max_detections = max_detections

    def run(self, images: list[torch.Tensor], min_score: float = 0.0) -> list[RawOutput]:
        """Args: ``(3, H, W) float32`` tensors (BGR, 0..255). Returns one :class:`RawOutput` per image (CPU)."""
        results = []
        stream = torch.cuda.current_stream(self.device)
        for image in images:
            x = image.to(self.device, self.dtypes[INPUT_NAME]).contiguous()
            self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
            self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {self.path.name} on an input of shape {tuple(x.shape)}")
            stream.synchronize()
            out = {name: self.allocator.tensor(name, self.dtypes[name]).cpu() for name in self.output_names}
            results.append(exported_output(out, self.max_detections, min_score))
        return results


def _make_output_allocator(trt, device: torch.device):
    """A ``trt.IOutputAllocator`` that keeps each output in a growing PyTorch CUDA byte buffer."""

    class TorchOutputAllocator(trt.IOutputAllocator):
        def __init__(self):
            trt.IOutputAllocator.__init__(self)
            self.buffers: dict[str, torch.Tensor] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output(self, tensor_name, memory, size, alignment):
            buffer = self.buffers.get(tensor_name)
            if buffer is None or buffer.numel() < size:
                # Round up so that a few more detections next time do not reallocate.
                buffer = torch.empty(max(int(size), 1) * 2, dtype=torch.uint8, device=device)
                self.buffers[tensor_name] = buffer
            return buffer.data_ptr()

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self.reallocate_output(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(shape)

        def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
            shape = self.shapes[name]
            count = int(np.prod(shape)) if shape else 1
            if count == 0:
                return torch.empty(shape, dtype=dtype, device=device)
            itemsize = torch.empty((), dtype=dtype).element_size()
            return self.buffers[name][: count * itemsize].view(dtype).reshape(shape)

    return TorchOutputAllocator()

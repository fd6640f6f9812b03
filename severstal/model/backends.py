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
tensorrt    :class:`TensorRTBackend`       ``.engine`` / ``.plan``
=========== ============================== ==================================

The exported graph takes one image per call (see :mod:`severstal.model.export`); the ONNX Runtime and TensorRT
backends loop over a batch. Its score floor, NMS IoU and detection cap are frozen at export: a lower
``TEST.DETECTIONS_PER_IMAGE`` is applied by slicing the score-sorted rows, a higher one cannot be.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from severstal.files import backend_for, check_backend

log = logging.getLogger(__name__)

INPUT_NAME = "image"
"""The exported graph's one input: a ``(3, H, W) float32`` BGR image, already resized."""
OUTPUT_NAMES = ("boxes", "scores", "classes", "mask_probs")
"""The graph's outputs, in order: the fields of :class:`RawOutput`."""
METADATA_KEYS = {
    "config": "severstal.config",
    "thresholds": "severstal.thresholds",
    "class_names": "severstal.class_names",
    "detections_per_image": "severstal.detections_per_image",
    "source": "severstal.source_weights",
}
"""``metadata_props`` of an exported model: the config YAML, the thresholds JSON
(``{"score_thresholds", "min_areas"}``), the class names JSON (Detectron2's ``thing_classes``, indexed by
the 0-based class), the frozen detection cap and the name of the weights file."""

@dataclass
class RawOutput:
    """What a backend returns for one image, in the coordinates of the resized network input.

    Attributes:
        boxes: (N, 4) float32, XYXY.
        scores: (N,) float32.
        classes: (N,) int64, Detectron2's 0-based category ids.
        mask_probs: (N, M, M) float32 mask probabilities inside each box (M = 28 for Mask R-CNN).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    mask_probs: torch.Tensor


class Backend(Protocol):
    """Runs the network on a batch of preprocessed images (3 x H x W float32, BGR, unnormalised)."""

    def run(self, images: list[torch.Tensor]) -> list[RawOutput]: ...


class TorchBackend:
    """The Detectron2 model itself, in eval mode, without its own post-processing."""

    def __init__(self, cfg, fp16: bool = False):
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.modeling import build_model

        self.model = build_model(cfg).eval()
        DetectionCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.fp16 = fp16 and self.device.type == "cuda"

    def run(self, images: list[torch.Tensor]) -> list[RawOutput]:
        inputs = [{"image": image.to(self.device)} for image in images]
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.fp16):
            results = self.model.inference(inputs, do_postprocess=False)
        return [
            RawOutput(
                boxes=r.pred_boxes.tensor.float().cpu(),
                scores=r.scores.float().cpu(),
                classes=r.pred_classes.cpu(),
                mask_probs=r.pred_masks[:, 0].float().cpu(),
            )
            for r in results
        ]


class BackendUnavailable(RuntimeError):
    """A backend's software or hardware is missing here; the message says what and how to get it."""


def make_backend(name: str | None, cfg, fp16: bool = False, providers: list | None = None,
                 threads: int | None = None) -> Backend:
    """Build the backend ``name`` for the model file ``cfg.MODEL.WEIGHTS`` (as ``load_bundle`` sets it).

    Args:
        name: one of :data:`BACKENDS`; None: the one the model file runs on (:func:`backend_for`).
        cfg: a Severstal config, or a ``ModelBundle`` (its ``cfg`` is used); ``MODEL.DEVICE`` picks the device
            and ``TEST.DETECTIONS_PER_IMAGE`` caps the exported backends' detections.
        fp16: half precision (torch: autocast on GPU; ignored elsewhere: a TensorRT engine's precision is
            chosen when it is built).
        providers: ONNX Runtime execution providers (default: CUDA when the config's device is a GPU and
            ONNX Runtime has it, else CPU).
        threads: ONNX Runtime intra-op threads (default: ONNX Runtime's, one per physical core); PyTorch's
            are process-wide (``torch.set_num_threads``), so the caller sets them.

    Raises:
        ValueError: an unknown name, or a model file that the named backend cannot run.
        BackendUnavailable: TensorRT or a GPU is missing for the ``tensorrt`` backend.
    """
    cfg = getattr(cfg, "cfg", cfg)
    weights = Path(cfg.MODEL.WEIGHTS)
    wanted = backend_for(weights)
    name = check_backend(name) if name is not None else wanted
    if name != wanted:
        raise ValueError(f"backend {name!r} cannot run {weights.name}: that file is for {wanted!r} "
                         f"(export it first: severstal export --weights {weights} --format onnx|tensorrt)")
    device = str(cfg.MODEL.DEVICE)
    max_detections = int(cfg.TEST.DETECTIONS_PER_IMAGE)
    if name == "torch":
        return TorchBackend(cfg, fp16=fp16)
    if name == "onnxruntime":
        return OnnxRuntimeBackend(weights, providers=providers, device=device, threads=threads,
                                  max_detections=max_detections)
    return TensorRTBackend(weights, device=device if device.startswith("cuda") else "cuda",
                           max_detections=max_detections)


def _check_io(names_in: list[str], names_out: list[str], source: str) -> None:
    if names_in != [INPUT_NAME] or sorted(names_out) != sorted(OUTPUT_NAMES):
        raise ValueError(f"{source} is not a severstal export: inputs {names_in}, outputs {names_out}; expected "
                         f"[{INPUT_NAME!r}] -> {list(OUTPUT_NAMES)} (severstal export --format onnx)")


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
    would take the cores from the post-processing that follows each run (measured: 20-30% slower
    network time on 2 busy cores with spinning on).
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
        _check_io([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()],
                  str(self.path))
        exported = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEYS["detections_per_image"])
        self.max_detections = _frozen_cap(int(exported) if exported else None, max_detections, self.path.name)
        self.providers = self.session.get_providers()

    def run(self, images: list[torch.Tensor]) -> list[RawOutput]:
        """Args: ``(3, H, W) float32`` tensors (BGR, 0..255). Returns one :class:`RawOutput` per image."""
        results = []
        for image in images:
            values = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: image.detach().cpu().numpy()})
            out = dict(zip(OUTPUT_NAMES, (torch.from_numpy(np.asarray(v)) for v in values)))
            keep = slice(None, self.max_detections)
            results.append(RawOutput(boxes=out["boxes"][keep].float(), scores=out["scores"][keep].float(),
                                     classes=out["classes"][keep].long(), mask_probs=out["mask_probs"][keep].float()))
        return results


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
        _check_io(inputs, [n for n in names if n not in inputs], str(self.path))
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.allocator = _make_output_allocator(trt, self.device)
        for name in OUTPUT_NAMES:
            self.context.set_output_allocator(name, self.allocator)
        self.max_detections = max_detections

    def run(self, images: list[torch.Tensor]) -> list[RawOutput]:
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
            out = {name: self.allocator.tensor(name, self.dtypes[name]) for name in OUTPUT_NAMES}
            keep = slice(None, self.max_detections)
            results.append(RawOutput(boxes=out["boxes"][keep].float().cpu(), scores=out["scores"][keep].float().cpu(),
                                     classes=out["classes"][keep].long().cpu(),
                                     mask_probs=out["mask_probs"][keep].float().cpu()))
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

"""The logic of a TorchServe worker: requests -> images -> predictions -> per-request answers.

The handler (``severstal/serve/torchserve/handler.py``) is a thin TorchServe class over this module, so that
all of it is importable and tested without a server::

    request dicts -> decode_batch (a bad item becomes a BadRequest) -> ServingModel.predict (one
    Predictor.predict call for all good images of the batch) -> respond (per-item HTTP status, JSON)

Decisions:

* **Per-item errors.** TorchServe 0.12 encodes a status code and headers for each request of a batch
  (``context.set_response_status(code, phrase, idx)``; see ``ts/protocol/otf_message_handler.py``), so a bad
  image fails only its own request with a 4xx JSON body ``{"code", "type", "message"}`` (the shape of
  TorchServe's own errors) and the rest of the batch is predicted. Only an unexpected failure of the model
  itself fails the whole batch (503 from TorchServe).
* **Images of another size** than 1600x256 are predicted after the model's own resize and answered at
  their original size: ``height``, ``width``, every box and every RLE refer to the image as sent.
* **Where the image is:** the raw body (TorchServe's field ``body``) or the multipart field ``data``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from severstal import CLASS_IDS
from severstal.data.images import ImageError, decode_image
from severstal.files import BACKENDS, WEIGHTS_FILE

log = logging.getLogger(__name__)

REQUEST_FIELDS = ("data", "body")
"""Where an image may be in a request: multipart field ``data``, else the raw body."""
BATCH_HEADER = "X-Severstal-Batch-Size"
"""Response header: how many requests the handler call that answered this one held."""
INFERENCE_METRIC = "SeverstalInferenceTime"
"""Handler metric (ms): one ``Predictor.predict`` call for a whole batch."""
BATCH_METRIC = "SeverstalBatchSize"
"""Handler metric (count): requests in the batch of the last handler call."""


# Requests and answers ----------------------------------------------------------------------------------


class BadRequest(ValueError):
    """A request the handler cannot answer with a prediction; it answers ``status`` with a JSON message.

    Args:
        message: what is wrong and what is expected, for the client.
        status: the HTTP status (4xx).
    """

    PHRASES = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type"}

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status

    @property
    def phrase(self) -> str:
        return self.PHRASES.get(self.status, "Bad Request")

    def answer(self) -> dict:
        """The JSON body, shaped like TorchServe's own errors."""
        return {"code": self.status, "type": "BadRequest", "message": str(self)}


def request_image(request: Mapping, index: int = 0) -> np.ndarray:
    """The image of one TorchServe request as an (H, W, 3) uint8 BGR array.

    Args:
        request: one item of the handler's ``data``: field name -> value, where the value is bytes or a
            bytearray (TorchServe decodes ``text/*`` bodies to str and ``application/json`` ones to objects).
        index: the request's position in the batch, for messages.

    Raises:
        BadRequest: no image, empty, text or JSON, or bytes that are not a readable image (empty, not an
            image, truncated, decompression bomb: see ``severstal.data.images.decode_image``).
    """
    expected = "send a JPEG or PNG image as the request body or as multipart field 'data'"
    name = next((f for f in REQUEST_FIELDS if isinstance(request, Mapping) and f in request), None)
    if name is None:
        fields = sorted(request) if isinstance(request, Mapping) else type(request).__name__
        raise BadRequest(f"no image in request {index} (fields: {fields}): {expected}")
    value = request[name]
    if value is None or len(value) == 0:
        raise BadRequest(f"empty request body: {expected}")
    if isinstance(value, str):
        raise BadRequest(f"the request body is text ({len(value)} characters), not an image: {expected}", 415)
    if not isinstance(value, (bytes, bytearray)):
        raise BadRequest(f"the request body is JSON ({type(value).__name__}), not an image: {expected}", 415)
    try:
        return decode_image(bytes(value), source="request body")
    except ImageError as err:
        raise BadRequest(str(err)) from None


def decode_batch(requests: Sequence[Mapping]) -> list[np.ndarray | BadRequest]:
    """Decode every request of a batch; a bad one becomes its :class:`BadRequest` and fails alone."""
    decoded: list[np.ndarray | BadRequest] = []
    for index, request in enumerate(requests):
        try:
            decoded.append(request_image(request, index))
        except BadRequest as err:
            log.info("request %d of %d refused (%d): %s", index, len(requests), err.status, err)
            decoded.append(err)
    return decoded


def respond(results: Sequence[dict | BadRequest], context) -> list[dict]:
    """The handler's answers: one JSON-able dict per request, with its HTTP status set on ``context``.

    Args:
        results: a record (the REST answer) or a :class:`BadRequest` per request.
        context: TorchServe's ``Context`` of this batch (per-item status and headers).
    """
    answers = []
    for index, result in enumerate(results):
        if isinstance(result, BadRequest):
            context.set_response_status(result.status, result.phrase, index)
            answers.append(result.answer())
        else:
            answers.append(result)
        context.set_response_content_type(index, "application/json")
        context.set_response_header(index, BATCH_HEADER, str(len(results)))
    return answers


def record_metrics(metrics, seconds: float, batch_size: int) -> None:
    """Emit the handler's metrics through TorchServe's ``context.metrics`` (Prometheus on the metrics API).

    Args:
        metrics: TorchServe's metrics cache of the worker.
        seconds: time of the batch's prediction.
        batch_size: requests in the batch, bad ones included.
    """
    from ts.metrics.metric_type_enum import MetricTypes

    metrics.add_time(INFERENCE_METRIC, round(seconds * 1000.0, 2), None, "ms")
    metrics.add_metric(BATCH_METRIC, batch_size, "count", None, [], MetricTypes.GAUGE)


# Settings and the model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HandlerSettings:
    """The ``handler:`` block of ``model-config.yaml``, applied over what was saved with the weights.

    Attributes:
        score_thresholds: per class 1..4; None keeps the thresholds saved with the weights.
        min_areas: per class 1..4 minimum class-mask area in pixels; None keeps the saved ones.
        max_detections: instances per image before thresholds; None keeps the config's
            ``TEST.DETECTIONS_PER_IMAGE``.
        backend: one of :data:`BACKENDS`; None follows the archived model file (``.pth`` torch, ``.onnx``
            onnxruntime, ``.engine`` tensorrt).
        fp16: autocast to half precision; used on GPU by the torch backend only.
    """

    score_thresholds: tuple[float, ...] | None = None
    min_areas: tuple[int, ...] | None = None
    max_detections: int | None = None
    backend: str | None = None
    fp16: bool = False

    @classmethod
    def from_mapping(cls, block: Mapping | None) -> HandlerSettings:
        """Validate a ``handler:`` block; unknown keys and bad values raise ValueError naming what is allowed."""
        block = dict(block or {})
        allowed = list(cls.__dataclass_fields__)
        unknown = sorted(set(block) - set(allowed))
        if unknown:
            raise ValueError(f"handler settings: unknown {unknown}; allowed: {allowed}")
        n = len(CLASS_IDS)
        thresholds, areas = block.get("score_thresholds"), block.get("min_areas")
        if thresholds is not None:
            thresholds = tuple(float(t) for t in thresholds)
            if len(thresholds) != n or not all(0.0 <= t <= 1.0 for t in thresholds):
                raise ValueError(f"handler settings: score_thresholds needs {n} values in [0, 1], got {thresholds}")
        if areas is not None:
            areas = tuple(int(a) for a in areas)
            if len(areas) != n or min(areas) < 0:
                raise ValueError(f"handler settings: min_areas needs {n} values >= 0, got {areas}")
        max_detections = block.get("max_detections")
        if max_detections is not None and (not isinstance(max_detections, int) or max_detections < 1):
            raise ValueError(f"handler settings: max_detections must be a positive integer, got {max_detections!r}")
        backend = block.get("backend")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"handler settings: unknown backend {backend!r}; allowed: {list(BACKENDS)}")
        fp16 = block.get("fp16", False)
        if not isinstance(fp16, bool):
            raise ValueError(f"handler settings: fp16 must be true or false, got {fp16!r}")
        return cls(thresholds, areas, max_detections, backend, fp16)

    def apply(self, cfg) -> None:
        """Write the settings that are set into a Severstal config, in place."""
        if self.score_thresholds is not None:
            cfg.SEVERSTAL.SCORE_THRESHOLDS = list(self.score_thresholds)
        if self.min_areas is not None:
            cfg.SEVERSTAL.MIN_AREAS = list(self.min_areas)
        if self.max_detections is not None:
            cfg.TEST.DETECTIONS_PER_IMAGE = self.max_detections


def select_device(gpu_id: int | None) -> str:
    """``cuda:N`` for the GPU TorchServe assigned when CUDA is available, else ``cpu``."""
    import torch

    if gpu_id is not None and torch.cuda.is_available():
        return f"cuda:{int(gpu_id)}"
    return "cpu"


class ServingModel:
    """A loaded predictor and the handler's batch step.

    Args:
        predictor: a ``severstal.model.predict.Predictor``.
        settings: the handler settings it was built with.
    """

    def __init__(self, predictor, settings: HandlerSettings):
        self.predictor = predictor
        self.settings = settings

    @classmethod
    def load(cls, model_dir: str | Path, weights_name: str = WEIGHTS_FILE, gpu_id: int | None = None,
             handler_block: Mapping | None = None) -> ServingModel:
        """Load the model of an unpacked archive (or a training run folder).

        Args:
            model_dir: folder with the weights, ``config.yaml`` and optionally ``thresholds.json``.
            weights_name: the weights file in it (the manifest's ``serializedFile``).
            gpu_id: the GPU TorchServe assigned, or None.
            handler_block: the ``handler:`` block of model-config.yaml.
        """
        from severstal.model.backends import make_backend
        from severstal.model.config import load_bundle
        from severstal.model.predict import Predictor

        settings = HandlerSettings.from_mapping(handler_block)
        device = select_device(gpu_id)
        bundle = load_bundle(Path(model_dir) / weights_name, device=device)
        settings.apply(bundle.cfg)
        backend = make_backend(settings.backend, bundle.cfg, fp16=settings.fp16)
        log.info("loaded %s on %s with %s (fp16 %s, score thresholds %s, min areas %s)", bundle.weights, device,
                 type(backend).__name__, getattr(backend, "fp16", False), list(bundle.cfg.SEVERSTAL.SCORE_THRESHOLDS),
                 list(bundle.cfg.SEVERSTAL.MIN_AREAS))
        return cls(Predictor(bundle.cfg, backend=backend), settings)

    @classmethod
    def from_context(cls, context) -> ServingModel:
        """Load the model TorchServe unpacked: ``model_dir``, the manifest's weights, ``gpu_id``, the handler block."""
        properties = context.system_properties
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        return cls.load(properties["model_dir"], context.manifest["model"]["serializedFile"],
                        properties.get("gpu_id"), yaml_config.get("handler"))

    @property
    def device(self) -> str:
        return str(self.predictor.cfg.MODEL.DEVICE)

    def predict(self, items: Sequence[np.ndarray | BadRequest]) -> list[dict | BadRequest]:
        """Predict all decoded images of a batch in one call; bad items pass through unchanged."""
        good = [i for i, item in enumerate(items) if not isinstance(item, BadRequest)]
        results: list[dict | BadRequest] = list(items)
        if good:
            for i, record in zip(good, self.predictor.predict([items[i] for i in good])):
                results[i] = record
        return results

"""The logic of a TorchServe worker: requests -> images -> predictions -> per-request answers.

The TorchServe handler (``severstal/serve/torchserve/handler.py``) and the Ray Serve deployment
(:mod:`severstal.serve.rayserve`) are thin layers over this module, so that all of it is importable and
tested without a server, and both servers answer alike::

    request dicts -> read_batch (an Upload per request: its route, its image or a BadRequest) ->
    ServingModel.predict (one Predictor.predict call for all good images of the batch) ->
    answer (per-request HTTP status and JSON, in the request's protocol) -> respond (TorchServe's context)

Decisions:

* **No request fails another.** TorchServe 0.12 encodes a status code and headers for each request of a
  batch (``context.set_response_status(code, phrase, idx)``; see ``ts/protocol/otf_message_handler.py``), so
  a bad image fails only its own request with a 4xx JSON body ``{"code", "type", "message"}`` (the shape of
  TorchServe's own errors) and the rest of the batch is predicted. Three layers keep it so:

  1. decoding: what is not a readable image answers 400/415 (:func:`request_image`);
  2. limits: an image the model cannot take (:class:`ImageLimits`: its shorter side would fall under the
     network's coarsest stride after the model's resize, e.g. 20000x2) answers 400 saying what is accepted;
  3. if the model still fails on a batch, its images are predicted one by one, so only the failing one
     answers an error (:class:`ModelFailure`, logged with its size) and the others their predictions.
* **Images of another size** than 1600x256 are predicted after the model's own resize and answered at
  their original size: ``height``, ``width``, every box and every RLE refer to the image as sent.
* **Where the image is:** the raw body (TorchServe's field ``body``) or the multipart field ``data``.
* **Two protocols, one worker.** The native route (``/predictions/NAME``: the image in, the REST contract's
  JSON out) and the Open Inference Protocol (``/v2/models/NAME/infer``: :mod:`severstal.serve.oip`) differ
  only in how the image comes and how the answer and errors are written; decoding, limits, batching and
  isolation are the same code. TorchServe hands both routes to the same handler, which tells them by
  content (:func:`severstal.serve.oip.is_infer_request`); Ray Serve knows the route from the path.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from severstal.data.images import MAX_PIXELS, ImageError, decode_image
from severstal.files import BACKENDS, WEIGHTS_FILE
from severstal.model.run import Thresholds, check_per_class
from severstal.serve import oip

log = logging.getLogger(__name__)

REQUEST_FIELDS = ("data", "body")
"""Where an image may be in a request: multipart field ``data``, else the raw body."""
BATCH_HEADER = "X-Severstal-Batch-Size"
"""Response header: how many requests the handler call that answered this one held."""
BACKEND_HEADER = "X-Severstal-Backend"
"""Response header: the backend and precision that answered, e.g. ``onnxruntime int8``."""
INFERENCE_METRIC = "SeverstalInferenceTime"
"""Handler metric (ms): one ``Predictor.predict`` call for a whole batch."""
BATCH_METRIC = "SeverstalBatchSize"
"""Handler metric (count): requests in the batch of the last handler call."""
ROUTES = ("native", "oip")
"""How a request came: the native ``/predictions/NAME`` route or the Open Inference Protocol's ``infer``."""


# Requests and answers ----------------------------------------------------------------------------------


class BadRequest(ValueError):
    """A request the handler cannot answer with a prediction; it answers ``status`` with a JSON message.

    Args:
        message: what is wrong and what is expected, for the client.
        status: the HTTP status (4xx).
    """

    PHRASES = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type",
               500: "Internal Server Error", 507: "Insufficient Storage"}

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status

    @property
    def phrase(self) -> str:
        return self.PHRASES.get(self.status, "Bad Request")

    def answer(self) -> dict:
        """The JSON body, shaped like TorchServe's own errors."""
        return {"code": self.status, "type": type(self).__name__, "message": str(self)}


class ModelFailure(BadRequest):
    """The model failed on one image that passed decoding and :class:`ImageLimits`: a fault of the server.

    It answers 500 (not retried by :func:`severstal.serve.client.post_image`: the same image would fail
    again), or 507 when the worker ran out of memory (retried: it may pass when the server is less busy).
    Only this request fails; the others of its batch are answered.
    """

    def __init__(self, message: str, out_of_memory: bool = False):
        super().__init__(message, 507 if out_of_memory else 500)


# Limits of the model -------------------------------------------------------------------------------------


def _feature_stride(name: str) -> int:
    """Stride of a Detectron2 feature map from its name: ``p5`` or ``res5`` -> 32 (2 ** level)."""
    digits = "".join(ch for ch in name if ch.isdigit())
    return 2 ** int(digits) if digits else 32


@dataclass(frozen=True)
class ImageLimits:
    """Which images the model can take, derived from its config; checked before any prediction.

    Every image is resized by ``ResizeShortestEdge(short_edge, max_size)`` before the network: its shorter
    side to ``short_edge`` unless the longer one would then exceed ``max_size``. A very elongated image
    (20000x2) thus shrinks to a shorter side of less than one pixel, and the network fails on it, together
    with every image batched with it. The limit is the stride of the coarsest feature map the ROI heads pool
    from (FPN ``p5``: 32 px): an image thinner than that after resizing has no full feature cell across.

    Attributes:
        short_edge: ``INPUT.MIN_SIZE_TEST``.
        max_size: ``INPUT.MAX_SIZE_TEST``.
        min_side: least shorter side, in pixels, after the resize.
        max_pixels: the decoder's limit (:data:`severstal.data.images.MAX_PIXELS`).
    """

    short_edge: int
    max_size: int
    min_side: int
    max_pixels: int = MAX_PIXELS

    @classmethod
    def from_cfg(cls, cfg) -> ImageLimits:
        short = cfg.INPUT.MIN_SIZE_TEST
        short = int(max(short)) if isinstance(short, (list, tuple)) else int(short)
        strides = [_feature_stride(f) for f in cfg.MODEL.ROI_HEADS.IN_FEATURES] or [32]
        return cls(short, int(cfg.INPUT.MAX_SIZE_TEST), max(strides))

    @property
    def max_aspect_ratio(self) -> float:
        """Longer side / shorter side that still leaves ``min_side`` pixels after the resize."""
        return self.max_size / self.min_side

    @property
    def max_side(self) -> int:
        """The longest side an accepted image can have (``max_pixels`` at ``max_aspect_ratio``)."""
        return int(math.sqrt(self.max_pixels * self.max_aspect_ratio))

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the model's resize (Detectron2's ``ResizeShortestEdge``)."""
        from detectron2.data.transforms import ResizeShortestEdge

        return ResizeShortestEdge.get_output_shape(height, width, self.short_edge, self.max_size)

    def describe(self) -> str:
        """What is accepted, for error messages and the README."""
        return (f"accepted: JPEG, PNG or another image Pillow reads, grey or colour, at most {self.max_pixels:,} "
                f"pixels, the longer side at most {self.max_aspect_ratio:g} times the shorter and at most "
                f"{self.max_side:,} px: the model resizes the shorter side to {self.short_edge} px, the longer to at "
                f"most {self.max_size} px, and needs at least {self.min_side} px on the shorter side")

    def check(self, height: int, width: int) -> None:
        """Raise :class:`BadRequest` (400) for an image of ``width`` x ``height`` the model cannot take."""
        new_h, new_w = self.resized(height, width)
        if min(new_h, new_w) < self.min_side:
            ratio = max(height, width) / min(height, width)
            raise BadRequest(f"the image is {width}x{height} pixels (aspect ratio {ratio:,.1f}:1): the model would "
                             f"see it as {new_w}x{new_h}, under {self.min_side} px on its shorter side; "
                             f"{self.describe()}")


def _request_body(request: Mapping, index: int):
    """The image field of one request (multipart ``data``, else the raw ``body``), as TorchServe hands it over."""
    name = next((f for f in REQUEST_FIELDS if isinstance(request, Mapping) and f in request), None)
    if name is None:
        fields = sorted(request) if isinstance(request, Mapping) else type(request).__name__
        raise BadRequest(f"no image in request {index} (fields: {fields}): {_EXPECTED}")
    return request[name]


_EXPECTED = "send a JPEG or PNG image as the request body or as multipart field 'data'"


def image_from_body(value, index: int = 0) -> np.ndarray:
    """Decode an image body as an (H, W, 3) uint8 BGR array.

    Args:
        value: bytes or a bytearray (TorchServe decodes ``text/*`` bodies to str and ``application/json`` ones
            to objects: both are refused).
        index: the request's position in the batch, for messages.

    Raises:
        BadRequest: empty, text or JSON, or bytes that are not a readable image (empty, not an image,
            truncated, decompression bomb: see ``severstal.data.images.decode_image``).
    """
    if value is None or len(value) == 0:
        raise BadRequest(f"empty request body: {_EXPECTED}")
    if isinstance(value, str):
        raise BadRequest(f"the request body is text ({len(value)} characters), not an image: {_EXPECTED}", 415)
    if not isinstance(value, (bytes, bytearray)):
        raise BadRequest(f"the request body is JSON ({type(value).__name__}), not an image: {_EXPECTED}", 415)
    try:
        return decode_image(bytes(value), source="request body")
    except ImageError as err:
        raise BadRequest(str(err)) from None


def request_image(request: Mapping, index: int = 0) -> np.ndarray:
    """The image of one native TorchServe request (field ``data`` or ``body``): see :func:`image_from_body`."""
    return image_from_body(_request_body(request, index), index)


def fields_from_http(body: bytes, content_type: str | None) -> dict:
    """A request's fields as TorchServe hands them to its handler, for a server that reads raw HTTP (Ray Serve).

    Multipart forms give one field per part (bytes); any other body is the field ``body``: decoded to str for
    ``text/*`` and to an object for valid ``application/json``, as TorchServe's worker does, so both servers
    refuse those alike.

    Args:
        body: the raw request body.
        content_type: its ``Content-Type`` header, or None.
    """
    import email.parser
    import email.policy

    content_type = content_type or ""
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
        fields = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name:
                fields[name] = part.get_payload(decode=True) or b""
        return fields
    if kind.startswith("text"):
        return {"body": body.decode("utf-8", errors="replace")}
    if kind == "application/json":
        try:
            return {"body": json.loads(body)}
        except ValueError:
            return {"body": body}
    return {"body": body}


@dataclass
class Upload:
    """One request on its way through the worker.

    Attributes:
        route: one of :data:`ROUTES`.
        item: the decoded (H, W, 3) uint8 BGR image, or the request's :class:`BadRequest`.
        infer: the parsed ``infer`` request (its id and outputs) on the ``oip`` route, when it parsed.
    """

    route: str
    item: np.ndarray | BadRequest
    infer: oip.InferRequest | None = None


def read_request(request: Mapping, headers: Mapping | None = None, limits: ImageLimits | None = None,
                 index: int = 0, route: str | None = None) -> Upload:
    """Read one request: its route, then its image, checked against the model's limits.

    Args:
        request: field name -> value, as TorchServe hands a request to its handler (``body`` or ``data``).
        headers: the request's headers (the Open Inference Protocol's binary extension needs them).
        limits: the model's :class:`ImageLimits`; None checks decoding only.
        index: the request's position in the batch, for messages.
        route: one of :data:`ROUTES` when the server knows it from the path; None tells it by content.

    Returns:
        An :class:`Upload`; a bad request is its item (a :class:`BadRequest`), never an exception.
    """
    if route is not None and route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; allowed: {list(ROUTES)}")
    infer = None
    try:
        body = _request_body(request, index)
        if route is None:
            route = "oip" if oip.is_infer_request(body, headers) else "native"
        if route == "oip":
            try:
                infer = oip.parse_infer_request(body, headers)
            except oip.ProtocolError as err:
                raise BadRequest(str(err), err.status) from None
            body = infer.image
        image = image_from_body(body, index)
        if limits is not None:
            limits.check(*image.shape[:2])
        return Upload(route, image, infer)
    except BadRequest as err:
        log.info("request %d refused (%d): %s", index, err.status, err)
        return Upload(route or "native", err, infer)
    except Exception as err:  # a decoder failure decode_image does not know: still this request's alone
        log.exception("request %d: unexpected decoding failure", index)
        return Upload(route or "native", BadRequest(f"the request body could not be decoded as an image "
                                                    f"({type(err).__name__}: {err}): send a JPEG or PNG image"), infer)


def read_batch(requests: Sequence[Mapping], limits: ImageLimits | None = None,
               headers: Sequence[Mapping] | None = None) -> list[Upload]:
    """:func:`read_request` for every request of a batch; a bad one fails alone.

    Args:
        requests: the handler's ``data``.
        limits: the model's :class:`ImageLimits`.
        headers: each request's headers (TorchServe: ``context.get_all_request_header(i)``); None: none.
    """
    headers = list(headers) if headers is not None else [None] * len(requests)
    return [read_request(r, h, limits, i) for i, (r, h) in enumerate(zip(requests, headers))]


def decode_batch(requests: Sequence[Mapping], limits: ImageLimits | None = None) -> list[np.ndarray | BadRequest]:
    """The items of :func:`read_batch`: an image, or the request's :class:`BadRequest`."""
    return [upload.item for upload in read_batch(requests, limits)]


def answer(upload: Upload, result: dict | BadRequest, model_name: str, model_version: str | None = None
           ) -> tuple[int, dict]:
    """The HTTP status and JSON body of one request, in its route's protocol.

    Args:
        upload: the request as read.
        result: its record (the REST contract's answer) or its :class:`BadRequest`.
        model_name, model_version: what the Open Inference Protocol's answer names.
    """
    if isinstance(result, BadRequest):
        return result.status, (oip.error_body(str(result)) if upload.route == "oip" else result.answer())
    if upload.route == "oip":
        return 200, oip.infer_response(result, model_name, model_version, upload.infer)
    return 200, result


def respond(uploads: Sequence[Upload], results: Sequence[dict | BadRequest], context,
            runs: str | None = None) -> list[dict]:
    """The handler's answers: one JSON-able dict per request, with its HTTP status set on ``context``.

    Args:
        uploads: the batch as :func:`read_batch` read it.
        results: a record (the REST answer) or a :class:`BadRequest` per request.
        context: TorchServe's ``Context`` of this batch (per-item status and headers; the manifest's name
            and version).
        runs: what runs the model (:attr:`ServingModel.runs`), sent as the :data:`BACKEND_HEADER` header.
    """
    model = context.manifest.get("model", {})
    answers = []
    for index, (upload, result) in enumerate(zip(uploads, results)):
        status, body = answer(upload, result, model.get("modelName", ""), model.get("modelVersion"))
        if status != 200:
            context.set_response_status(status, BadRequest.PHRASES.get(status, "Bad Request"), index)
        answers.append(body)
        context.set_response_content_type(index, "application/json")
        context.set_response_header(index, BATCH_HEADER, str(len(results)))
        if runs:
            context.set_response_header(index, BACKEND_HEADER, runs)
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
        threads: PyTorch intra-op threads of each worker (``torch.set_num_threads``); None keeps PyTorch's
            default (the machine's physical cores).
    """

    score_thresholds: tuple[float, ...] | None = None
    min_areas: tuple[int, ...] | None = None
    max_detections: int | None = None
    backend: str | None = None
    fp16: bool = False
    threads: int | None = None

    @classmethod
    def from_mapping(cls, block: Mapping | None) -> HandlerSettings:
        """Validate a ``handler:`` block; unknown keys and bad values raise ValueError naming what is allowed."""
        block = dict(block or {})
        allowed = list(cls.__dataclass_fields__)
        unknown = sorted(set(block) - set(allowed))
        if unknown:
            raise ValueError(f"handler settings: unknown {unknown}; allowed: {allowed}")
        try:  # the rule of a run's thresholds.json (severstal.model.run.Thresholds)
            thresholds, areas = (None if block.get(name) is None else check_per_class(name, block[name])
                                 for name in ("score_thresholds", "min_areas"))
        except ValueError as err:
            raise ValueError(f"handler settings: {err}") from None
        max_detections = block.get("max_detections")
        if max_detections is not None and (not isinstance(max_detections, int) or max_detections < 1):
            raise ValueError(f"handler settings: max_detections must be a positive integer, got {max_detections!r}")
        backend = block.get("backend")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"handler settings: unknown backend {backend!r}; allowed: {list(BACKENDS)}")
        fp16 = block.get("fp16", False)
        if not isinstance(fp16, bool):
            raise ValueError(f"handler settings: fp16 must be true or false, got {fp16!r}")
        threads = block.get("threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"handler settings: threads must be a positive integer or null, got {threads!r}")
        return cls(thresholds, areas, max_detections, backend, fp16, threads)

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
        self.limits = ImageLimits.from_cfg(predictor.cfg)

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
        import torch

        from severstal.model.backends import describe_backend, make_backend
        from severstal.model.config import load_bundle
        from severstal.model.predict import Predictor

        settings = HandlerSettings.from_mapping(handler_block)
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        device = select_device(gpu_id)
        # With no backend named, the fastest verified model the folder holds for this device (an archive of a
        # training run packs its ONNX and int8 exports beside the weights: severstal.files.FASTEST_FIRST).
        source = Path(model_dir) if settings.backend is None else Path(model_dir) / weights_name
        bundle = load_bundle(source, device=device)
        settings.apply(bundle.cfg)
        backend = make_backend(settings.backend, bundle.cfg, fp16=settings.fp16)
        log.info("loaded %s on %s: %s (%s, %d threads)", bundle.weights, device, describe_backend(backend),
                 ", ".join(f"{name.replace('_', ' ')} {values}"
                           for name, values in Thresholds.from_cfg(bundle.cfg).per_class().items()),
                 torch.get_num_threads())
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

    @property
    def runs(self) -> str:
        """The backend and precision that run the model, e.g. ``onnxruntime int8``."""
        backend = self.predictor.backend
        choice = getattr(backend, "choice", None)  # make_backend's; a backend built by hand has none
        return f"{choice.backend if choice else type(backend).__name__} {getattr(backend, 'precision', 'fp32')}"

    def predict(self, items: Sequence[np.ndarray | BadRequest]) -> list[dict | BadRequest]:
        """Predict all decoded images of a batch in one call; bad items pass through unchanged.

        If that call fails, each image is predicted alone: an image that fails alone becomes its
        :class:`ModelFailure` (logged with its index and size), and the others get their records.
        """
        good = [i for i, item in enumerate(items) if not isinstance(item, BadRequest)]
        results: list[dict | BadRequest] = list(items)
        if not good:
            return results
        try:
            records = self.predictor.predict([items[i] for i in good])
        except Exception as err:
            if len(good) == 1:
                results[good[0]] = self._failure(err, good[0], len(items), items[good[0]])
                return results
            log.warning("a batch of %d images failed (%s: %s): predicting them one by one", len(good),
                        type(err).__name__, err)
            for i in good:
                try:
                    [results[i]] = self.predictor.predict([items[i]])
                except Exception as alone:
                    results[i] = self._failure(alone, i, len(items), items[i])
            return results
        for i, record in zip(good, records):
            results[i] = record
        return results

    @staticmethod
    def _failure(err: Exception, index: int, batch: int, image: np.ndarray) -> ModelFailure:
        """Log the model's failure on one image with what the image was; the request's error answer."""
        height, width = image.shape[:2]
        out_of_memory = isinstance(err, MemoryError) or "out of memory" in str(err).lower()
        log.error("the model failed on request %d of %d, a %dx%d image (dtype %s): %s: %s", index, batch, width,
                  height, image.dtype, type(err).__name__, err, exc_info=err)
        what = "ran out of memory" if out_of_memory else "failed"
        return ModelFailure(f"the model {what} on this {width}x{height} image ({type(err).__name__}: {err}); "
                            "the other requests of its batch were answered", out_of_memory)

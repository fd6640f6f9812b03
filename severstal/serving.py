"""Serving with TorchServe: the handler's logic, the ``.mar`` archive and the server's life cycle.

The handler (``torchserve/handler.py``) is a thin TorchServe class; everything it does lives here so that
it is importable and tested without a server::

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
* **Listeners** are on 127.0.0.1 unless ``host`` says otherwise; ``host`` moves the inference and metrics
  APIs only: the management API and gRPC (which TorchServe cannot switch off) stay on loopback.
* **Token authorization** is on unless the server listens on loopback only (``token_auth=None``); the keys
  are in ``key_file.json`` in the run folder. **Model API** (register/delete over REST) is off: a server
  serves the archives of its model store, loaded at start; scaling workers stays possible.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from severstal import CLASS_IDS
from severstal.images import ImageError, decode_image

log = logging.getLogger(__name__)

TORCHSERVE_DIR = Path(__file__).resolve().parents[1] / "torchserve"
"""The project's TorchServe files: the handler, ``model-config.yaml`` and ``config.properties``."""
HANDLER_FILE = TORCHSERVE_DIR / "handler.py"
MODEL_CONFIG_FILE = TORCHSERVE_DIR / "model-config.yaml"
PROPERTIES_FILE = TORCHSERVE_DIR / "config.properties"

BACKENDS = ("torch", "onnxruntime", "tensorrt")
"""Backends the handler can run the network with (``handler: backend:`` in model-config.yaml): the names of
``severstal.backends.BACKENDS``, repeated here so that reading settings imports no torch."""
REQUEST_FIELDS = ("data", "body")
"""Where an image may be in a request: multipart field ``data``, else the raw body."""
BATCH_HEADER = "X-Severstal-Batch-Size"
"""Response header: how many requests the handler call that answered this one held."""
INFERENCE_METRIC = "SeverstalInferenceTime"
"""Handler metric (ms): one ``Predictor.predict`` call for a whole batch."""
BATCH_METRIC = "SeverstalBatchSize"
"""Handler metric (count): requests in the batch of the last handler call."""
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
KEY_FILE = "key_file.json"
"""Where TorchServe writes its token keys: the working directory of the server (its run folder)."""
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


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
            image, truncated, decompression bomb: see ``severstal.images.decode_image``).
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
        predictor: a ``severstal.predict.Predictor``.
        settings: the handler settings it was built with.
    """

    def __init__(self, predictor, settings: HandlerSettings):
        self.predictor = predictor
        self.settings = settings

    @classmethod
    def load(cls, model_dir: str | Path, weights_name: str = "model_final.pth", gpu_id: int | None = None,
             handler_block: Mapping | None = None) -> ServingModel:
        """Load the model of an unpacked archive (or a training run folder).

        Args:
            model_dir: folder with the weights, ``config.yaml`` and optionally ``thresholds.json``.
            weights_name: the weights file in it (the manifest's ``serializedFile``).
            gpu_id: the GPU TorchServe assigned, or None.
            handler_block: the ``handler:`` block of model-config.yaml.
        """
        from severstal.backends import make_backend
        from severstal.config import load_bundle
        from severstal.predict import Predictor

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


# The archive ---------------------------------------------------------------------------------------------


def archive(weights: str | Path, out_dir: str | Path, name: str = "severstal", version: str = "1.0",
            model_config: str | Path | None = None) -> Path:
    """Build ``out_dir/NAME.mar`` with torch-model-archiver.

    The archive holds the weights, the run's ``config.yaml`` (and ``thresholds.json`` when present), the
    handler and ``model-config.yaml``; the handler imports the installed ``severstal`` package. An exported
    ``model.onnx`` (``severstal export``) is archived the same way and served with ONNX Runtime unless the
    handler block's ``backend`` says otherwise.

    Args:
        weights: a weights file or exported model, or its folder (``severstal.config.MODEL_FILES``).
        out_dir: the model store to write to (created).
        name: the model name, the ``/predictions/NAME`` path.
        version: the model version.
        model_config: default ``torchserve/model-config.yaml``.

    Returns:
        The path of the archive.
    """
    from severstal.backends import backend_for
    from severstal.config import CONFIG_FILE, THRESHOLDS_FILE, model_file_in

    weights = Path(weights)
    if weights.is_dir():
        weights = model_file_in(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"no weights at {weights}")
    config = weights.parent / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing: a training run saves it next to its weights")
    if not _MODEL_NAME.fullmatch(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit")
    model_config = Path(model_config) if model_config else MODEL_CONFIG_FILE
    backend = _check_model_config(model_config).backend
    if backend is not None and backend != backend_for(weights):
        raise ValueError(f"{model_config} sets backend {backend!r}, which cannot run {weights.name} "
                         f"(a {backend_for(weights)!r} model): set backend to null or {backend_for(weights)!r}")
    extra = [config] + [p for p in [weights.parent / THRESHOLDS_FILE] if p.is_file()]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "model_archiver.model_packaging",
           "--model-name", name, "--version", str(version),
           "--serialized-file", str(weights), "--handler", str(_torchserve_file(HANDLER_FILE)),
           "--extra-files", ",".join(str(p) for p in extra), "--config-file", str(model_config),
           "--export-path", str(out_dir), "--force"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    path = out_dir / f"{name}.mar"
    log.info("archived %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def _check_model_config(path: Path) -> HandlerSettings:
    """The handler settings of model-config.yaml; fails before archiving when it is unreadable or wrong."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    loaded = yaml.safe_load(path.read_text()) or {}
    return HandlerSettings.from_mapping(loaded.get("handler"))


def _torchserve_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the torchserve/ folder of the project checkout is needed")
    return path


# The server ----------------------------------------------------------------------------------------------


@dataclass
class Server:
    """A running TorchServe started by :func:`running_server`.

    Attributes:
        process: the ``torchserve --foreground`` process (leader of its own process group).
        run_dir: its working directory: ``logs/``, ``tmp/`` (TMPDIR), ``config.properties``, ``key_file.json``.
        host, port: inference on ``port``, management on ``port + 1`` (loopback), metrics on ``port + 2``.
        token_auth: whether requests need ``Authorization: Bearer KEY`` (see :meth:`headers`).
    """

    process: subprocess.Popen
    run_dir: Path
    host: str
    port: int
    token_auth: bool
    models: list[str] = field(default_factory=list)

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host

    @property
    def inference_url(self) -> str:
        return f"http://{self._client_host}:{self.port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.port + 1}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.port + 2}/metrics"

    def predictions_url(self, model: str = "severstal") -> str:
        return f"{self.inference_url}/predictions/{model}"

    @property
    def java_pid(self) -> int | None:
        """The Java frontend's PID, from TorchServe's pid file in the server's TMPDIR."""
        pid_file = self.run_dir / "tmp" / ".model_server.pid"
        return int(pid_file.read_text().split()[0]) if pid_file.is_file() else None

    @property
    def key_file(self) -> Path:
        return self.run_dir / KEY_FILE

    def headers(self, api: str = "inference") -> dict:
        """The ``Authorization`` header for ``api`` ("inference" or "management"); empty without token auth."""
        if not self.token_auth:
            return {}
        keys = json.loads(self.key_file.read_text())
        return {"Authorization": f"Bearer {keys[api]['key']}"}

    def log_tail(self, lines: int = 40) -> str:
        out = self.run_dir / "logs" / "torchserve.out"
        return "\n".join(out.read_text(errors="replace").splitlines()[-lines:]) if out.is_file() else ""

    def processes(self) -> list:
        """The server's live processes (``psutil.Process``): the wrapper, the Java frontend and its workers."""
        import psutil

        roots = []
        if self.process.returncode is None:  # not reaped yet: the PID is still this wrapper's
            with contextlib.suppress(psutil.Error):
                roots.append(psutil.Process(self.process.pid))
        java = self.java_pid
        if java is not None:
            with contextlib.suppress(psutil.Error, ValueError):
                candidate = psutil.Process(java)
                if "org.pytorch.serve.ModelServer" in candidate.cmdline() and Path(candidate.cwd()) == self.run_dir:
                    roots.append(candidate)
        found = {}
        for root in roots:
            found[root.pid] = root
            with contextlib.suppress(psutil.Error):
                found.update((child.pid, child) for child in root.children(recursive=True))
        return list(found.values())

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the wrapper, the Java frontend and its workers (as Ctrl-C would), SIGKILL after ``timeout``."""
        import psutil

        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        if alive:
            log.warning("TorchServe did not stop in %.0f s: killing %s", timeout, [p.pid for p in alive])
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=10)
        self.process.wait()
        # TMPDIR holds the unpacked archives and sockets; the logs stay.
        shutil.rmtree(self.run_dir / "tmp", ignore_errors=True)
        log.info("TorchServe stopped (logs: %s)", self.run_dir / "logs")


def free_port_block(count: int = 6, host: str = "127.0.0.1", attempts: int = 50) -> int:
    """A port P such that P .. P + count - 1 are free now on ``host`` (the OS picks P)."""
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind((host, 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        if all(_port_free(host, p) for p in range(base, base + count)):
            return base
    raise RuntimeError(f"no block of {count} free ports found on {host}")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def read_properties(path: str | Path) -> dict[str, str]:
    """The ``key=value`` lines of a Java properties file (comments and blank lines skipped)."""
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip().replace("\\\\", "\\")
    return props


def server_properties(model_store: Path, host: str, port: int, token_auth: bool) -> dict[str, str]:
    """The project's ``config.properties`` with this server's addresses, ports, store and token setting."""
    props = read_properties(_torchserve_file(PROPERTIES_FILE))
    props.update({
        "inference_address": f"http://{host}:{port}",
        "management_address": f"http://127.0.0.1:{port + 1}",
        "metrics_address": f"http://{host}:{port + 2}",
        "grpc_inference_address": "127.0.0.1",
        "grpc_inference_port": str(port + 3),
        "grpc_management_address": "127.0.0.1",
        "grpc_management_port": str(port + 4),
        "initial_worker_port": str(port + 5),
        "model_store": str(model_store),
        "allowed_urls": "file://" + re.escape(str(model_store)) + r"/[^/]+\.mar",
        "disable_token_authorization": "false" if token_auth else "true",
    })
    return props


def write_properties(props: Mapping[str, str], path: Path) -> None:
    """Write a Java properties file (backslashes escaped, as Java reads them)."""
    path.write_text("".join(f"{k}={str(v).replace(chr(92), chr(92) * 2)}\n" for k, v in props.items()))


def resolve_token_auth(host: str, token_auth: bool | None) -> bool:
    """Whether a server on ``host`` requires token keys: as asked, else on unless ``host`` is loopback."""
    if token_auth is None:
        token_auth = host not in LOOPBACK_HOSTS
    if not token_auth and host not in LOOPBACK_HOSTS:
        log.warning("token authorization is off on %s: anyone who reaches it can call the server", host)
    return token_auth


@contextlib.contextmanager
def running_server(model_store: str | Path, host: str = "127.0.0.1", port: int = 8080, workers: int | None = None,
                   run_dir: str | Path | None = None, token_auth: bool | None = None,
                   startup_timeout: float = 180.0) -> Iterator[Server]:
    """Start TorchServe on the archives of ``model_store``, wait until every model has READY workers, stop at exit.

    Args:
        model_store: folder of ``.mar`` archives; all are loaded.
        host: address of the inference and metrics APIs.
        port: inference port; management ``port + 1``, metrics ``port + 2``, gRPC ``port + 3`` and ``+ 4``,
            worker sockets from ``port + 5``; 0 picks a free block.
        workers: workers per model; None keeps the archive's minWorkers/maxWorkers.
        run_dir: folder for logs, TMPDIR, the effective config.properties and token keys; default a new
            temporary folder. One server per run folder (TorchServe keeps its pid file in TMPDIR).
        token_auth: None: on unless ``host`` is loopback.
        startup_timeout: seconds to wait for READY workers.

    Yields:
        The :class:`Server`.
    """
    model_store = Path(model_store).resolve()
    if not model_store.is_dir() or not list(model_store.glob("*.mar")):
        raise FileNotFoundError(f"no .mar archives in {model_store}: build one with `severstal archive`")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if shutil.which("java") is None:
        raise FileNotFoundError("TorchServe needs Java 17 or newer on the PATH (make install, or install openjdk-17-jre-headless)")
    torchserve = Path(sys.executable).with_name("torchserve")
    if not torchserve.is_file():
        raise FileNotFoundError(f"{torchserve} not found: install torchserve==0.12.0 in this environment")
    token_auth = resolve_token_auth(host, token_auth)
    port = port or free_port_block(6, "127.0.0.1" if host in ("0.0.0.0", "::") else host)
    run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="severstal-serve-"))
    run_dir = run_dir.resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "tmp").mkdir(exist_ok=True)
    properties = run_dir / "config.properties"
    write_properties(server_properties(model_store, host, port, token_auth), properties)
    env = {k: v for k, v in os.environ.items() if k != "TS_CONFIG_FILE"}
    env.update(TMPDIR=str(run_dir / "tmp"), TEMP=str(run_dir / "tmp"), LOG_LOCATION=str(run_dir / "logs"),
               METRICS_LOCATION=str(run_dir / "logs"))
    cmd = [str(torchserve), "--start", "--foreground", "--ncs", "--ts-config", str(properties),
           "--model-store", str(model_store)]
    log.info("starting TorchServe on %s:%d (run folder %s)", host, port, run_dir)
    with open(run_dir / "logs" / "torchserve.out", "ab") as out:
        process = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = Server(process, run_dir, host, port, token_auth)
    try:
        _wait_ready(server, startup_timeout, workers)
        yield server
    finally:
        server.stop()


def _wait_ready(server: Server, timeout: float, workers: int | None) -> None:
    """Poll the management API until each model has its workers READY; scale first when ``workers`` is set."""
    import requests

    deadline = time.monotonic() + timeout
    scaled = workers is None
    said = set()
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"TorchServe exited with code {server.process.returncode}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no READY worker after {timeout:.0f} s:\n{server.log_tail()}")
        try:
            headers = server.headers("management")
            names = [m["modelName"] for m in
                     requests.get(f"{server.management_url}/models", headers=headers, timeout=5).json()["models"]]
            if names and not scaled:
                for name in names:
                    requests.put(f"{server.management_url}/models/{name}", headers=headers, timeout=timeout,
                                 params={"min_worker": workers, "max_worker": workers, "synchronous": "false"})
                scaled = True
            ready = {}
            for name in names:
                described = requests.get(f"{server.management_url}/models/{name}", headers=headers, timeout=5).json()[0]
                needed = workers or described["minWorkers"]
                ready[name] = sum(w["status"] == "READY" for w in described["workers"]) >= needed
        except (requests.RequestException, OSError, ValueError, KeyError):
            names, ready = [], {}
        for name in names:
            if name not in said:
                log.info("waiting for a READY worker of %s", name)
                said.add(name)
        if names and all(ready.values()):
            server.models = names
            log.info("READY: %s", ", ".join(server.predictions_url(n) for n in names))
            return
        time.sleep(0.5)


def post_image(url: str, image: str | Path | bytes, headers: Mapping[str, str] | None = None,
               timeout: float = 120.0) -> dict:
    """POST one image to a predictions URL and return its answer (the REST contract's dict).

    Args:
        url: e.g. ``Server.predictions_url()``.
        image: an image file or its bytes, sent as the raw body.
        headers: e.g. ``Server.headers()`` when token authorization is on.

    Raises:
        RuntimeError: the server answered an error; the message is the server's.
    """
    import requests

    body = image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()
    response = requests.post(url, data=body, headers=dict(headers or {}), timeout=timeout)
    if response.status_code != 200:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text or response.reason
        raise RuntimeError(f"{url} answered {response.status_code}: {message}")
    return response.json()


def serve(model_store: str | Path, host: str = "127.0.0.1", port: int = 8080, workers: int | None = None,
          run_dir: str | Path | None = None, token_auth: bool | None = None,
          on_ready: Callable[[Server], None] | None = None) -> int:
    """Run TorchServe in the foreground until SIGTERM or Ctrl-C, then stop it cleanly.

    Args:
        model_store, host, port, workers, run_dir, token_auth: as for :func:`running_server`.
        on_ready: called with the :class:`Server` once its workers are READY (the CLI prints the URLs).

    Returns:
        0 after a requested stop; TorchServe's exit code if it ended by itself.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("serve() handles SIGTERM and must run in the main thread; use running_server() elsewhere")
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with running_server(model_store, host, port, workers, run_dir, token_auth) as server:
            if on_ready:
                on_ready(server)
            while not stop.is_set() and server.process.poll() is None:
                stop.wait(1.0)
            if not stop.is_set():
                log.error("TorchServe exited with code %s:\n%s", server.process.returncode, server.log_tail())
                return server.process.returncode or 1
            log.info("SIGTERM: stopping TorchServe")
    except KeyboardInterrupt:
        log.info("Ctrl-C: TorchServe stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0

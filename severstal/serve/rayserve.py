"""The second server: the model of a TorchServe model store on Ray Serve, on one machine or a Ray cluster.

``severstal serve --engine ray`` reads the same ``.mar`` archives as TorchServe (weights, ``config.yaml``,
thresholds, the manifest and ``model-config.yaml``) and answers the same routes with the same worker
(:mod:`severstal.serve.worker`: decoding, image limits, per-request errors, the one-by-one fallback)::

    POST|PUT /predictions/NAME          the native REST contract (raw body or multipart field ``data``)
    POST     /v2/models/NAME/infer      the Open Inference Protocol (:mod:`severstal.serve.oip`)
    GET      /v2/models/NAME, /v2/models/NAME/ready, /v2, /v2/health/live, /v2/health/ready, /ping

Decisions:

* **Batching** is Ray Serve's ``@serve.batch`` with the archive's ``batchSize`` and ``maxBatchDelay``. It
  hands an exception to every request of the batch, so the batch calls :meth:`ServingModel.predict`, which
  never raises: a bad image fails alone, as on TorchServe.
* **Replicas**: ``replicas`` (default: the archive's ``minWorkers``) of ``cpus`` and ``gpus`` each; with
  ``max_replicas`` Ray Serve autoscales between the two on ongoing requests. A replica's PyTorch threads are
  the handler block's ``threads``, else the node's physical cores (Ray would give one thread per whole CPU
  asked); its environment is :data:`severstal.serve.server.WORKER_ENV`.
* **Where**: a local Ray of this machine (no dashboard), or a cluster's ``address``. The HTTP proxy listens
  on ``host`` (loopback unless told otherwise) on the head node only. The project never opens Ray's
  dashboard or its job API beyond loopback; on a cluster the operator's ``ray start`` decides those.
* **Authentication**: Ray Serve's HTTP proxy has none. As with TorchServe, the server requires a bearer
  key unless it listens on loopback only (:func:`severstal.serve.server.resolve_token_auth`); the key is in
  ``key_file.json`` of the run folder (``{"inference": {"key": ...}}``, TorchServe's shape), and a request
  without it answers 401. Ray itself (the driver joining a cluster) uses Ray's own token authentication.
* **Model files** travel with the deployment (its init arguments), so replicas on other nodes need the same
  Python environment but not the model store.

This module imports Ray; nothing imported by ``import severstal`` imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

try:
    import ray
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError(f"serving on Ray needs Ray Serve: pip install 'severstal[ray]' ({err})") from err

from severstal.serve import PROPERTIES_FILE, RAY_APP, RAY_REPLICA_MARK, oip, torchserve_file
from severstal.serve.server import (
    KEY_FILE,
    WORKER_ENV,
    Endpoint,
    read_properties,
    resolve_token_auth,
    run_until_stopped,
)
from severstal.serve.worker import (
    BACKEND_HEADER,
    BATCH_HEADER,
    BadRequest,
    ServingModel,
    Upload,
    answer,
    fields_from_http,
    read_request,
)

log = logging.getLogger(__name__)

APP_NAME = RAY_APP
MANIFEST = "MAR-INF/MANIFEST.json"
MODEL_CONFIG = "model-config.yaml"
_NOT_MODEL_FILES = {"handler.py", MANIFEST}
REPLICA_HEADER = "X-Severstal-Replica"
"""Response header: the Ray node and replica that answered (``NODE_ID/REPLICA_ID``)."""



# The model store ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredModel:
    """One ``.mar`` archive of a model store, as Ray Serve needs it.

    Attributes:
        name, version: the manifest's ``modelName`` and ``modelVersion`` (the routes' NAME).
        serialized_file: the weights file among ``files`` (the manifest's ``serializedFile``).
        files: file name -> bytes: the weights, the files that go with them (``severstal.model.run.WITH_MODEL``),
            ``model-config.yaml``.
        config: ``model-config.yaml`` (``batchSize``, ``maxBatchDelay`` in ms, ``minWorkers``, ``handler``).
    """

    name: str
    version: str
    serialized_file: str
    files: dict = field(repr=False)
    config: dict

    @property
    def batch_size(self) -> int:
        return int(self.config.get("batchSize", 1))

    @property
    def batch_wait_s(self) -> float:
        return float(self.config.get("maxBatchDelay", 0)) / 1000.0

    @property
    def workers(self) -> int:
        return int(self.config.get("minWorkers", 1))


def read_archive(path: str | Path) -> StoredModel:
    """Read a ``.mar`` archive (a zip file: the model files and ``MAR-INF/MANIFEST.json``)."""
    import yaml

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if MANIFEST not in names:
                raise ValueError(f"{path} has no {MANIFEST}: build it with `severstal archive`")
            manifest = json.loads(archive.read(MANIFEST))["model"]
            files = {n: archive.read(n) for n in names if n not in _NOT_MODEL_FILES and not n.endswith("/")}
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a .mar archive (not a zip file)") from None
    config = yaml.safe_load(files.get(manifest.get("configFile", MODEL_CONFIG), b"")) or {}
    return StoredModel(manifest["modelName"], str(manifest.get("modelVersion", "1.0")), manifest["serializedFile"],
                       files, config)


def read_store(model_store: str | Path, model: str | None = None) -> StoredModel:
    """The archive of ``model_store`` to serve: ``model`` by name, else the only one.

    Raises:
        FileNotFoundError: no archive; ValueError: several and no ``model``, or no archive of that name.
    """
    store = Path(model_store)
    archives = sorted(store.glob("*.mar")) if store.is_dir() else []
    if not archives:
        raise FileNotFoundError(f"no .mar archives in {store}: build one with `severstal archive`")
    models = {m.name: m for m in map(read_archive, archives)}
    if model is None and len(models) == 1:
        return next(iter(models.values()))
    if model not in models:
        raise ValueError(f"model {model!r} is not in {store}; it holds {sorted(models)}: name one with --model")
    return models[model]


def physical_cores() -> int:
    """Physical cores of this machine: PyTorch's own default for its threads."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


# The deployment ----------------------------------------------------------------------------------------


def _json(body: dict, status: int = 200, headers: Mapping | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


class SeverstalReplica:
    """One replica: the model loaded once, every route, batches through ``@serve.batch``.

    Args:
        model: the archive to serve.
        token: the bearer key every request must carry; None: no authentication.
        gpu: whether Ray gave this replica a GPU.
        max_request_size: bodies over this many bytes answer 413 (TorchServe's ``max_request_size``).
    """

    def __init__(self, model: StoredModel, token: str | None, gpu: bool, max_request_size: int):
        import torch

        self.model = model
        self.token = token
        self.max_request_size = max_request_size
        self._folder = tempfile.TemporaryDirectory(prefix="severstal-ray-serve-")
        for name, data in model.files.items():
            target = Path(self._folder.name) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        block = model.config.get("handler") or {}
        self.serving = ServingModel.load(self._folder.name, model.serialized_file, 0 if gpu else None, block)
        if self.serving.settings.threads is None:
            torch.set_num_threads(physical_cores())  # Ray sets OMP_NUM_THREADS to the whole CPUs asked (>= 1)
        replica = f"{ray.get_runtime_context().get_node_id()}/{serve.get_replica_context().replica_id.unique_id}"
        self.answer_headers = {REPLICA_HEADER: replica, BACKEND_HEADER: self.serving.runs}
        self.predict_batch.set_max_batch_size(model.batch_size)
        self.predict_batch.set_batch_wait_timeout_s(model.batch_wait_s)
        log.info("replica ready: %s %s, batches of up to %d within %.0f ms, %d threads", model.name, model.version,
                 model.batch_size, model.batch_wait_s * 1000, torch.get_num_threads())

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
    async def predict_batch(self, items: list) -> list:
        """Predict a batch in one call in a thread (the event loop keeps taking requests); never raises."""
        import torch

        def run():
            with torch.inference_mode():
                return [(result, len(items)) for result in self.serving.predict(items)]

        return await asyncio.to_thread(run)

    def _authorised(self, request: Request) -> bool:
        if self.token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    async def __call__(self, request: Request) -> JSONResponse:
        if not self._authorised(request):
            return _json({"code": 401, "type": "Unauthorized",
                          "message": f"send 'Authorization: Bearer <key>': the key is in the server's {KEY_FILE}"}, 401)
        parts = [p for p in request.url.path.split("/") if p]
        method = request.method
        name = self.model.name
        if parts == ["ping"] and method == "GET":
            return _json({"status": "Healthy"})
        if parts[:1] == ["predictions"] and len(parts) == 2 and method in ("POST", "PUT"):
            if parts[1] != name:
                return _json({"code": 404, "type": "ModelNotFoundException", "message": f"Model not found: {parts[1]}"},
                             404)
            return await self._predict(request, "native")
        if parts[:1] == ["v2"]:
            return await self._v2(request, parts[1:], method)
        return _json({"code": 404, "type": "ResourceNotFoundException",
                      "message": f"no route {method} {request.url.path}: POST /predictions/{name} or "
                                 f"/v2/models/{name}/infer"}, 404)

    async def _v2(self, request: Request, parts: list[str], method: str) -> JSONResponse:
        name = self.model.name
        if method == "GET" and not parts:
            return _json({"name": "severstal on Ray Serve", "version": ray.__version__, "extensions": []})
        if method == "GET" and parts in (["health", "live"], ["health", "ready"]):
            return _json({parts[1]: True})
        if parts[:1] == ["models"] and len(parts) >= 2:
            if parts[1] != name:
                return _json(oip.error_body(f"model {parts[1]!r} not found; this server has {name!r}"), 404)
            rest = parts[2:]
            if rest[:1] == ["versions"] and len(rest) >= 2:
                if rest[1] != self.model.version:
                    return _json(oip.error_body(f"model {name!r} has version {self.model.version!r}, "
                                                f"not {rest[1]!r}"), 404)
                rest = rest[2:]
            if method == "GET" and not rest:
                return _json(oip.model_metadata(name, [self.model.version]))
            if method == "GET" and rest == ["ready"]:
                return _json({"name": name, "ready": True})
            if method == "POST" and rest == ["infer"]:
                return await self._predict(request, "oip")
        return _json(oip.error_body(f"no route {method} /v2/{'/'.join(parts)}"), 404)

    async def _predict(self, request: Request, route: str) -> JSONResponse:
        declared = request.headers.get("content-length", "")
        raw = b"" if declared.isdigit() and int(declared) > self.max_request_size else await request.body()
        size = max(len(raw), int(declared) if declared.isdigit() else 0)
        if size > self.max_request_size:
            upload = Upload(route, BadRequest(f"the request body is {size:,} bytes, over the limit of "
                                              f"{self.max_request_size:,}", 413))
        else:
            fields = fields_from_http(raw, request.headers.get("content-type")) if route == "native" else {"body": raw}
            upload = await asyncio.to_thread(read_request, fields, dict(request.headers), self.serving.limits, 0, route)
        result, batch = upload.item, 1
        if not isinstance(result, BadRequest):
            result, batch = await self.predict_batch(result)
        status, body = answer(upload, result, self.model.name, self.model.version)
        return _json(body, status, {BATCH_HEADER: str(batch), **self.answer_headers})


# The server's life cycle ---------------------------------------------------------------------------------


@dataclass
class RayServer(Endpoint):
    """A running Ray Serve application started by :func:`running_ray_server` (the shape of ``server.Server``).

    Attributes:
        host, port: where the HTTP proxy listens.
        run_dir: holds ``key_file.json`` when ``token_auth``.
        models: the served model's name (one).
        replicas: replicas asked for.
    """

    host: str
    port: int
    run_dir: Path
    token_auth: bool
    models: list[str]
    replicas: int
    started_ray: bool = True
    engine: str = "ray"

    def worker_pids(self) -> list[int]:
        """PIDs of this machine's live replica processes (:data:`severstal.serve.RAY_REPLICA_MARK`)."""
        return sorted(p.pid for p in ray_processes(RAY_REPLICA_MARK))


def ray_processes(mark: str) -> list:
    """This machine's processes (``psutil.Process``) whose title starts with ``mark``."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith(mark):
            found.append(proc)
    return found


def _max_request_size() -> int:
    return int(read_properties(torchserve_file(PROPERTIES_FILE)).get("max_request_size", 20 * 2**20))


def build_app(model: StoredModel, *, replicas: int | None = None, max_replicas: int | None = None,
              cpus: float = 1.0, gpus: float = 0.0, token: str | None = None):
    """The Ray Serve application of ``model``: the deployment with its replicas, resources and batching.

    Args:
        model: from :func:`read_store`.
        replicas: replicas (default: the archive's ``minWorkers``); the least when autoscaling.
        max_replicas: autoscale between ``replicas`` and this on ongoing requests; None: a fixed number.
        cpus, gpus: Ray resources each replica asks for (fractions allowed).
        token: the bearer key requests must carry; None: none.
    """
    replicas = model.workers if replicas is None else replicas
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise ValueError(f"replicas must be >= 1 and max_replicas >= replicas, got {replicas}, {max_replicas}")
    if cpus <= 0 or gpus < 0:
        raise ValueError(f"cpus per replica must be > 0 and gpus >= 0, got {cpus}, {gpus}")
    options: dict = {
        "name": APP_NAME,
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus, "runtime_env": {"env_vars": dict(WORKER_ENV)}},
        # A replica holds one full batch; further requests wait in Ray Serve's router for the first replica with
        # room. The router prefers replicas on the proxy's node while they have room, so a larger value would keep
        # a second node idle until the first node's replica had that many requests queued.
        "max_ongoing_requests": model.batch_size,
        "health_check_period_s": 2.0,
    }
    if max_replicas is None:
        options["num_replicas"] = replicas
    else:
        options["autoscaling_config"] = {"min_replicas": replicas, "initial_replicas": replicas,
                                         "max_replicas": max_replicas, "target_ongoing_requests": model.batch_size}
    deployment = serve.deployment(SeverstalReplica).options(**options)
    return deployment.bind(model, token, gpus > 0, _max_request_size())


TOKEN_ENV = "SEVERSTAL_SERVE_TOKEN"
"""Environment variable of the bearer key for :func:`app` (on Kubernetes: from a Secret)."""


def app(args: Mapping):
    """Ray Serve's application builder for a config file (``serve run`` / ``serve deploy``, KubeRay's
    ``serveConfigV2``): ``import_path: severstal.serve.rayserve:app`` with ``args``.

    Args:
        args: ``model_store`` (a folder of ``.mar`` archives where the builder runs: the head node), and
            optionally ``model``, ``replicas``, ``max_replicas``, ``cpus``, ``gpus`` as for :func:`build_app`.
            The bearer key comes from ``$SEVERSTAL_SERVE_TOKEN`` (:data:`TOKEN_ENV`); without it requests need none.
    """
    allowed = {"model_store", "model", "replicas", "max_replicas", "cpus", "gpus"}
    unknown = sorted(set(args) - allowed)
    if unknown or "model_store" not in args:
        raise ValueError(f"severstal Ray Serve args: unknown {unknown}; allowed {sorted(allowed)} (model_store needed)")
    options = {k: args[k] for k in ("replicas", "max_replicas", "cpus", "gpus") if k in args}
    return build_app(read_store(args["model_store"], args.get("model")), token=os.environ.get(TOKEN_ENV) or None,
                     **options)


@contextlib.contextmanager
def running_ray_server(model_store: str | Path, host: str = "127.0.0.1", port: int = 8080, *,
                       model: str | None = None, replicas: int | None = None, max_replicas: int | None = None,
                       cpus: float = 1.0, gpus: float = 0.0, address: str | None = None,
                       run_dir: str | Path | None = None, token_auth: bool | None = None,
                       num_cpus: int | None = None, startup_timeout: float = 300.0) -> Iterator[RayServer]:
    """Serve a model of ``model_store`` on Ray Serve until the block ends, then shut the application down.

    Args:
        model_store: folder of ``.mar`` archives (the same as TorchServe's).
        host, port: the HTTP proxy's address; port 0 picks a free one.
        model: the archive's model name when the store holds several.
        replicas, max_replicas, cpus, gpus: see :func:`build_app`.
        address: None or "local": a Ray of this machine for this server (stopped after); "auto" or
            ``HOST:PORT``: a running cluster (left running; the application is deleted at the end).
        run_dir: folder for ``key_file.json``; default a new temporary folder.
        token_auth: None: on unless ``host`` is loopback.
        num_cpus: CPUs of a local Ray (default: this machine's).
        startup_timeout: seconds to wait for the replicas.
    """
    from severstal.model.predict_ray import connect
    from severstal.serve.server import free_port_block

    stored = read_store(model_store, model)
    token_auth = resolve_token_auth(host, token_auth)
    run_dir = Path(run_dir or tempfile.mkdtemp(prefix="severstal-ray-serve-")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    token = None
    if token_auth:
        token = secrets.token_urlsafe(24)
        key_file = run_dir / KEY_FILE
        key_file.write_text(json.dumps({"inference": {"key": token}}))
        key_file.chmod(0o600)
    port = port or free_port_block(1, "127.0.0.1" if host in ("0.0.0.0", "::") else host)
    started = connect(address, num_cpus=num_cpus)
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        app = build_app(stored, replicas=replicas, max_replicas=max_replicas, cpus=cpus, gpus=gpus, token=token)
        log.info("starting %s on Ray Serve at %s:%d", stored.name, host, port)
        deadline = time.monotonic() + startup_timeout
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        _wait_running(deadline)
        server = RayServer(host, port, run_dir, token_auth, [stored.name], replicas or stored.workers, started)
        log.info("READY: %s", server.predictions_url(stored.name))
        yield server
    finally:
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        if started:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()


def _wait_running(deadline: float) -> None:
    """Wait until the application is RUNNING; fail with its message when it cannot deploy."""
    from ray.serve.schema import ApplicationStatus

    while True:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"Ray Serve could not deploy {APP_NAME}: {status.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the replicas were not running in time: {status}")
        time.sleep(0.5)


def serve_ray(model_store: str | Path, on_ready: Callable[[RayServer], None] | None = None, **kwargs) -> int:
    """Run :func:`running_ray_server` in the foreground until SIGTERM or Ctrl-C.

    Args:
        model_store, kwargs: as for :func:`running_ray_server`.
        on_ready: called with the :class:`RayServer` once its replicas run (the CLI prints the URLs).

    Returns:
        0 after a requested stop.
    """
    return run_until_stopped(running_ray_server(model_store, **kwargs), "Ray Serve", on_ready)

"""The server's life cycle: start TorchServe on a model store, wait for READY workers, stop it cleanly.

Decisions:

* **Listeners** are on 127.0.0.1 unless ``host`` says otherwise; ``host`` moves the inference and metrics
  APIs only: the management API and gRPC (which TorchServe cannot switch off) stay on loopback.
* **Token authorization** is on unless the server listens on loopback only (``token_auth=None``); the keys
  are in ``key_file.json`` in the run folder. **Model API** (register/delete over REST) is off: a server
  serves the archives of its model store, loaded at start; scaling workers stays possible.
* **One server per run folder**: TorchServe keeps its pid file in TMPDIR, so each server gets its own.
* **The workers' environment** (:data:`WORKER_ENV`): TorchServe's workers inherit the frontend's environment,
  so the variables that must be set before PyTorch loads (OpenMP's wait policy, glibc's malloc arenas) are
  set on the server's process; a value already in the environment wins.
"""

from __future__ import annotations

import contextlib
import importlib.util
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from severstal.serve import PROPERTIES_FILE, torchserve_file
from severstal.serve.client import bearer_headers

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WORKER_ENV = {
    # OpenMP threads sleep when idle instead of spinning for ~200 ms: a worker waiting for its next batch
    # (or two workers taking turns) leaves the cores to the frontend and the other worker.
    "OMP_WAIT_POLICY": "PASSIVE",
    # glibc gives threads that allocate at the same time arenas of their own (up to 8 per core), each of
    # which keeps freed memory fragmented and resident; PyTorch's intra-op threads all allocate. Two arenas
    # bound what a worker can hold that way, at no measured cost (severstal bench soak; docs/troubleshooting.md).
    "MALLOC_ARENA_MAX": "2",
}
"""Environment of the server and so of its workers; values already in the environment win."""
KEY_FILE = "key_file.json"
"""Where TorchServe writes its token keys: the working directory of the server (its run folder)."""


class Endpoint:
    """What a client needs of a running server, TorchServe or Ray Serve: its URLs and its token key.

    Needs the attributes ``host``, ``port`` (inference), ``run_dir`` (holding ``key_file.json``) and ``token_auth``.
    """

    host: str
    port: int
    run_dir: Path
    token_auth: bool

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host

    @property
    def inference_url(self) -> str:
        return f"http://{self._client_host}:{self.port}"

    def predictions_url(self, model: str = "severstal") -> str:
        return f"{self.inference_url}/predictions/{model}"

    @property
    def key_file(self) -> Path:
        return self.run_dir / KEY_FILE

    def headers(self, api: str = "inference") -> dict:
        """The ``Authorization`` header for ``api`` ("inference" or "management"); empty without token auth."""
        if not self.token_auth:
            return {}
        return bearer_headers(json.loads(self.key_file.read_text())[api]["key"])


@dataclass
class Server(Endpoint):
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
    engine: str = "torchserve"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.port + 1}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.port + 2}/metrics"

    @property
    def java_pid(self) -> int | None:
        """The Java frontend's PID, from TorchServe's pid file in the server's TMPDIR."""
        pid_file = self.run_dir / "tmp" / ".model_server.pid"
        return int(pid_file.read_text().split()[0]) if pid_file.is_file() else None

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

    def worker_pids(self) -> list[int]:
        """PIDs of the Python workers (each holds a copy of the model)."""
        return sorted(p.pid for p in self.processes() if "model_service_worker" in " ".join(p.cmdline()))

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
    props = read_properties(torchserve_file(PROPERTIES_FILE))
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
        raise FileNotFoundError("TorchServe needs Java 17 or newer on the PATH "
                                "(make install, or install openjdk-17-jre-headless)")
    if importlib.util.find_spec("ts") is None:
        raise FileNotFoundError(f"TorchServe is not installed for {sys.executable}: pip install torchserve==0.12.0")
    token_auth = resolve_token_auth(host, token_auth)
    port = port or free_port_block(6, "127.0.0.1" if host in ("0.0.0.0", "::") else host)
    run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="severstal-serve-"))
    run_dir = run_dir.resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "tmp").mkdir(exist_ok=True)
    properties = run_dir / "config.properties"
    write_properties(server_properties(model_store, host, port, token_auth), properties)
    env = {**WORKER_ENV, **{k: v for k, v in os.environ.items() if k != "TS_CONFIG_FILE"}}
    env.update(TMPDIR=str(run_dir / "tmp"), TEMP=str(run_dir / "tmp"), LOG_LOCATION=str(run_dir / "logs"),
               METRICS_LOCATION=str(run_dir / "logs"))
    # TorchServe's own launcher, run by this interpreter: its workers then use this interpreter and its severstal.
    cmd = [sys.executable, "-m", "ts.model_server", "--start", "--foreground", "--ncs", "--ts-config", str(properties),
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
    def exited(server: Server) -> int | None:
        if server.process.poll() is None:
            return None
        log.error("TorchServe exited with code %s:\n%s", server.process.returncode, server.log_tail())
        return server.process.returncode or 1

    return run_until_stopped(running_server(model_store, host, port, workers, run_dir, token_auth), "TorchServe",
                             on_ready, exited)


def run_until_stopped(server_context, name: str, on_ready: Callable | None = None,
                      exited: Callable | None = None) -> int:
    """Run a server in the foreground until SIGTERM or Ctrl-C, then leave its context (which stops it cleanly).

    Args:
        server_context: a context manager yielding the running server (``running_server(...)``).
        name: the server's name, for the log.
        on_ready: called with the server once it is ready.
        exited: called every second with the server: None while it runs, its exit code once it ended by itself.

    Returns:
        0 after a requested stop, else what ``exited`` returned.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(f"serving {name} handles SIGTERM and must run in the main thread; use its context "
                           "manager elsewhere")
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with server_context as server:
            # Again once the server runs: ray.init installs a SIGTERM handler of its own that aborts the process.
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            if on_ready:
                on_ready(server)
            while not stop.is_set():
                code = exited(server) if exited else None
                if code is not None:
                    return code
                stop.wait(1.0)
            log.info("SIGTERM: stopping %s", name)
    except KeyboardInterrupt:
        log.info("Ctrl-C: %s stopped", name)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0

"""Benchmark ``soak``: many clients for a long time against a running server (TorchServe or Ray Serve) on this machine.

Clients post real images through the package's client (:func:`severstal.serve.client.post_image`, with its
retries) in a loop bounded in time and in count, while a sampler reads the resident memory of the server's
whole process tree (TorchServe: the Java frontend and its Python workers; Ray Serve: the HTTP proxy and the
replicas) from ``/proc`` through psutil. The server must run on this machine (a loopback URL): its processes
are found from the port it listens on.

It answers the questions of a long run: do errors appear (by status), how do p50/p95/p99 and throughput
hold, and does the worker's memory keep growing (``worker_growth``: the mean of the second window, a minute
on a long soak, against the last one). ``kill_worker_at`` SIGKILLs a worker during the run and reports what
the server failed (answers the client retried), what the client lost (requests it gave up on) and the time
until answers came back.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from severstal.bench import latency_stats
from severstal.data.annotations import list_images
from severstal.serve import RAY_PROXY_MARK, RAY_REPLICA_MARK
from severstal.serve.client import PredictionError, post_image

log = logging.getLogger(__name__)

WORKER_MARK = "model_service_worker"
"""In the command line of every TorchServe Python worker."""
FRONTEND_MARK = "org.pytorch.serve.ModelServer"
"""In the command line of TorchServe's Java frontend."""


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def server_processes(url: str) -> list:
    """The processes of the server of ``url``: TorchServe's Java frontend and every descendant, or Ray Serve's
    HTTP proxy and the application's replicas.

    Args:
        url: a loopback URL of the server (any of its APIs).

    Raises:
        ValueError: ``url`` is not on loopback, or no TorchServe frontend listens on its port.
    """
    import psutil

    parts = urlsplit(url)
    host = parts.hostname or ""
    if not _is_loopback(host):
        raise ValueError(f"{url}: the soak reads the server's memory from its processes, so the server must run on "
                         "this machine: use a loopback URL (127.0.0.1, localhost, ::1)")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for conn in psutil.net_connections("inet"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            frontend = psutil.Process(conn.pid)
            cmdline = " ".join(frontend.cmdline())
            if cmdline.startswith(RAY_PROXY_MARK):
                replicas = [p for p in psutil.process_iter(["cmdline"])
                            if " ".join(p.info["cmdline"] or []).startswith(RAY_REPLICA_MARK)]
                return [frontend, *replicas]
            if FRONTEND_MARK not in cmdline:
                raise ValueError(f"{url}: the process listening on port {port} ({frontend.name()}, PID {frontend.pid}) "
                                 "is neither a TorchServe frontend nor a Ray Serve proxy")
            return [frontend, *frontend.children(recursive=True)]
    raise ValueError(f"{url}: nothing listens on port {port} of this machine (is the server running?)")


def memory_sample(url: str) -> dict:
    """Resident memory of the server's process tree now, in MB: frontend, workers (summed), all, worker PIDs."""
    import psutil

    frontend = workers = total = 0.0
    pids = []
    for proc in server_processes(url):
        try:
            rss = proc.memory_info().rss / 2**20
            cmdline = " ".join(proc.cmdline())
        except psutil.Error:  # a worker that ended between listing and reading
            continue
        total += rss
        if FRONTEND_MARK in cmdline or cmdline.startswith(RAY_PROXY_MARK):
            frontend += rss
        elif WORKER_MARK in cmdline or cmdline.startswith(RAY_REPLICA_MARK):
            workers += rss
            pids.append(proc.pid)
    return {"frontend_mb": round(frontend, 1), "workers_mb": round(workers, 1), "total_mb": round(total, 1),
            "worker_pids": sorted(pids)}


def _window_mean(samples: list[dict], key: str, start: float, end: float) -> float | None:
    values = [s[key] for s in samples if start <= s["t"] < end]
    return sum(values) / len(values) if values else None


def memory_growth(samples: list[dict], duration: float, key: str = "workers_mb") -> dict:
    """Growth of ``key`` from the second window of the run to the last one.

    A window is 60 s when the run lasts at least 3 minutes (the second minute against the last minute),
    else a fifth of the run; the first window (loading, the first batches) is left out.

    Returns:
        ``{"window_s", "from_mb", "to_mb", "percent"}``; the means are None when a window holds no sample.
    """
    window = 60.0 if duration >= 180 else duration / 5
    first = _window_mean(samples, key, window, 2 * window)
    last = _window_mean(samples, key, duration - window, duration + 1e-9)
    percent = 100.0 * (last - first) / first if first and last is not None else None
    return {"window_s": window, "from_mb": first, "to_mb": last, "percent": percent}


def soak(url: str, images_dir: str | Path, concurrency: int = 8, duration: float = 60.0,
         max_requests: int | None = None, headers: dict | None = None, timeout: float = 120.0,
         sample_every: float = 5.0, retries: int = 5, kill_worker_at: float | None = None) -> dict:
    """Post real images from ``concurrency`` clients for ``duration`` seconds and watch the server's memory.

    Args:
        url: the predictions URL of a server on this machine, e.g. ``http://127.0.0.1:8080/predictions/severstal``.
        images_dir: folder of JPEG/PNG images, posted in turn.
        concurrency: clients posting at the same time (one connection each).
        duration: seconds; no request starts after it.
        max_requests: stop after this many requests too (None: time only).
        headers: extra request headers (``Authorization`` when token authorization is on).
        timeout: seconds per try.
        sample_every: seconds between memory samples.
        retries: the client's retries (:func:`post_image`).
        kill_worker_at: SIGKILL one worker this many seconds into the run; None: no kill.

    Returns:
        ``{"benchmark": "soak", "url", "concurrency", "duration_s", "requests", "ok", "errors",
        "error_statuses" (final outcome -> count), "retried" (what the client retried -> count),
        "latency" (:func:`severstal.bench.latency_stats` of the answered requests, retries included, or None),
        "requests_per_s", "memory" (samples: ``t`` seconds and :func:`memory_sample`), "worker_growth",
        "total_growth" (:func:`memory_growth`), "load_average" (1, 5, 15 min at the end), "kill" (None, or
        ``{"at_s", "pid", "failed_at_server", "lost_by_client", "answers_back_after_s", "new_worker_pids"}``)}``.

    Raises:
        ValueError: a URL off this machine, bad bounds, or no images.
    """
    import requests as http

    if concurrency < 1 or duration <= 0 or (max_requests is not None and max_requests < 1) or sample_every <= 0:
        raise ValueError(f"concurrency >= 1, duration > 0, max_requests >= 1 and sample_every > 0 needed, got "
                         f"{concurrency}, {duration}, {max_requests}, {sample_every}")
    paths = [Path(images_dir) / name for name in list_images(images_dir)]
    if not paths:
        raise FileNotFoundError(f"no images in {images_dir}")
    bodies = [p.read_bytes() for p in paths]
    memory_sample(url)  # fails early when the server is not on this machine
    lock = threading.Lock()
    issued = 0
    outcomes: list[tuple[float, float, str]] = []  # (start, end, status) per request, seconds into the run
    retried: Counter = Counter()
    retried_after_kill: Counter = Counter()
    samples: list[dict] = []
    kill: dict | None = None
    begin = time.monotonic()
    deadline = begin + duration
    stop = threading.Event()

    def next_index() -> int | None:
        nonlocal issued
        with lock:
            if time.monotonic() >= deadline or (max_requests is not None and issued >= max_requests):
                return None
            issued += 1
            return issued - 1

    def on_retry(reason: str, _attempt: int) -> None:
        with lock:
            retried[reason] += 1
            if kill is not None:
                retried_after_kill[reason] += 1

    def client() -> None:
        session = http.Session()
        while (index := next_index()) is not None:
            start = time.monotonic()
            try:
                answer = post_image(url, bodies[index % len(bodies)], headers, timeout, retries=retries,
                                    session=session, on_retry=on_retry)
                status = "200" if {"height", "width", "defects", "classes"} <= set(answer) else "200 malformed"
            except PredictionError as err:
                status = str(err.status) if err.status else type(err.__cause__).__name__
            except (http.RequestException, ValueError) as err:
                status = type(err).__name__
            with lock:
                outcomes.append((start - begin, time.monotonic() - begin, status))

    def sampler() -> None:
        nonlocal kill
        killed = False
        while True:
            now = time.monotonic() - begin
            try:
                samples.append({"t": round(now, 2), **memory_sample(url)})
            except ValueError as err:  # the frontend went away: the soak reports what it has
                log.warning("memory sample failed: %s", err)
            if kill_worker_at is not None and not killed and now >= kill_worker_at:
                killed = True
                pids = samples[-1]["worker_pids"] if samples else []
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    with lock:
                        kill = {"at_s": round(time.monotonic() - begin, 2), "pid": pids[0]}
                    log.info("killed worker %d at %.1f s", pids[0], kill["at_s"])
            wait = sample_every
            if kill_worker_at is not None and not killed:
                wait = min(wait, max(kill_worker_at - now, 0.05))
            if stop.wait(wait):
                break
        samples.append({"t": round(time.monotonic() - begin, 2), **memory_sample(url)})

    watcher = threading.Thread(target=sampler, name="soak-memory", daemon=True)
    watcher.start()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="soak-client") as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    wall = time.monotonic() - begin
    stop.set()
    watcher.join()
    statuses = Counter(status for _, _, status in outcomes)
    answered = [end - start for start, end, status in outcomes if status == "200"]
    result = {
        "benchmark": "soak",
        "url": url,
        "images": len(paths),
        "concurrency": concurrency,
        "duration_s": round(wall, 2),
        "requests": len(outcomes),
        "ok": statuses.get("200", 0),
        "errors": len(outcomes) - statuses.get("200", 0),
        "error_statuses": {s: n for s, n in statuses.items() if s != "200"},
        "retried": dict(retried),
        "latency": latency_stats(answered, wall) if answered else None,
        "requests_per_s": len(answered) / wall,
        "memory": samples,
        "worker_growth": memory_growth(samples, wall, "workers_mb"),
        "total_growth": memory_growth(samples, wall, "total_mb"),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "kill": None,
    }
    if kill is not None:
        back = [end for start, end, status in outcomes if status == "200" and end > kill["at_s"]]
        lost = [status for start, end, status in outcomes if status != "200" and end > kill["at_s"]]
        new_pids = sorted({pid for s in samples if s["t"] > kill["at_s"] for pid in s["worker_pids"]} - {kill["pid"]})
        result["kill"] = {**kill, "failed_at_server": sum(retried_after_kill.values()),
                          "failed_statuses": dict(retried_after_kill), "lost_by_client": len(lost),
                          "answers_back_after_s": round(min(back) - kill["at_s"], 2) if back else None,
                          "new_worker_pids": new_pids}
    return result

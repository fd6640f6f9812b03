"""Benchmark ``serve``: a running server (TorchServe or Ray Serve, either route) loaded with real images, against
the bare model on the same images."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from severstal.bench import WARMUP_REQUESTS, latency_stats
from severstal.data.annotations import list_images
from severstal.data.images import decode_image
from severstal.serve.client import PredictionError, post_image

ANSWER_KEYS = {"height", "width", "defects", "classes"}
"""What every answer of the REST contract holds."""


def _latency_row(method: str, seconds, wall: float) -> dict:
    """One side of :func:`bench_serve`: its label and :func:`severstal.bench.latency_stats`."""
    if not len(seconds):
        return {"method": method, "n": 0, **dict.fromkeys(("p50", "p95", "p99", "mean"), float("nan")),
                "images_per_s": 0.0}
    return {"method": method, **latency_stats(seconds, wall)}


def server_label(url: str, timeout: float = 10.0) -> str:
    """What serves ``url``, from the Open Inference Protocol's server metadata (``GET /v2``): "TorchServe",
    "Ray Serve", else "server"."""
    import requests as http

    parts = urlsplit(url)
    try:
        name = http.get(f"{parts.scheme}://{parts.netloc}/v2", timeout=timeout).json().get("name", "")
    except (http.RequestException, ValueError, AttributeError):
        return "server"
    return "TorchServe" if name.lower() == "torchserve" else "Ray Serve" if "Ray Serve" in name else "server"


def bench_serve(url: str, images_dir: str | Path, concurrency: int = 4, requests: int = 100,
                weights: str | Path | None = None, headers: dict | None = None, timeout: float = 300.0,
                rounds: int = 5, label: str | None = None, warmup: int = WARMUP_REQUESTS) -> dict:
    """Load a running server with real images and time the bare model on the same images.

    The server side posts ``requests`` images (cycling through the folder) from ``concurrency`` clients after
    ``warmup`` untimed ones from one client (:data:`severstal.bench.WARMUP_REQUESTS`); a request counts as an error
    unless it answers 200 with the REST contract's keys. The bare side is ``decode_image`` +
    ``Predictor.predict([image])``, one image at a time: the handler's work minus serving. The two sides alternate
    in ``rounds`` (served part, then bare part, with the server idle), so both see the same load from other
    processes on a shared machine. ``overhead`` (served p50 / bare p50) measures serving at ``concurrency`` 1; with
    more clients the latency includes queueing and ``throughput_ratio`` (served images/s / bare images/s) is the
    number to read. The server's workers run with ``OMP_WAIT_POLICY=PASSIVE``
    (``severstal.serve.server.WORKER_ENV``); for a like-for-like bare side set it in the benchmark's environment too
    (the result records it).

    Args:
        url: the model URL, e.g. ``http://127.0.0.1:8080/predictions/severstal`` or, for the Open Inference
            Protocol, ``http://127.0.0.1:8080/v2/models/severstal/infer`` (both servers answer both).
        images_dir: folder of JPEG/PNG images.
        concurrency: clients posting at the same time.
        requests: timed requests in all (and as many bare predictions).
        weights: a weights file or run folder for the bare side; None skips it.
        headers: extra request headers (``Authorization`` when token authorization is on).
        timeout: seconds per request.
        rounds: served/bare alternations.
        label: the served row's name; None: :func:`server_label`.
        warmup: untimed requests first, one client (at least 1).

    Returns:
        ``{"benchmark": "serve", "url", "images", "concurrency", "requests", "warmup", "errors", "error_statuses",
        "rows": [served row, bare row (with weights)], "overhead", "throughput_ratio", "load_average",
        "omp_wait_policy"}`` (``load_average``: 1, 5 and 15 minutes at the end, as ``uptime`` shows it); a row is
        ``{"method", "p50", "p95", "p99", "mean", "images_per_s"}`` (seconds, images per second).
    """
    import requests as http

    paths = [Path(images_dir) / name for name in list_images(images_dir)[:requests]]
    if not paths:
        raise FileNotFoundError(f"no images in {images_dir}")
    if min(concurrency, requests, rounds, warmup) < 1:
        raise ValueError(f"concurrency, requests, rounds and warmup must be >= 1, got {concurrency}, {requests}, "
                         f"{rounds}, {warmup}")
    bodies = [p.read_bytes() for p in paths]
    local = threading.local()

    def post(index: int) -> tuple[float, str]:
        session = getattr(local, "session", None) or http.Session()
        local.session = session
        start = time.perf_counter()
        try:
            answer = post_image(url, bodies[index % len(bodies)], headers, timeout, retries=0, session=session)
            status = "200" if ANSWER_KEYS <= set(answer) else "200 without the contract's keys"
        except PredictionError as err:
            status = str(err.status or type(err.__cause__).__name__)
        except (http.RequestException, ValueError) as err:
            status = type(err).__name__
        return time.perf_counter() - start, status

    predictor = None
    if weights is not None:
        from severstal.model.predict import Predictor  # torch: only for the bare side

        predictor = Predictor.from_weights(weights)
        predictor.predict([decode_image(bodies[0])])
    for index in range(warmup):
        post(index)
    results, served_wall, bare_seconds = [], 0.0, []
    bounds = np.linspace(0, requests, min(rounds, requests) + 1).astype(int)
    with ThreadPoolExecutor(concurrency) as pool:
        for first, last in zip(bounds[:-1], bounds[1:]):
            start = time.perf_counter()
            results += pool.map(post, range(first, last))
            served_wall += time.perf_counter() - start
            if predictor is None:
                continue
            for index in range(first, last):
                begin = time.perf_counter()
                predictor.predict([decode_image(bodies[index % len(bodies)])])
                bare_seconds.append(time.perf_counter() - begin)
    statuses = Counter(status for _, status in results)
    served = _latency_row(label or server_label(url), [s for s, status in results if status == "200"], served_wall)
    rows, overhead, throughput_ratio = [served], None, None
    if predictor is not None:
        bare = _latency_row("bare Predictor.predict", bare_seconds, sum(bare_seconds))
        rows.append(bare)
        overhead = served["p50"] / bare["p50"]
        throughput_ratio = served["images_per_s"] / bare["images_per_s"]
    return {
        "benchmark": "serve",
        "url": url,
        "images": len(paths),
        "concurrency": concurrency,
        "requests": requests,
        "warmup": warmup,
        "errors": requests - statuses.get("200", 0),
        "error_statuses": {s: n for s, n in statuses.items() if s != "200"},
        "rows": rows,
        "overhead": overhead,
        "throughput_ratio": throughput_ratio,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }

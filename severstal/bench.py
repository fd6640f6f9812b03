"""Benchmarks: each a function that returns a result dict; :func:`format_table` prints rows of them.

``convert``: Kaggle RLE masks to COCO instances (:func:`bench_convert`), the run-based conversion of
:mod:`severstal.instances` against the straightforward pixel pipeline on the same masks, checking that
both give identical instances.

``predict``: the prediction backends (:func:`bench_predict`), PyTorch against ONNX Runtime (and TensorRT
on a GPU) on the same images, batches and shared pre- and post-processing, end to end and network alone,
checking that their masks agree.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_util

from severstal.annotations import read_train_csv
from severstal.instances import DEFAULT_CONNECTIVITY, rles_to_instances
from severstal.rle import SHAPE

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "severstal-real"
REAL_TRAIN_CSV = REAL_DATA / "train_partial_newformat.csv"
"""The 4,908 real masks beside the repository (``../shared/data/severstal-real``), when present."""


def real_train_csv() -> Path:
    """The real masks' CSV beside the repository.

    Raises:
        FileNotFoundError: it is not there; the message says to pass a CSV.
    """
    if not REAL_TRAIN_CSV.is_file():
        raise FileNotFoundError(f"no real data at {REAL_TRAIN_CSV}: pass --csv TRAIN_CSV")
    return REAL_TRAIN_CSV


def decode_with_loop(rle: str, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """The straightforward decoder of most Severstal notebooks (a Python loop over runs).

    Only the baseline of :func:`bench_convert`: the package decodes with :func:`severstal.rle.rle_to_mask`.

    Returns:
        ``(height, width) uint8`` mask (a column-major view).
    """
    height, width = shape
    flat = np.zeros(height * width, np.uint8)
    values = [int(v) for v in rle.split()]
    for start, length in zip(values[0::2], values[1::2]):
        flat[start - 1 : start - 1 + length] = 1
    return flat.reshape(width, height).T


def pixel_instances(
    rle: str, class_id: int, shape: tuple[int, int] = SHAPE, connectivity: int = DEFAULT_CONNECTIVITY
) -> list[dict]:
    """The pixel pipeline: decode (:func:`decode_with_loop`), ``cv2.connectedComponents``, then
    ``pycocotools.mask.encode`` per component; records as :func:`severstal.instances.rles_to_instances`."""
    mask = np.ascontiguousarray(decode_with_loop(rle, shape))
    n_labels, labels = cv2.connectedComponents(mask, connectivity=connectivity)
    instances = []
    for label in range(1, n_labels):
        encoded = mask_util.encode(np.asfortranarray(labels == label, dtype=np.uint8))
        instances.append(
            {
                "segmentation": {"size": list(shape), "counts": encoded["counts"].decode("ascii")},
                "bbox": [int(v) for v in mask_util.toBbox(encoded)],
                "area": int(mask_util.area(encoded)),
                "category_id": class_id - 1,
            }
        )
    return instances


def _median_seconds(func: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls, and the result of the last one."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _canonical(instances: list[dict]) -> list[dict]:
    """Instances in one order (the two pipelines number components differently)."""
    return sorted(instances, key=lambda inst: inst["segmentation"]["counts"])


def bench_convert(csv: str | Path, repeats: int = 3, limit: int | None = None) -> dict:
    """Time Kaggle RLE -> COCO instances, run-based vs pixel pipeline, on the masks of a CSV.

    Both run on one core (OpenCV's threads are set to 1 for the run, then restored), on the same masks
    already read into memory; reading and validating the CSV is timed on its own.

    Args:
        csv: a ``train.csv`` in either format (default in the CLI: the 4,908 real masks).
        repeats: timed repetitions of each pipeline; the median counts.
        limit: use only the first ``limit`` masks.

    Returns:
        ``{"benchmark": "convert", "csv", "masks", "instances", "repeats", "read_seconds",
        "identical": bool, "mismatched_masks": int, "rows": [{"method", "seconds", "masks_per_s"}, ...],
        "speedup": float}`` where ``rows[0]`` is the run-based conversion and ``rows[1]`` the pixel one.
    """
    start = time.perf_counter()
    frame = read_train_csv(csv)
    read_seconds = time.perf_counter() - start
    if limit is not None:
        frame = frame.iloc[:limit]
    rles, class_ids = frame["EncodedPixels"].tolist(), frame["ClassId"].tolist()
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        fast_seconds, fast = _median_seconds(lambda: rles_to_instances(rles, class_ids), repeats)
        pixel_seconds, pixel = _median_seconds(
            lambda: [pixel_instances(r, c) for r, c in zip(rles, class_ids)], repeats
        )
    finally:
        cv2.setNumThreads(threads)
    mismatched = sum(_canonical(a) != _canonical(b) for a, b in zip(fast, pixel))
    n = len(rles)
    return {
        "benchmark": "convert",
        "csv": str(csv),
        "masks": n,
        "instances": sum(map(len, fast)),
        "repeats": repeats,
        "read_seconds": read_seconds,
        "identical": mismatched == 0,
        "mismatched_masks": mismatched,
        "rows": [
            {"method": "runs (severstal.instances)", "seconds": fast_seconds, "masks_per_s": n / fast_seconds},
            {"method": "pixels (loop decode, cv2, pycocotools)", "seconds": pixel_seconds,
             "masks_per_s": n / pixel_seconds},
        ],
        "speedup": pixel_seconds / fast_seconds,
    }


def _latency_row(method: str, seconds: Sequence[float], wall: float) -> dict:
    """Latency percentiles (s) and throughput of one side of :func:`bench_serve`."""
    values = np.asarray(seconds, dtype=float)
    p50, p95, p99 = (float(np.percentile(values, q)) for q in (50, 95, 99)) if len(values) else (float("nan"),) * 3
    return {"method": method, "p50": p50, "p95": p95, "p99": p99,
            "mean": float(values.mean()) if len(values) else float("nan"), "images_per_s": len(values) / wall}


def bench_serve(url: str, images_dir: str | Path, concurrency: int = 4, requests: int = 100,
                weights: str | Path | None = None, headers: dict | None = None, timeout: float = 300.0,
                rounds: int = 5) -> dict:
    """Load a running TorchServe with real images and time the bare model on the same images.

    The server side posts ``requests`` images (cycling through the folder) from ``concurrency`` clients
    after one untimed warm-up request; a request counts as an error unless it answers 200 with the REST
    contract's keys. The bare side is ``decode_image`` + ``Predictor.predict([image])``, one image at a
    time: the handler's work minus serving. The two sides alternate in ``rounds`` (served part, then bare
    part, with the server idle), so both see the same load from other processes on a shared machine.
    ``overhead`` (served p50 / bare p50) measures serving at ``concurrency`` 1; with more clients the
    latency includes queueing and ``throughput_ratio`` (served images/s / bare images/s) is the number to read.

    Args:
        url: the predictions URL, e.g. ``http://127.0.0.1:8080/predictions/severstal``.
        images_dir: folder of JPEG/PNG images.
        concurrency: clients posting at the same time.
        requests: timed requests in all (and as many bare predictions).
        weights: a weights file or run folder for the bare side; None skips it.
        headers: extra request headers (``Authorization`` when token authorization is on).
        timeout: seconds per request.
        rounds: served/bare alternations.

    Returns:
        ``{"benchmark": "serve", "url", "images", "concurrency", "requests", "errors", "error_statuses",
        "rows": [served row, bare row (with weights)], "overhead", "throughput_ratio"}``; a row is
        ``{"method", "p50", "p95", "p99", "mean", "images_per_s"}`` (seconds, images per second).
    """
    import threading
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    import requests as http

    from severstal.annotations import list_images
    from severstal.images import decode_image

    paths = [Path(images_dir) / name for name in list_images(images_dir)[:requests]]
    if not paths:
        raise FileNotFoundError(f"no images in {images_dir}")
    if concurrency < 1 or requests < 1 or rounds < 1:
        raise ValueError(f"concurrency, requests and rounds must be >= 1, got {concurrency}, {requests}, {rounds}")
    bodies = [p.read_bytes() for p in paths]
    local = threading.local()

    def post(index: int) -> tuple[float, str]:
        session = getattr(local, "session", None) or http.Session()
        local.session = session
        start = time.perf_counter()
        try:
            response = session.post(url, data=bodies[index % len(bodies)], headers=headers, timeout=timeout)
            ok = response.status_code == 200 and {"height", "width", "defects", "classes"} <= set(response.json())
            status = "200" if ok else str(response.status_code)
        except (http.RequestException, ValueError) as err:
            status = type(err).__name__
        return time.perf_counter() - start, status

    predictor = None
    if weights is not None:
        from severstal.predict import Predictor

        predictor = Predictor.from_weights(weights)
        predictor.predict([decode_image(bodies[0])])
    post(0)
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
    served = _latency_row("TorchServe", [s for s, status in results if status == "200"], served_wall)
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
        "errors": requests - statuses.get("200", 0),
        "error_statuses": {s: n for s, n in statuses.items() if s != "200"},
        "rows": rows,
        "overhead": overhead,
        "throughput_ratio": throughput_ratio,
    }


def _interleaved_timings(funcs: dict[str, Callable[[list], object]], items: list, batch_size: int,
                         repeats: int) -> dict[str, list[float]]:
    """Seconds per image of each ``funcs[name](batch)`` call, the functions taking turns on every batch.

    Each function first runs one untimed warm-up batch; then ``repeats`` passes go over ``items``, every
    batch timed with each function in turn, so that a change in the machine's load hits all of them alike.
    """
    for func in funcs.values():
        func(items[:batch_size])
    per_image: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(repeats):
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            for name, func in funcs.items():
                begin = time.perf_counter()
                func(batch)
                per_image[name].append((time.perf_counter() - begin) / len(batch))
    return per_image


def _class_dice(records: list[dict], reference: list[dict]) -> float:
    """Mean Dice of the class masks of ``records`` against ``reference`` over every (image, class) pair."""
    from severstal.metrics import dice
    from severstal.rle import rle_to_mask

    values = [dice(rle_to_mask(r["classes"][c], (r["height"], r["width"])),
                   rle_to_mask(ref["classes"][c], (ref["height"], ref["width"])))
              for r, ref in zip(records, reference) for c in ref["classes"]]
    return float(np.mean(values)) if values else float("nan")


def bench_predict(weights: str | Path, images_dir: str | Path, backends: Sequence[str] = ("torch", "onnxruntime"),
                  batch_size: int = 1, repeats: int = 3, limit: int | None = 16, threads: int | None = None,
                  device: str = "cpu", onnx: str | Path | None = None, engine: str | Path | None = None,
                  work_dir: str | Path | None = None) -> dict:
    """Time every backend on the same images, batches and pre-/post-processing: end to end and network alone.

    All backends share one ``Predictor`` pipeline and differ only in ``backend.run``. End to end is
    ``decode_image(bytes)`` + ``Predictor.predict`` (resize, network, box rescaling, mask pasting,
    thresholds, RLE) per batch; network alone is ``backend.run`` on the same batches, preprocessed
    beforehand (resizing depends only on the config, which an export keeps). Each backend runs one untimed
    warm-up batch, then ``repeats`` passes go over the images with the backends taking turns on every
    batch (a change in the machine's load hits all alike); a batch's time divided by its size is one
    sample, and ``p50_ms`` is the median sample (milliseconds per image). PyTorch and ONNX Runtime use the
    same number of threads. On cores shared with other work PyTorch's OpenMP threads spin-wait unless
    ``OMP_WAIT_POLICY=PASSIVE`` is set before Python starts (measured on 2 busy cores: 7x slower), so the
    result records that variable. ``dice_vs_torch`` compares each backend's class masks with PyTorch's (mean
    Dice over every (image, class) pair; 1.0 is identical).

    Args:
        weights: the PyTorch reference: a ``.pth`` weights file or its run folder.
        images_dir: folder of JPEG/PNG images.
        backends: names from ``severstal.backends.BACKENDS``; "torch" is always run (it is the reference).
        batch_size: images per ``predict`` / ``run`` call.
        repeats: timed passes over the images.
        limit: use the first ``limit`` images of the folder (None: all).
        threads: CPU threads for PyTorch and ONNX Runtime (default: PyTorch's current setting).
        device: "cpu" or "cuda[:N]".
        onnx: an export of ``weights`` for onnxruntime/tensorrt; default: exported into ``work_dir``.
        engine: a TensorRT engine for tensorrt; default: built from the ONNX model into ``work_dir``.
        work_dir: folder for exports made here (default: a new temporary folder).

    Returns:
        ``{"benchmark": "predict", "weights", "images", "batch_size", "repeats", "threads", "device",
        "omp_wait_policy", "rows": [...]}``; a row is ``{"backend", "e2e_p50_ms", "e2e_images_per_s", "e2e_vs_torch",
        "net_p50_ms", "net_images_per_s", "net_vs_torch", "other_ms", "dice_vs_torch"}`` where
        ``*_vs_torch`` is the speed-up over PyTorch (its p50 / this p50) and ``other_ms`` the end-to-end p50
        minus the network p50 (decoding, resizing, post-processing, RLE: the shared part).
    """
    import tempfile

    import torch

    from severstal.annotations import list_images
    from severstal.backends import check_backend, make_backend
    from severstal.config import load_bundle
    from severstal.export import export_onnx, export_tensorrt
    from severstal.images import decode_image
    from severstal.predict import Predictor

    names = ["torch"] + [check_backend(b) for b in backends if b != "torch"]
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be >= 1, got {batch_size} and {repeats}")
    paths = [Path(images_dir) / name for name in list_images(images_dir)][:limit]
    if not paths:
        raise FileNotFoundError(f"no images in {images_dir}")
    bodies = [p.read_bytes() for p in paths]
    threads = threads or torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        work_dir = Path(work_dir or tempfile.mkdtemp(prefix="severstal-bench-"))
        if any(n != "torch" for n in names) and onnx is None:
            onnx = export_onnx(weights, work_dir / "onnx")
        if "tensorrt" in names and engine is None:
            engine = export_tensorrt(onnx, work_dir / "tensorrt")
        model_files = {"torch": weights, "onnxruntime": onnx, "tensorrt": engine}
        predictors = {}
        for name in names:
            bundle = load_bundle(model_files[name], device=device)
            predictors[name] = Predictor(bundle.cfg, backend=make_backend(name, bundle.cfg, threads=threads))
        e2e = _interleaved_timings({name: lambda batch, p=p: p.predict([decode_image(b) for b in batch])
                                    for name, p in predictors.items()}, bodies, batch_size, repeats)
        tensors = [predictors["torch"].preprocess(decode_image(b)) for b in bodies]
        net = _interleaved_timings({name: p.backend.run for name, p in predictors.items()}, tensors, batch_size,
                                   repeats)
        records = {name: p.predict([decode_image(b) for b in bodies]) for name, p in predictors.items()}
    finally:
        torch.set_num_threads(previous_threads)
    rows = [{"backend": name, "e2e_p50_ms": 1000 * statistics.median(e2e[name]),
             "e2e_images_per_s": len(e2e[name]) / sum(e2e[name]),
             "net_p50_ms": 1000 * statistics.median(net[name]), "net_images_per_s": len(net[name]) / sum(net[name]),
             "dice_vs_torch": _class_dice(records[name], records["torch"])} for name in names]
    for row in rows:
        row["e2e_vs_torch"] = rows[0]["e2e_p50_ms"] / row["e2e_p50_ms"]
        row["net_vs_torch"] = rows[0]["net_p50_ms"] / row["net_p50_ms"]
        row["other_ms"] = row["e2e_p50_ms"] - row["net_p50_ms"]
    return {"benchmark": "predict", "weights": str(weights), "images": len(paths), "batch_size": batch_size,
            "repeats": repeats, "threads": threads, "device": device,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "rows": rows}


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table: one line per row, a header of the column keys.

    Args:
        rows: dicts holding at least the column keys.
        columns: ``(key, format_spec)`` pairs, e.g. ``("seconds", ".3f")``; numbers align right.

    Returns:
        The table, lines joined by newlines.
    """
    cells = [[format(row[key], spec) for key, spec in columns] for row in rows]
    numeric = [all(isinstance(row[key], (int, float)) for row in rows) for key, _ in columns]
    widths = [max([len(key)] + [len(line[i]) for line in cells]) for i, (key, _) in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric)).rstrip()

    return "\n".join([line([key for key, _ in columns])] + [line(c) for c in cells])


def bench_train(configs: Sequence[str] = ("small", "r50"), iterations: int = 6, warmup: int = 2,
                images: int = 16) -> dict:
    """Seconds per training iteration of each config on the same synthetic images, from random weights.

    Every config trains from scratch here (no download); the first ``warmup`` iterations are not timed.

    Returns:
        ``rows`` (config, images per batch, input size, median s/iter, s/image) and ``ratios`` of each
        config's s/image to the first config's.
    """
    import tempfile

    from detectron2.utils.events import EventStorage

    from severstal.datasets import register_data_dir, unregister
    from severstal.synth import make_synthetic_dataset
    from severstal.train import TRAIN_SPLIT, SeverstalTrainer, setup_cfg

    rows = []
    with tempfile.TemporaryDirectory(prefix="severstal-bench-train-") as tmp:
        data = Path(tmp) / "data"
        make_synthetic_dataset(data, images, seed=0)
        register_data_dir(data, TRAIN_SPLIT, None, val_fraction=0.0)
        try:
            for name in configs:
                cfg = setup_cfg(data, name, Path(tmp) / name, ["DATALOADER.NUM_WORKERS", "0"], scratch=True)
                trainer = SeverstalTrainer(cfg)
                times = []
                with EventStorage(0):
                    for _ in range(warmup + iterations):
                        start = time.perf_counter()
                        trainer._trainer.run_step()
                        times.append(time.perf_counter() - start)
                per_iter = statistics.median(times[warmup:])
                rows.append({"config": name, "batch": cfg.SOLVER.IMS_PER_BATCH,
                             "input": f"{cfg.INPUT.MIN_SIZE_TRAIN[0]}x{cfg.INPUT.MAX_SIZE_TRAIN}",
                             "s_per_iter": per_iter, "s_per_image": per_iter / cfg.SOLVER.IMS_PER_BATCH})
        finally:
            unregister(TRAIN_SPLIT)
    base = rows[0]["s_per_image"]
    return {"rows": rows, "ratios": {r["config"]: r["s_per_image"] / base for r in rows},
            "iterations": iterations, "threads": torch_threads()}


def torch_threads() -> int:
    """Threads PyTorch computes with (timings depend on it)."""
    import torch

    return torch.get_num_threads()

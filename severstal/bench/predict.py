"""Benchmark ``predict``: the prediction backends (PyTorch, ONNX Runtime, TensorRT on a GPU) on the same images,
batches and shared pre- and post-processing, end to end and network alone, checking that their masks agree.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from severstal.data.annotations import list_images
from severstal.data.dice import dice
from severstal.data.images import decode_image
from severstal.data.rle import rle_to_mask
from severstal.files import check_backend
from severstal.model.backends import make_backend
from severstal.model.config import load_bundle
from severstal.model.export import export_onnx, export_tensorrt
from severstal.model.predict import Predictor


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
        backends: names from ``severstal.model.backends.BACKENDS``; "torch" is always run (it is the reference).
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

"""Benchmark ``predict``: every prediction backend and precision (PyTorch fp32/bf16, ONNX Runtime, OpenVINO
fp32/bf16, TensorRT on a GPU) on the same images, batches and shared pre- and post-processing, end to end and
network alone, checking that their masks agree with PyTorch fp32's (Dice >= :data:`PARITY_DICE`).
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from severstal.data.annotations import list_images
from severstal.data.images import decode_image
from severstal.files import BACKEND_PRECISIONS, check_backend, check_precision
from severstal.model.backends import cpu_has_bf16, describe_backend, make_backend, openvino_missing, tensorrt_missing
from severstal.model.config import load_bundle
from severstal.model.export import export_onnx, export_tensorrt
from severstal.model.predict import Predictor, records_dice
from severstal.model.quantize import quantize_export

PARITY_DICE = 0.99
"""A variant keeps the answers when its class masks score at least this mean Dice against PyTorch fp32's."""
REFERENCE = ("torch", "fp32")


def parse_variants(specs: Sequence[str] | str | None, device: str = "cpu") -> list[tuple[str, str]]:
    """``backend[:precision]`` names -> ``(backend, precision)`` pairs, PyTorch fp32 (the reference) first.

    Args:
        specs: e.g. ``["torch", "torch:bf16", "onnxruntime", "openvino"]`` or one comma-separated string;
            a name without a precision means fp32; None or "all": :func:`available_variants`.
        device: "cpu" or "cuda[:N]", for "all".

    Raises:
        ValueError: an unknown backend or a precision the backend does not have (the message lists the valid ones).
    """
    if isinstance(specs, str):
        specs = [s.strip() for s in specs.split(",") if s.strip()]
    if not specs or list(specs) == ["all"]:
        return available_variants(device)
    variants = [REFERENCE]
    for spec in specs:
        backend, _, precision = spec.partition(":")
        variant = (check_backend(backend), check_precision(precision or "fp32", backend))
        if variant not in variants:
            variants.append(variant)
    return variants


def available_variants(device: str = "cpu") -> list[tuple[str, str]]:
    """Every backend installed here at fp32, and at each reduced precision this hardware computes natively.

    On a CPU: ONNX Runtime int8, and bf16 for torch where the CPU has bf16 instructions (elsewhere bf16 is emulated,
    several times slower; ask for it by name to measure it anyway). On a GPU: torch fp16, and TensorRT where it runs.
    """
    cpu = not str(device).startswith("cuda")
    variants = [REFERENCE]
    backends = ["onnxruntime"] + (["openvino"] if cpu and openvino_missing() is None else [])
    backends += [] if cpu or tensorrt_missing() else ["tensorrt"]
    variants += [(b, "fp32") for b in backends]
    if cpu:
        variants += [("onnxruntime", "int8")]
    if cpu and cpu_has_bf16():
        variants += [("torch", "bf16")]
    elif not cpu:
        variants += [("torch", "fp16")]
    return [v for v in variants if v[1] in BACKEND_PRECISIONS[v[0]]]


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


def bench_predict(weights: str | Path, images_dir: str | Path, backends: Sequence[str] | str | None = None,
                  batch_size: int = 1, repeats: int = 3, limit: int | None = 16, threads: int | None = None,
                  device: str = "cpu", onnx: str | Path | None = None, engine: str | Path | None = None,
                  work_dir: str | Path | None = None) -> dict:
    """Time every backend and precision on the same images, batches and pre-/post-processing: end to end and
    network alone, with the Dice of each one's masks against PyTorch fp32's.

    All variants share one ``Predictor`` pipeline and differ only in ``backend.run``. End to end is
    ``decode_image(bytes)`` + ``Predictor.predict`` (resize, network, box rescaling, mask pasting,
    thresholds, RLE) per batch; network alone is ``backend.run`` on the same batches, preprocessed
    beforehand (resizing depends only on the config, which an export keeps). Each variant runs one untimed
    warm-up batch, then ``repeats`` passes go over the images with the variants taking turns on every
    batch (a change in the machine's load hits all alike); a batch's time divided by its size is one
    sample, and ``p50_ms`` is the median sample (milliseconds per image). PyTorch, ONNX Runtime and OpenVINO
    use the same number of threads. On cores shared with other work PyTorch's OpenMP threads spin-wait unless
    ``OMP_WAIT_POLICY=PASSIVE`` is set before Python starts (docs/cpu-speed.md says by how much), so the
    result records that variable and the load average. ``dice_vs_torch`` compares each variant's class
    masks with PyTorch fp32's (mean Dice over every (image, class) pair; 1.0 is identical) and ``keeps_answers``
    says whether it reaches :data:`PARITY_DICE`; ``detections`` counts the defects of the records (a parity
    check on a model that detects nothing means nothing).

    Args:
        weights: the PyTorch reference: a ``.pth`` weights file or its run folder.
        images_dir: folder of JPEG/PNG images.
        backends: ``backend[:precision]`` names (:func:`parse_variants`); PyTorch fp32 always runs (it is the
            reference); None or "all": every backend and native precision here (:func:`available_variants`).
        batch_size: images per ``predict`` / ``run`` call.
        repeats: timed passes over the images.
        limit: use the first ``limit`` images of the folder (None: all).
        threads: CPU threads for every backend (default: PyTorch's current setting).
        device: "cpu" or "cuda[:N]".
        onnx: an export of ``weights`` for onnxruntime/openvino/tensorrt; default: exported into ``work_dir``.
        engine: a TensorRT engine for tensorrt; default: built from the ONNX model into ``work_dir``.
        work_dir: folder for exports made here (default: a new temporary folder).

    Returns:
        ``{"benchmark": "predict", "weights", "images", "batch_size", "repeats", "threads", "device",
        "omp_wait_policy", "load_average", "cpu_bf16", "rows": [...]}``; a row is ``{"backend", "precision",
        "runs", "e2e_p50_ms", "e2e_images_per_s", "e2e_vs_torch", "net_p50_ms", "net_images_per_s",
        "net_vs_torch", "other_ms", "dice_vs_torch", "keeps_answers", "detections"}`` where ``*_vs_torch`` is the
        speed-up over PyTorch fp32 (its p50 / this p50), ``other_ms`` the end-to-end p50 minus the network p50
        (decoding, resizing, post-processing, RLE: the shared part) and ``runs`` what actually ran
        (``describe_backend``).
    """
    variants = parse_variants(backends, device)
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be >= 1, got {batch_size} and {repeats}")
    paths = [Path(images_dir) / name for name in list_images(images_dir)][:limit]
    if not paths:
        raise FileNotFoundError(f"no images in {images_dir}")
    bodies = [p.read_bytes() for p in paths]
    threads = threads or torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    load_before = os.getloadavg()
    torch.set_num_threads(threads)
    try:
        work_dir = Path(work_dir or tempfile.mkdtemp(prefix="severstal-bench-"))
        if any(b != "torch" for b, _ in variants) and onnx is None:
            onnx = export_onnx(weights, work_dir / "onnx")
        int8 = None
        if any(p == "int8" for _, p in variants):
            # Calibrated on the folder's first images and timed whatever its parity: the row's dice_vs_torch and
            # keeps_answers say whether it keeps the answers (export --int8 refuses to write one that does not).
            int8, _ = quantize_export(onnx, images_dir, work_dir / "int8", min_dice=0.0, parity_images=1,
                                      calibration_images=min(16, max(1, len(list_images(images_dir)) - 1)))
        if any(b == "tensorrt" for b, _ in variants) and engine is None:
            engine = export_tensorrt(onnx, work_dir / "tensorrt", fp16=("tensorrt", "fp16") in variants)
        model_files = {"torch": weights, "onnxruntime": onnx, "openvino": onnx, "tensorrt": engine}
        predictors = {}
        for name, precision in variants:
            bundle = load_bundle(int8 if precision == "int8" else model_files[name], device=device)
            predictors[name, precision] = Predictor(bundle.cfg, backend=make_backend(
                name, bundle.cfg, threads=threads, precision=precision))
        e2e = _interleaved_timings({key: lambda batch, p=p: p.predict([decode_image(b) for b in batch])
                                    for key, p in predictors.items()}, bodies, batch_size, repeats)
        tensors = [predictors[REFERENCE].preprocess(decode_image(b)) for b in bodies]
        # The network as predict runs it: told the lowest class threshold (see Backend.run).
        net = _interleaved_timings({key: functools.partial(p.backend.run, min_score=min(p.thresholds[0]))
                                    for key, p in predictors.items()}, tensors, batch_size, repeats)
        records = {key: p.predict([decode_image(b) for b in bodies]) for key, p in predictors.items()}
    finally:
        torch.set_num_threads(previous_threads)
    rows = []
    for key, predictor in predictors.items():
        dice_value = records_dice(records[key], records[REFERENCE])
        rows.append({"backend": key[0], "precision": predictor.backend.precision,
                     "runs": describe_backend(predictor.backend),
                     "e2e_p50_ms": 1000 * statistics.median(e2e[key]),
                     "e2e_images_per_s": len(e2e[key]) / sum(e2e[key]),
                     "net_p50_ms": 1000 * statistics.median(net[key]),
                     "net_images_per_s": len(net[key]) / sum(net[key]),
                     "dice_vs_torch": dice_value, "keeps_answers": bool(dice_value >= PARITY_DICE),
                     "detections": sum(len(r["defects"]) for r in records[key])})
    for row in rows:
        row["e2e_vs_torch"] = rows[0]["e2e_p50_ms"] / row["e2e_p50_ms"]
        row["net_vs_torch"] = rows[0]["net_p50_ms"] / row["net_p50_ms"]
        row["other_ms"] = row["e2e_p50_ms"] - row["net_p50_ms"]
    return {"benchmark": "predict", "weights": str(weights), "images": len(paths), "batch_size": batch_size,
            "repeats": repeats, "threads": threads, "device": device,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "cpu_bf16": cpu_has_bf16(),
            "load_average": {"before": list(load_before), "after": list(os.getloadavg())}, "rows": rows}

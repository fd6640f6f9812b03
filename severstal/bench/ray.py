"""Benchmark ``ray``: images/s of prediction on a local Ray against the single process, same images and model.

Both sides do the same work: read the files, predict, write the submission. The single process runs
:func:`severstal.model.predict.predict_folder` with a model already loaded; Ray runs
:func:`severstal.model.predict_ray.predict_ray` in a Ray started once beforehand (its start is reported on its
own line). A Ray run also pays a fixed cost that does not grow with the images (actors start and load the
model, Ray Data plans the run): a one-image run measures it, and ``ray, steady`` is the run minus that cost,
the rate a long run approaches (compare it with ``single process``; ``ray, whole run`` compares with
``single process + model load``). On one machine Ray's steady rate is what to compare with the single process;
across machines the rate grows with the actors (docs/scale.md).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from severstal.data.annotations import list_images
from severstal.model.predict import Predictor, predict_folder


def bench_ray(weights: str | Path, images_dir: str | Path, batch_size: int = 4, limit: int | None = None,
              actors: int | None = None, cpus_per_actor: float | None = None, num_cpus: int | None = None,
              repeats: int = 3) -> dict:
    """Time single-process and local-Ray prediction on the same images and model.

    Args:
        weights: a run's weights or folder (or an exported model).
        images_dir: folder of images; the first ``limit`` (None: all) are used.
        batch_size: images per call on both sides.
        actors, cpus_per_actor: Ray's pool (default: :func:`severstal.model.predict_ray.plan_pool`'s).
        num_cpus: CPUs of the local Ray (default: all of this machine's).
        repeats: timed runs of each kind, taking turns (single, Ray one image, Ray all); the medians count.

    Returns:
        ``rows`` (``method, images, seconds, images_per_s, vs_single``), ``ratio`` (Ray steady / single process),
        ``ray_start_s``, ``fixed_s``, ``pool``, ``identical`` (the two submissions' text), ``threads`` (the single
        process's), ``load_average`` (1, 5, 15 minutes, before and after).
    """
    import ray

    from severstal.model.predict_ray import connect, predict_ray

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    load_before = os.getloadavg()
    names = list_images(images_dir)[:limit]
    if not names:
        raise FileNotFoundError(f"no images in {images_dir}")
    with tempfile.TemporaryDirectory(prefix="severstal-bench-ray-") as tmp:
        tmp = Path(tmp)
        subset, one = tmp / "images", tmp / "one"
        subset.mkdir()
        one.mkdir()
        for name in names:
            (subset / name).symlink_to(Path(images_dir).resolve() / name)
        (one / names[0]).symlink_to(Path(images_dir).resolve() / names[0])

        start = time.perf_counter()
        predictor = Predictor.from_weights(weights, device="cpu")
        load_s = time.perf_counter() - start
        predict_folder(None, one, tmp / "warm.csv", predictor=predictor, batch_size=batch_size)  # untimed warm-up

        start = time.perf_counter()
        started = connect(num_cpus=num_cpus)
        ray_start_s = time.perf_counter() - start
        options = {"batch_size": batch_size, "actors": actors, "cpus_per_actor": cpus_per_actor, "progress": False}
        times: dict[str, list[float]] = {"single": [], "fixed": [], "ray": []}
        try:
            for _ in range(repeats):  # taking turns, so that a change in the machine's load hits all three alike
                start = time.perf_counter()
                predict_folder(None, subset, tmp / "single.csv", predictor=predictor, batch_size=batch_size)
                times["single"].append(time.perf_counter() - start)
                start = time.perf_counter()
                predict_ray(weights, str(one), tmp / "ray-one.csv", **options)
                times["fixed"].append(time.perf_counter() - start)
                start = time.perf_counter()
                summary = predict_ray(weights, str(subset), tmp / "ray.csv", **options)
                times["ray"].append(time.perf_counter() - start)
        finally:
            if started:
                ray.shutdown()
        single_s, fixed_s, ray_s = (statistics.median(times[k]) for k in ("single", "fixed", "ray"))
        identical = (tmp / "ray.csv").read_text() == (tmp / "single.csv").read_text()
    n = len(names)
    steady_s = max(ray_s - fixed_s, 1e-9)
    rows = [{"method": "single process", "images": n, "seconds": single_s, "images_per_s": n / single_s},
            {"method": "single process + model load", "images": n, "seconds": single_s + load_s,
             "images_per_s": n / (single_s + load_s)},
            {"method": "ray, whole run", "images": n, "seconds": ray_s, "images_per_s": n / ray_s},
            {"method": "ray, fixed cost (1 image)", "images": 1, "seconds": fixed_s, "images_per_s": 1 / fixed_s},
            {"method": "ray, steady (run - fixed)", "images": n - 1, "seconds": steady_s,
             "images_per_s": (n - 1) / steady_s}]
    for row in rows:
        row["vs_single"] = row["images_per_s"] / rows[0]["images_per_s"]
    return {"benchmark": "ray", "weights": str(weights), "images": n, "batch_size": batch_size, "repeats": repeats,
            "times": times, "rows": rows,
            "ratio": rows[4]["vs_single"], "ray_start_s": ray_start_s, "fixed_s": fixed_s, "pool": summary["pool"],
            "identical": identical, "threads": torch.get_num_threads(),
            "load_average": {"before": list(load_before), "after": list(os.getloadavg())}}

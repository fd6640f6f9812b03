"""Benchmark ``train``: seconds per training iteration of each config on the same synthetic images."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from detectron2.utils.events import EventStorage

from severstal.data.datasets import register_data_dir, unregister
from severstal.data.synth import make_synthetic_dataset
from severstal.model.train import TRAIN_SPLIT, SeverstalTrainer, setup_cfg


def bench_train(configs: Sequence[str] = ("small", "r50"), iterations: int = 6, warmup: int = 2,
                images: int = 16, variants: Sequence[Sequence[str]] = ((),)) -> dict:
    """Seconds per training iteration of each config on the same synthetic images, from random weights.

    Every config trains from scratch here (no download); the first ``warmup`` iterations are not timed.
    ``variants`` are lists of ``KEY VALUE`` overrides, each timed on every config (``()``: the config as it is),
    to see what a setting costs.

    Returns:
        ``rows`` (config and its overrides, images per batch, input size, median s/iter, s/image) and ``ratios`` of
        each row's s/image to the first row's.
    """

    rows = []
    with tempfile.TemporaryDirectory(prefix="severstal-bench-train-") as tmp:
        data = Path(tmp) / "data"
        make_synthetic_dataset(data, images, seed=0)
        register_data_dir(data, TRAIN_SPLIT, None, val_fraction=0.0)
        try:
            for index, (name, opts) in enumerate((n, list(v)) for n in configs for v in variants):
                cfg = setup_cfg(data, name, Path(tmp) / str(index), ["DATALOADER.NUM_WORKERS", "0", *opts],
                                scratch=True)
                trainer = SeverstalTrainer(cfg)
                times = []
                with EventStorage(0):
                    for _ in range(warmup + iterations):
                        start = time.perf_counter()
                        trainer._trainer.run_step()
                        times.append(time.perf_counter() - start)
                per_iter = statistics.median(times[warmup:])
                rows.append({"config": " ".join([name, *opts]), "batch": cfg.SOLVER.IMS_PER_BATCH,
                             "input": f"{cfg.INPUT.MIN_SIZE_TRAIN[0]}x{cfg.INPUT.MAX_SIZE_TRAIN}",
                             "s_per_iter": per_iter, "s_per_image": per_iter / cfg.SOLVER.IMS_PER_BATCH})
        finally:
            unregister(TRAIN_SPLIT)
    base = rows[0]["s_per_image"]
    return {"rows": rows, "ratios": {r["config"]: r["s_per_image"] / base for r in rows},
            "iterations": iterations, "threads": torch.get_num_threads()}

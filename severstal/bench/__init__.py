"""Benchmarks: each a function that returns a result dict; :mod:`.commands` holds their options and reports.

Every benchmark times its subject against a reference measured in the same run, on the same inputs:

========== =====================================================================================
convert    Kaggle RLE -> COCO instances: run-based conversion vs the pixel pipeline (:mod:`.convert`)
predict    prediction backends side by side, end to end and network alone (:mod:`.predict`)
serve      TorchServe under load vs the bare model on the same images (:mod:`.serve`)
soak       a server under many clients for a long time: latency, errors, memory (:mod:`.soak`)
train      seconds per training iteration of each config (:mod:`.train`)
profile    one image's time, stage by stage (:mod:`.profile`)
ray        prediction on a local Ray vs one process (:mod:`.ray`)
gpu        the GPU path in one table (:mod:`.gpu`)
========== =====================================================================================

Timings never go into pass/fail tests; quote medians taken on a quiet machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

WARMUP_REQUESTS = 200
"""Untimed requests before the timed ones of ``bench serve``. TorchServe's Java frontend compiles its request path
over the first few hundred requests: the frontend's p50 (its access log) of the demo's model on 2 cores was 70, 65 and
58 ms over the first, second and third 200 requests of a fresh server, then flat (docs/serving.md)."""


def median_seconds(func: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls, and the result of the last one."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def latency_stats(seconds: Sequence[float], wall: float | None = None) -> dict:
    """Latency percentiles of a set of requests: the one convention of the project's tables and figures.

    Percentiles interpolate linearly between order statistics (numpy's default), so p50 is the median.

    Args:
        seconds: per-request latencies.
        wall: the wall time the requests took together; None: they ran one after another (``1 / mean``).

    Returns:
        ``{"n", "p50", "p95", "p99", "mean", "images_per_s"}`` (seconds, images per second).

    Raises:
        ValueError: no latencies.
    """
    import numpy as np  # here, not above: severstal --help imports this package

    values = np.asarray(seconds, dtype=float)
    if not len(values):
        raise ValueError("no latencies")
    p50, p95, p99 = (float(v) for v in np.percentile(values, (50, 95, 99)))
    mean = float(values.mean())
    return {"n": len(values), "p50": p50, "p95": p95, "p99": p99, "mean": mean,
            "images_per_s": len(values) / wall if wall else 1.0 / mean}


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

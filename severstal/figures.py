"""The figures of ``graphs/`` and the pictures of ``images/``: what ``severstal figures`` (``make figures``) writes.

From a dataset (default: the real sample beside the repository) it writes the data figures; from a
training run (e.g. ``demo/run`` after ``make demo``) the training curves, the Dice per class, the threshold
curves, the latency per serving path and a prediction overlay. Statistics come from
:mod:`severstal.viz.stats`, drawing from :mod:`severstal.viz.draw`. It reads the demo's folder (its report and
held-out images), so it sits on top with the demo, the CLI and the benchmarks.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from severstal.bench import latency_stats
from severstal.demo import HOLDOUT_DIR, REPORT_FILE
from severstal.files import EVALUATION_DIR, METRICS_FILE, TRAIN_IMAGES, WEIGHTS_FILE, real_data_root
from severstal.files import EVALUATION_FILE as EVALUATION_NAME
from severstal.viz import draw, stats

log = logging.getLogger(__name__)

EVALUATION_FILE = Path(EVALUATION_DIR) / EVALUATION_NAME


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """A training run's ``metrics.json`` (Detectron2 writes one JSON object per line) as a frame.

    Lines from several trainings into the same folder are kept; a truncated last line (a training
    still writing) is skipped.

    Returns:
        One row per line, sorted by ``iteration``; columns as logged (``total_loss``, ``loss_*``,
        ``lr``, and ``dice/*``, ``segm/*``, ``bbox/*`` after an evaluation).

    Raises:
        FileNotFoundError: the run has no ``metrics.json``.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: is it a training run's output folder?")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s, line %d: not JSON, skipped", path, number)
    frame = pd.DataFrame(rows)
    return frame.sort_values("iteration", kind="stable").reset_index(drop=True) if "iteration" in frame else frame


def latency_row(method: str, seconds: Sequence[float]) -> dict:
    """Latency statistics of one serving path, one request at a time, as :func:`severstal.viz.draw.plot_latency`
    draws them: ``{"method", **severstal.bench.latency_stats(seconds)}``."""
    return {"method": method, **latency_stats(seconds)}


def time_bare_model(weights: str | Path, images: Sequence[Path], warmup: int = 1) -> list[float]:
    """Seconds per image of the bare PyTorch model, one image at a time, file bytes to answer.

    The same work as one TorchServe request minus HTTP and the queue: decode, predict, make the record.
    """
    from severstal.data.images import decode_image
    from severstal.model.predict import Predictor

    predictor = Predictor.from_weights(weights)
    for path in images[:warmup]:
        predictor.predict([decode_image(path.read_bytes())])
    seconds = []
    for path in images:
        start = time.perf_counter()
        predictor.predict([decode_image(path.read_bytes(), source=str(path))])
        seconds.append(time.perf_counter() - start)
    return seconds


def demo_latencies(run_dir: str | Path) -> list[dict] | None:
    """Latency rows of a demo run: TorchServe as the demo measured it, and the bare model on the same images.

    The demo posts the first held-out images one at a time (``report.json``: ``serve.latencies_s``); the
    first answer includes the worker's warm-up and is left out of both rows.

    Returns:
        The rows, or ``None`` when ``run_dir`` has no demo report beside it.
    """
    run_dir = Path(run_dir)
    report_path = run_dir.parent / REPORT_FILE
    if not report_path.is_file():
        return None
    served = json.loads(report_path.read_text())["serve"]["latencies_s"]
    rows = [latency_row("TorchServe, HTTP, 1 client", served[1:] or served)]
    holdout = run_dir.parent / HOLDOUT_DIR / TRAIN_IMAGES
    if holdout.is_dir():
        images = sorted(holdout.iterdir())[: len(served)]
        rows.insert(0, latency_row("PyTorch, bare model", time_bare_model(run_dir, images)[1:]))
    return rows


def write_data_figures(data_dir: str | Path, out: str | Path, images_out: str | Path | None = None) -> list[Path]:
    """The data figures of a dataset into ``out``; with ``images_out`` also a real image per class there.

    Args:
        data_dir: a Kaggle-layout folder or the real sample (:func:`severstal.viz.stats.load_dataset`).
        out: folder for ``class_balance``, ``classes_per_image``, ``defect_areas``, ``instances_per_image``,
            ``defect_positions``, ``examples_per_class`` and ``defect_free_examples`` (PNG).
        images_out: folder for ``real_classes.png`` (the README's picture), or ``None``.

    Returns:
        The files written.
    """
    out = Path(out)
    data = stats.load_dataset(data_dir)
    mask_stats = stats.mask_statistics(data.masks)
    written = [
        draw.plot_class_balance(stats.class_balance(data), out / "class_balance.png"),
        draw.plot_classes_per_image(stats.images_per_class_count(data.classes), out / "classes_per_image.png"),
        draw.plot_defect_areas(mask_stats, out / "defect_areas.png"),
        draw.plot_instances_per_image(stats.image_statistics(mask_stats), mask_stats, out / "instances_per_image.png"),
        draw.plot_defect_positions(stats.defect_heatmaps(data.masks), out / "defect_positions.png"),
    ]
    examples = stats.pick_examples(data, per_class=2)
    written.append(draw.plot_examples(examples, out / "examples_per_class.png",
                                       "Examples of each class (one row per class), masks overlaid"))
    free = stats.pick_defect_free(data, count=4)
    if free:
        written.append(draw.plot_examples(free, out / "defect_free_examples.png", "Defect-free images"))
    if images_out is not None:
        first = {c: chosen[:1] for c, chosen in examples.items()}
        written.append(draw.plot_examples(first, Path(images_out) / "real_classes.png",
                                           "A real image of each class, masks overlaid", ncols=1, panel_width=9.0))
    return written


def write_run_figures(run_dir: str | Path, out: str | Path,
                     images_out: str | Path | None = None) -> tuple[list[Path], list[str]]:
    """The figures of a training run into ``out``: whatever the run holds.

    ``training_curves.png`` (``metrics.json``), ``dice_per_class.png`` and ``threshold_curves.png``
    (``eval/evaluation.json``, the curves after ``evaluate --tune``), ``latency.png`` (a demo run's report); with
    ``images_out`` also ``prediction.png``: truth beside prediction on two validation images.

    Returns:
        ``(written, skipped)``: the files written, and a reason for each figure the run lacks data for.
    """
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist (make demo writes demo/run)")
    evaluation_file = run_dir / EVALUATION_FILE
    evaluation = json.loads(evaluation_file.read_text()) if evaluation_file.is_file() else {}

    def missing(path: Path) -> str | None:
        return None if path.is_file() else f"{path} is missing"

    no_curves = missing(evaluation_file) or (None if "threshold_curves" in evaluation else
                                             f"{evaluation_file} has no threshold curves (severstal evaluate --tune)")
    sources = [  # (figure, why it cannot be drawn or None, draw it)
        ("training_curves.png", missing(run_dir / METRICS_FILE),
         lambda: draw.plot_training_curves(read_metrics(run_dir), out / "training_curves.png")),
        ("dice_per_class.png", missing(evaluation_file),
         lambda: draw.plot_dice_per_class(evaluation, out / "dice_per_class.png")),
        ("threshold_curves.png", no_curves,
         lambda: draw.plot_threshold_curves(evaluation["threshold_curves"], out / "threshold_curves.png")),
        ("latency.png", missing(run_dir.parent / REPORT_FILE), lambda: _write_latency(run_dir, out / "latency.png")),
    ]
    if images_out is not None:
        sources.append(("prediction.png", missing(run_dir / WEIGHTS_FILE),
                        lambda: write_prediction_image(run_dir, Path(images_out) / "prediction.png")))
    written, skipped = [], []
    for name, why_not, write in sources:
        if why_not:
            skipped.append(f"{name}: {why_not}")
        else:
            written.append(write())
    return written, skipped


def _write_latency(run_dir: Path, path: Path) -> Path:
    rows = demo_latencies(run_dir)
    return draw.plot_latency(rows, path, f"Latency per image, demo model on CPU ({rows[-1]['n']} images each)")


def write_prediction_image(run_dir: str | Path, path: str | Path, count: int = 2) -> Path:
    """Truth beside prediction on the best-scored validation images that have a defect."""
    from severstal.model.evaluation import score_images

    scored = [s for s in score_images(run_dir) if s.truth]
    best = sorted(scored[-count:], key=lambda s: s.image_id)
    return draw.plot_prediction_gallery(best, path, "Prediction (right) vs truth (left) on validation images")


def write_figures(out: str | Path, data_dir: str | Path | None = None, run_dir: str | Path | None = None,
                 images_out: str | Path | None = None) -> dict:
    """Write every figure there is data for: the data figures, a run's figures, the README's pictures.

    Args:
        out: folder for the figures (``graphs/``).
        data_dir: the dataset; default: the real sample beside the repository.
        run_dir: a training run folder (``demo/run``); ``None`` skips the run's figures.
        images_out: folder for the README's pictures (``images/``); ``None`` skips them.

    Returns:
        ``{"written": [paths], "skipped": [reasons]}``.

    Raises:
        FileNotFoundError: no ``data_dir`` was given and the real sample is absent.
    """
    data_dir = data_dir or stats.default_data_dir()
    if data_dir is None:
        raise FileNotFoundError(f"no data: the real sample is not at {real_data_root()}; pass a folder in "
                                "Kaggle's layout (--data)")
    written = write_data_figures(data_dir, out, images_out)
    skipped = []
    if images_out is not None:
        written.append(draw.plot_pipeline(Path(images_out) / "pipeline.png"))
    if run_dir is None:
        skipped.append("run figures and the prediction picture: no run given (--run demo/run after `make demo`)")
    else:
        run_written, run_skipped = write_run_figures(run_dir, out, images_out)
        written += run_written
        skipped += run_skipped
    for path in written:
        log.info("wrote %s (%.0f KB)", path, path.stat().st_size / 1024)
    return {"written": [str(p) for p in written], "skipped": skipped}

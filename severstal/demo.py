"""The end-to-end demo behind ``make demo``: runs offline on synthetic data in minutes on a CPU.

synth -> convert to COCO -> train the ``small`` config -> evaluate with tuning -> export to ONNX and, where
its answers hold, int8 -> predict held-out images with that model -> archive it -> serve with TorchServe and
post held-out images -> report. Every stage calls the same function as its CLI command.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from severstal.files import TRAIN_CSV, TRAIN_IMAGES, write_text_atomic

log = logging.getLogger(__name__)

# The demo's folder: data/, holdout/ (images never trained or tuned on), run/ (the training run), report.json.
DATA_DIR = "data"
HOLDOUT_DIR = "holdout"
RUN_DIR = "run"
REPORT_FILE = "report.json"


@dataclass
class DemoSettings:
    """Sizes of the demo; docs/results.md has its time and scores on 2 CPU cores, with the commands.

    The held-out set is large enough for its Dice to mean something (it moves less than a 24-image one).
    ``seed`` makes the data, the split and the training reproducible up to the order in which threads sum
    (Detectron2's ``SEED``). ``bf16_training`` (None: where the CPU computes bf16 natively and there is no GPU)
    runs the backbone in bfloat16 (``SOLVER.AMP.ENABLED`` on a CPU). ``overlay_images``: how many held-out
    predictions are drawn. ``max_iter`` (None: the config's ``SOLVER.MAX_ITER``, which its ``STEPS`` fit) and
    ``opts``: overrides of ``config``, as for ``train``.
    """

    train_images: int = 300
    holdout_images: int = 100
    config: str = "small"
    max_iter: int | None = None
    seed: int = 0
    served_images: int = 6
    overlay_images: int = 12
    bf16_training: bool | None = None
    opts: list[str] = field(default_factory=list)


def run_demo(out: str | Path, settings: DemoSettings | None = None) -> dict:
    """Run every stage into ``out`` and return the report (also written to ``out/report.json``)."""
    import torch

    from severstal.data.coco import convert_to_coco
    from severstal.data.synth import make_synthetic_dataset
    from severstal.model.backends import cpu_has_bf16
    from severstal.model.evaluation import evaluate
    from severstal.model.predict import predict_folder
    from severstal.model.train import train
    from severstal.serve.archive import archive, export_for_serving
    from severstal.viz.draw import overlay_writer, plot_evaluation

    s = settings or DemoSettings()
    out = Path(out)
    timings: dict[str, float] = {}

    def stage(name, func, *args, **kwargs):
        log.info("demo: %s", name)
        start = time.perf_counter()
        result = func(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 1)
        return result

    data, holdout, run = out / DATA_DIR, out / HOLDOUT_DIR, out / RUN_DIR
    stage("synth", make_synthetic_dataset, data, s.train_images, seed=s.seed)
    stage("synth holdout", make_synthetic_dataset, holdout, s.holdout_images, seed=s.seed + 1)
    coco = stage("convert", convert_to_coco, data / TRAIN_CSV, out / "coco", images=data / TRAIN_IMAGES,
                 val_fraction=0.2, seed=s.seed)
    bf16 = s.bf16_training if s.bf16_training is not None else cpu_has_bf16() and not torch.cuda.is_available()
    iterations = ["SOLVER.MAX_ITER", str(s.max_iter)] if s.max_iter is not None else []
    opts = [*iterations, "SEED", str(s.seed), "SOLVER.AMP.ENABLED", str(bf16), *s.opts]
    weights = stage("train", train, data, s.config, run, opts, evaluate_after=False)  # evaluate is the next stage
    metrics = stage("evaluate", evaluate, weights, data, tune=True)
    plot_evaluation(metrics, run / "eval")
    models, int8 = stage("export", export_for_serving, weights, data / TRAIN_IMAGES)
    served_model = models[-1]  # int8 where its answers held, else fp32 ONNX
    submission = stage("predict", predict_folder, served_model, holdout / TRAIN_IMAGES, out / "submission.csv",
                       on_record=overlay_writer(out / "overlays", s.overlay_images))
    submission["holdout_dice"], submission["holdout_empty_baseline"] = holdout_dice(out / "submission.csv",
                                                                                   holdout / TRAIN_CSV)
    mar = stage("archive", archive, served_model, out / "model_store")
    served = stage("serve", serve_and_post, mar.parent, sorted((holdout / TRAIN_IMAGES).iterdir())[:s.served_images],
                   out / "serve")
    report = {
        "coco": coco,
        "evaluation": metrics,
        "predict": submission,
        "serve": served,
        "seconds": timings,
        "training_precision": "bf16 backbone" if bf16 else "fp32",
        "weights": str(weights),
        "served_model": str(served_model),
        "int8": int8,
        "figures": sorted(str(p) for p in (run / "eval").glob("*.png")),
    }
    write_text_atomic(out / REPORT_FILE, json.dumps(report, indent=1, default=str))
    return report


def holdout_dice(submission: Path, truth_csv: Path) -> tuple[float, float]:
    """Mean Dice of a submission against the true masks of its images (none of them seen in training), and the
    Dice of the all-empty submission on the same images (the score a model must beat)."""
    from severstal.data.annotations import read_submission, read_train_csv  # pandas: imported when used
    from severstal.data.dice import mean_dice

    predicted, truth = read_submission(submission), read_train_csv(truth_csv)
    return (mean_dice(predicted.frame, truth, predicted.image_ids),
            mean_dice(truth.iloc[0:0], truth, predicted.image_ids))


def serve_and_post(model_store: Path, images: list[Path], run_dir: Path) -> dict:
    """Start TorchServe on ``model_store``, post each image once, stop; return one answer and latencies."""
    from severstal.serve.client import post_image
    from severstal.serve.server import running_server

    latencies, answers = [], []
    with running_server(model_store, port=0, run_dir=run_dir) as server:
        url = server.predictions_url("severstal")
        for path in images:
            start = time.perf_counter()
            answers.append(post_image(url, path, server.headers(), timeout=60))
            latencies.append(round(time.perf_counter() - start, 3))
    return {"url": url, "latencies_s": latencies, "first_answer": {"image": images[0].name, **answers[0]}}

"""k-fold cross-validation on a labelled folder: what a model learns from few real labels, beside all-empty.

For each fold (:func:`severstal.data.folds.stratified_folds`, no image in two folds): train the config on the
other folds, tune the thresholds (score, minimum area, presence gate) on a split of that training part only
(``SEVERSTAL.VAL_FRACTION`` of it, class-stratified), then predict the held-out fold and score it with the
competition's Dice beside the all-empty submission on the same images. Images whose truth is incomplete are
never trained on nor scored. Every fold writes ``fold<k>/fold.json`` when it is done; a rerun with the same
``--out`` skips finished folds (resume) and refuses another plan (other folds, config or overrides).

Output (``cv.json``): ``{"plan": {...}, "folds": [fold results], "mean": {...}, "spread": {...}}``, where a fold
result holds ``dice``, ``all_empty``, ``dice_defect_pairs`` (Dice on the pairs whose true mask is not empty),
``dice_defect_pairs_ungated`` (the same before the presence gate and minimum areas: what the masks themselves are
worth where there is a defect), ``dice_tuning_ceiling`` (the Dice with the thresholds tuned on the held-out images
themselves: the most that tuning could reach with these masks and this gate, an upper bound), ``dice_per_class``,
``presence_auc`` (per class, ROC AUC of the image-level score: the presence head's probability, else the best
detection score of the class), the tuned thresholds, ``images`` and ``seconds``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from severstal import CLASS_IDS
from severstal.data.dice import dice_table
from severstal.data.folds import LabelledImages, read_labelled_images, stratified_folds, write_training_folder
from severstal.data.images import read_image
from severstal.files import write_text_atomic
from severstal.model.run import Thresholds

log = logging.getLogger(__name__)

DEFAULT_RECIPE = "fewlabels"
"""The config ``severstal cv`` trains (with the overrides given) when no ``--config`` is named."""
CV_FILE = "cv.json"
PLAN_FILE = "plan.json"
FOLD_FILE = "fold.json"
SUMMARY_KEYS = ("dice", "all_empty", "gain", "dice_defect_pairs")
"""The fold figures averaged (``mean``) and spread (``spread``: standard deviation over folds) in ``cv.json``."""


def presence_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` for binary ``labels`` (the Mann-Whitney statistic, ties counted half); NaN when one
    class of label is absent."""
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if not positives or not negatives:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, dtype=float)).rank(method="average").to_numpy()
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def image_scores(detections) -> np.ndarray:
    """(images, 4) image-level score per class: the presence head's probability, else the class's best
    detection score (0 without one)."""
    rows = []
    for det in detections:
        if det.presence is not None:
            rows.append(np.asarray(det.presence, dtype=float))
        else:
            rows.append([float(det.scores[det.class_ids == c].max(initial=0.0)) for c in CLASS_IDS])
    return np.asarray(rows, dtype=float).reshape(-1, len(CLASS_IDS))


def score_fold(run: str | Path, images: LabelledImages, image_ids: Sequence[str], batch_size: int = 4) -> dict:
    """Predict ``image_ids`` with a trained (and tuned) run and score them against their truth.

    Returns:
        ``dice``, ``all_empty``, ``gain`` (dice - all_empty), ``dice_defect_pairs``, ``dice_defect_pairs_ungated``,
        ``dice_tuning_ceiling``, ``defect_pairs``, ``dice_per_class``, ``presence_auc``, ``images``.
    """
    from severstal.model.evaluation import records_frame
    from severstal.model.predict import Predictor, make_record

    predictor = Predictor.from_weights(run)
    thresholds, min_areas = predictor.thresholds
    records, ungated, detections = [], [], []
    for start in range(0, len(image_ids), batch_size):
        batch = [read_image(images.files[i]) for i in image_ids[start : start + batch_size]]
        for det in predictor.detect(batch):
            detections.append(det)
            records.append(make_record(det, thresholds, min_areas, predictor.presence_thresholds,
                                       predictor.pixel_thresholds))
            ungated.append(make_record(det, thresholds, [0] * len(CLASS_IDS), None, predictor.pixel_thresholds))
    truth = images.masks[images.masks["ImageId"].isin(set(image_ids))]
    table = dice_table(records_frame(list(image_ids), records), truth, image_ids)
    open_table = dice_table(records_frame(list(image_ids), ungated), truth, image_ids)
    empty = dice_table(truth.iloc[0:0], truth, image_ids)
    present = {(i, int(c)) for i, c in zip(truth["ImageId"], truth["ClassId"])}
    scores = image_scores(detections)
    auc = {str(c): presence_auc(scores[:, k], np.array([(i, c) in present for i in image_ids]))
           for k, c in enumerate(CLASS_IDS)}
    dice, all_empty = table["mean_dice"], empty["mean_dice"]
    ceiling = tuning_ceiling(detections, truth, image_ids, predictor.cfg.SEVERSTAL.SCORE_THRESHOLDS)
    return {"dice": dice, "all_empty": all_empty, "gain": dice - all_empty,
            "dice_defect_pairs": table["dice_nonempty"], "dice_defect_pairs_ungated": open_table["dice_nonempty"],
            "dice_tuning_ceiling": ceiling,
            "defect_pairs": table["nonempty_pairs"],
            "dice_per_class": {str(c): v for c, v in table["dice_per_class"].items()}, "presence_auc": auc,
            "images": len(image_ids)}


def tuning_ceiling(detections: Sequence, truth: pd.DataFrame, image_ids: Sequence[str],
                   score_thresholds: Sequence[float]) -> float:
    """Mean Dice of ``detections`` with the thresholds (score, minimum area, gate) tuned on these same images: an
    upper bound of what any tuning could reach with the model's masks and presence scores. ``score_thresholds``
    are kept for a model with the per-pixel head, where they only choose the instances listed (as ``evaluate``)."""
    from severstal.model.evaluation import ImageDetections, rescore, tune_thresholds

    compact = [ImageDetections.from_detections(i, d) for i, d in zip(image_ids, detections)]
    tuned = tune_thresholds(compact, truth, score_thresholds=score_thresholds)
    return rescore(compact, truth, tuned["score_thresholds"], tuned["min_areas"], tuned["presence_thresholds"],
                   tuned.get("pixel_thresholds"))["mean_dice"]


def summarise(folds: list[dict]) -> tuple[dict, dict]:
    """Mean and spread (standard deviation over folds) of :data:`SUMMARY_KEYS`, and the mean per class."""
    mean = {k: float(np.mean([f[k] for f in folds])) for k in SUMMARY_KEYS}
    spread = {k: float(np.std([f[k] for f in folds])) for k in SUMMARY_KEYS}
    for key in ("dice_per_class", "presence_auc"):
        mean[key] = {str(c): float(np.nanmean([f[key][str(c)] for f in folds])) if any(
            np.isfinite(f[key][str(c)]) for f in folds) else float("nan") for c in CLASS_IDS}
    for key in ("dice_defect_pairs_ungated", "dice_tuning_ceiling"):  # absent from folds of older versions
        mean[key] = float(np.nanmean([f.get(key, np.nan) for f in folds]))
    mean["folds_beating_all_empty"] = sum(f["gain"] > 0 for f in folds)
    return mean, spread


def pretrain_on_synthetic(data: str | Path, out: Path, config: str, opts: Sequence[str], images: int, iterations: int,
                          scratch: bool, seed: int = 0) -> Path:
    """Train ``config`` on synthetic strips whose defects have real shapes, once, as the folds' starting weights.

    The shapes are the real masks of the folder's table (the real sample's ``train_partial_newformat.csv``) of
    images that are not in the folder, so no shape of a scored image leaks into pretraining; where there are none
    (a complete Kaggle download), the generator's own drawings are used. Reused when ``out`` already holds it.
    """
    from severstal.data.annotations import read_annotations
    from severstal.data.folds import image_files, masks_csv
    from severstal.data.synth import RealShapes, make_synthetic_dataset
    from severstal.files import WEIGHTS_FILE
    from severstal.model.train import train

    weights = out / "run" / WEIGHTS_FILE
    if weights.is_file():
        log.info("pretraining: done earlier (%s)", weights)
        return weights
    masks = read_annotations(masks_csv(data)).frame
    try:
        shapes = RealShapes(masks, exclude=list(image_files(data)))
    except ValueError as err:
        log.info("pretraining with the generator's own shapes (%s)", err)
        shapes = None
    make_synthetic_dataset(out / "data", images, seed=seed, shapes=shapes)
    log.info("pretraining on %d synthetic images (%s shapes) for %d iterations", images,
             "real" if shapes else "drawn", iterations)
    return train(out / "data", config, out / "run", [*opts, "SOLVER.MAX_ITER", str(iterations)], scratch=scratch,
                 evaluate_after=False)


def cross_validate(data: str | Path, out: str | Path, config: str | Path | None = None, opts: Sequence[str] = (),
                   folds: int = 5, seed: int = 0, scratch: bool = True, pretrain_images: int = 0,
                   pretrain_iterations: int = 500, on_fold: Callable[[int, dict], None] | None = None) -> dict:
    """Run (or resume) a k-fold cross-validation; see the module docstring.

    Args:
        data: a labelled folder: Kaggle's layout or the real sample's (``severstal.data.folds``).
        out: folder for the folds' runs and ``cv.json``.
        config: a named config or YAML; default :data:`DEFAULT_RECIPE`.
        opts: Detectron2-style ``KEY VALUE`` overrides of it, as ``severstal train`` (a lever off, for an ablation).
        folds, seed: the number of folds and the seed of the stratified split.
        scratch: train from random weights (no download); False starts from the config's ``MODEL.WEIGHTS``.
        pretrain_images, pretrain_iterations: first train on this many synthetic strips with real defect shapes
            (:func:`pretrain_on_synthetic`, once for all folds) and start every fold from it; 0 images: off.
        on_fold: called with ``(k, fold result)`` after each fold (finished now or earlier).

    Returns:
        What ``cv.json`` holds.
    """
    from severstal.model.evaluation import evaluate
    from severstal.model.train import train

    out = Path(out)
    opts = [*opts, *bf16_training_opts(opts)]
    images = read_labelled_images(data)
    config = str(config) if config is not None else DEFAULT_RECIPE
    fold_ids = stratified_folds(images.class_sets(), folds, seed)
    plan = {"data": str(Path(data).resolve()), "config": config, "opts": [str(o) for o in opts], "folds": fold_ids,
            "seed": seed, "scratch": scratch, "pretrain": [pretrain_images, pretrain_iterations],
            "images": len(images.files), "left_out_incomplete": images.incomplete}
    _check_plan(out / PLAN_FILE, plan)
    log.info("%d images with complete truth in %d folds; %d left out (incomplete truth)", len(images.files), folds,
             len(images.incomplete))
    fold_opts, fold_scratch = list(opts), scratch
    if pretrain_images:
        started = time.perf_counter()
        weights = pretrain_on_synthetic(data, out / "pretrain", config, opts, pretrain_images, pretrain_iterations,
                                        scratch, seed)
        seconds = out / "pretrain" / "seconds.txt"  # kept, so that a resumed run still reports it
        if not seconds.is_file():
            write_text_atomic(seconds, f"{time.perf_counter() - started:.1f}\n")
        plan["pretrain_seconds"] = float(seconds.read_text())
        fold_opts, fold_scratch = [*opts, "MODEL.WEIGHTS", str(weights)], False
    results = []
    for k, held_out in enumerate(fold_ids):
        fold_dir = out / f"fold{k}"
        done = fold_dir / FOLD_FILE
        if done.is_file():
            result = json.loads(done.read_text())
            log.info("fold %d/%d: done earlier (%s), not trained again", k + 1, folds, done)
        else:
            started = time.perf_counter()
            train_ids = [i for j, ids in enumerate(fold_ids) if j != k for i in ids]
            training_data = write_training_folder(fold_dir / "data", images, train_ids)
            log.info("fold %d/%d: training on %d images, %d held out", k + 1, folds, len(train_ids), len(held_out))
            train(training_data, config, fold_dir / "run", opts=fold_opts, scratch=fold_scratch, evaluate_after=False)
            evaluate(fold_dir / "run", tune=True)
            result = score_fold(fold_dir / "run", images, held_out)
            result.update(fold=k, seconds=round(time.perf_counter() - started, 1),
                          **Thresholds.read(fold_dir / "run").per_class())
            write_text_atomic(done, json.dumps(result, indent=1))
        results.append(result)
        if on_fold is not None:
            on_fold(k, result)
    mean, spread = summarise(results)
    report = {"plan": plan, "folds": results, "mean": mean, "spread": spread}
    write_text_atomic(out / CV_FILE, json.dumps(report, indent=1))
    return report


def bf16_training_opts(opts: Sequence[str]) -> list[str]:
    """``SOLVER.AMP.ENABLED True`` (the backbone in bfloat16) on a CPU with bf16 instructions and no GPU, unless the
    overrides set it: as ``severstal demo`` trains (``severstal.demo.DemoSettings``)."""
    import torch

    from severstal.model.backends import cpu_has_bf16

    if "SOLVER.AMP.ENABLED" in opts[::2] or torch.cuda.is_available() or not cpu_has_bf16():
        return []
    return ["SOLVER.AMP.ENABLED", "True"]


def _check_plan(path: Path, plan: dict) -> None:
    """Write the plan of a new CV, or check that a resumed one has the same (else its folds would mix)."""
    if path.is_file():
        old = json.loads(path.read_text())
        differs = [k for k in ("config", "opts", "folds", "seed", "scratch", "pretrain") if old.get(k) != plan[k]]
        if differs:
            raise ValueError(f"{path.parent} holds a cross-validation with other {', '.join(differs)}: "
                             "choose another --out to run this one")
        return
    write_text_atomic(path, json.dumps(plan, indent=1))

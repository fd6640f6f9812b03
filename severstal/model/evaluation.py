"""Evaluation: the competition's mean Dice (a Detectron2 evaluator), COCO AP, and threshold tuning.

Mean Dice counts every (image, class) pair, empty ones included, and scores an empty pair predicted
empty as 1: false positives on defect-free pairs cost most, so per-class score thresholds and minimum
areas are tuned on the validation split to maximise it (:func:`tune_thresholds`).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from severstal import CLASS_IDS
from severstal.data.annotations import read_train_csv
from severstal.data.datasets import register_data_dir, unregister
from severstal.data.dice import dice_from_areas, dice_per_image, dice_table
from severstal.data.images import read_image
from severstal.data.rle import coco_rle_to_kaggle, kaggle_to_coco_rle
from severstal.files import EVALUATION_DIR, EVALUATION_FILE, THRESHOLDS_FILE, TRAIN_CSV, TRAIN_IMAGES, write_text_atomic
from severstal.model.backends import make_backend
from severstal.model.config import load_bundle
from severstal.model.predict import (
    CLASS_OFF,
    Detections,
    Predictor,
    class_instances,
    class_pixels,
    keeps_class_mask,
    make_record,
    passes_gate,
)
from severstal.model.run import Thresholds

log = logging.getLogger(__name__)

SCORE_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_AREA_GRID = (0, 50, 100, 200, 400, 800, 1200, 1600, 2400, 3200)
PRESENCE_GRID = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
PIXEL_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass
class ImageDetections:
    """:class:`Detections` of one image kept compact for tuning: masks as COCO RLE, pixel probabilities (models
    with the per-pixel head) in float16."""

    image_id: str
    det: Detections
    rles: list = field(default_factory=list)

    @classmethod
    def from_detections(cls, image_id: str, det: Detections) -> ImageDetections:
        rles = mask_util.encode(np.asfortranarray(det.masks.transpose(1, 2, 0).astype(np.uint8)))
        empty = np.zeros((0, det.height, det.width), dtype=bool)
        probs = None if det.class_probs is None else det.class_probs.astype(np.float16)
        compact = Detections(det.height, det.width, det.boxes, det.scores, det.class_ids, empty, det.presence, probs)
        return cls(image_id, compact, list(rles))

    @property
    def class_ids(self) -> np.ndarray:
        return self.det.class_ids

    @property
    def scores(self) -> np.ndarray:
        return self.det.scores

    def to_detections(self) -> Detections:
        masks = mask_util.decode(self.rles).transpose(2, 0, 1).astype(bool) if self.rles else self.det.masks
        probs = None if self.det.class_probs is None else self.det.class_probs.astype(np.float32)
        return Detections(self.det.height, self.det.width, self.det.boxes, self.det.scores, self.det.class_ids, masks,
                          self.det.presence, probs)


def instances_to_detections(instances, height: int, width: int, presence=None, class_probs=None) -> Detections:
    """Detectron2 ``Instances`` (post-processed, original size) and the image's presence and pixel probabilities
    (or None) -> :class:`Detections`."""
    instances = instances.to("cpu")
    return Detections(
        height=height,
        width=width,
        boxes=instances.pred_boxes.tensor.numpy().astype(np.float32),
        scores=instances.scores.numpy().astype(np.float32),
        class_ids=instances.pred_classes.numpy().astype(np.int64) + 1,
        masks=instances.pred_masks.numpy().astype(bool),
        presence=None if presence is None else np.asarray(presence, dtype=np.float32),
        class_probs=class_probs,
    )


def truth_frame(dataset_dicts: list[dict]) -> pd.DataFrame:
    """Per-class Kaggle RLE truth (``ImageId, ClassId, EncodedPixels``) from Detectron2 dataset dicts."""
    rows = []
    for d in dataset_dicts:
        by_class: dict[int, list] = {}
        for ann in d["annotations"]:
            by_class.setdefault(ann["category_id"] + 1, []).append(ann["segmentation"])
        for class_id, segs in sorted(by_class.items()):
            rles = [dict(s, counts=s["counts"].encode()) if isinstance(s["counts"], str) else s for s in segs]
            rows.append((d["image_id"], class_id, coco_rle_to_kaggle(mask_util.merge(rles))))
    return pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"])


def records_frame(image_ids: list[str], records: list[dict]) -> pd.DataFrame:
    """Predicted per-class RLE (``ImageId, ClassId, EncodedPixels``, non-empty only) from records."""
    rows = [(i, int(c), rle) for i, r in zip(image_ids, records) for c, rle in r["classes"].items() if rle]
    return pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"])


class DiceEvaluator(DatasetEvaluator):
    """The competition's mean Dice over every (image, class) pair of a registered Severstal split.

    Predictions go through the same :func:`severstal.model.predict.make_record` as prediction and serving,
    with the config's per-class thresholds. Results: ``mean_dice``, ``dice_class_<k>``,
    ``dice_nonempty`` and ``empty_baseline`` (the score of predicting nothing at all).
    """

    def __init__(self, dataset_name: str, cfg):
        self.dataset_name = dataset_name
        self.score_thresholds = list(cfg.SEVERSTAL.SCORE_THRESHOLDS)
        self.min_areas = list(cfg.SEVERSTAL.MIN_AREAS)
        self.presence_thresholds = list(cfg.SEVERSTAL.PRESENCE_THRESHOLDS)
        self.pixel_thresholds = list(cfg.SEVERSTAL.PIXEL_THRESHOLDS)
        self.reset()

    def reset(self):
        self.records: dict[str, dict] = {}
        self.detections: list[ImageDetections] = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            det = instances_to_detections(out["instances"], inp["height"], inp["width"], out.get("presence"),
                                          out.get("class_probs"))
            self.records[inp["image_id"]] = make_record(det, self.score_thresholds, self.min_areas,
                                                        self.presence_thresholds, self.pixel_thresholds)
            self.detections.append(ImageDetections.from_detections(inp["image_id"], det))

    def evaluate(self):
        comm.synchronize()
        records = {k: v for part in comm.gather(self.records, dst=0) for k, v in part.items()}
        self.detections = list(itertools.chain(*comm.gather(self.detections, dst=0)))
        if not comm.is_main_process():
            return {}
        truth = truth_frame(DatasetCatalog.get(self.dataset_name))
        ids = sorted(records)
        table = dice_table(records_frame(ids, [records[i] for i in ids]), truth, ids)
        empty = dice_table(truth.iloc[0:0], truth, ids)
        results = {"mean_dice": table["mean_dice"], "dice_nonempty": table["dice_nonempty"],
                   "empty_baseline": empty["mean_dice"]}
        results.update({f"dice_class_{c}": table["dice_per_class"][c] for c in CLASS_IDS})
        return OrderedDict(dice=results)

    def rescore(self, score_thresholds, min_areas, truth: pd.DataFrame, presence_thresholds=None,
                pixel_thresholds=None) -> dict:
        """The Dice table of the stored detections under other thresholds (after :meth:`evaluate`)."""
        return rescore(self.detections, truth, score_thresholds, min_areas, presence_thresholds, pixel_thresholds)


def rescore(detections: list[ImageDetections], truth: pd.DataFrame, score_thresholds, min_areas,
            presence_thresholds=None, pixel_thresholds=None) -> dict:
    """The Dice table (``dice_table``) of these detections' records under the given thresholds."""
    ids = [d.image_id for d in detections]
    records = [make_record(d.to_detections(), score_thresholds, min_areas, presence_thresholds, pixel_thresholds)
               for d in detections]
    return dice_table(records_frame(ids, records), truth, ids)


def tune_thresholds(detections: list[ImageDetections], truth: pd.DataFrame, shape=(256, 1600),
                    score_grid=SCORE_GRID, min_area_grid=MIN_AREA_GRID, presence_grid=PRESENCE_GRID,
                    pixel_grid=PIXEL_GRID, score_thresholds=(0.5, 0.5, 0.5, 0.5)) -> dict:
    """Per class, the score threshold (or, for a model with the per-pixel head, the pixel threshold), minimum area
    and presence threshold that maximise mean Dice on these images.

    Classes are independent in mean Dice, so each is tuned alone over the grid. The presence grid is searched
    only when the detections carry presence probabilities (a model with the presence head); otherwise the gate
    stays open (0). When they carry pixel probabilities, the class masks come from them (``make_record``): the
    pixel grid is searched instead of the score grid, and the score thresholds, which then only pick the
    instances listed beside the masks, stay ``score_thresholds``. A class is only predicted where that beats
    leaving it empty on every image: otherwise its minimum area becomes :data:`CLASS_OFF`. Ties go to the safer
    choice: off, then the highest gate, threshold and minimum area (on a few images an empty pair's whole point is
    worth more than a tie suggests).

    Returns:
        ``{"score_thresholds": [4 floats], "min_areas": [4 ints], "presence_thresholds": [4 floats], "curves":
        {class: {threshold: [dice per min area]}} (at the chosen gate), "dice_per_class": {class: best dice}}``,
        and ``"pixel_thresholds"`` for a model with the per-pixel head.
    """

    truth_rles = {(r.ImageId, int(r.ClassId)): kaggle_to_coco_rle(r.EncodedPixels, shape) for r in truth.itertuples()}
    gated = bool(detections) and all(d.det.presence is not None for d in detections)
    pixels = bool(detections) and all(d.det.class_probs is not None for d in detections)
    gates = presence_grid if gated else (0.0,)
    grid = pixel_grid if pixels else score_grid
    result = {"score_thresholds": [], "min_areas": [], "presence_thresholds": [], "curves": {}, "dice_per_class": {}}
    for index, class_id in enumerate(CLASS_IDS):
        presence = np.array([d.det.presence[index] for d in detections]) if gated else None
        areas = _pixel_areas if pixels else _instance_areas
        curves: dict = {gate: {} for gate in gates}
        empty = float(np.mean([(d.image_id, class_id) not in truth_rles for d in detections])) if detections else 1.0
        best = (empty, grid[-1], CLASS_OFF, gates[0])
        for t in reversed(grid):
            inter, pred, true = map(np.asarray, zip(*[areas(d, index, t, truth_rles.get((d.image_id, class_id)))
                                                      for d in detections]) if detections else ([], [], []))
            for gate in reversed(gates):
                row = []
                for min_area in min_area_grid:
                    kept = keeps_class_mask(pred, min_area) & passes_gate(presence, gate)
                    row.append(float(dice_from_areas(inter * kept, pred * kept, true).mean()))
                curves[gate][t] = row
                j = len(row) - 1 - int(np.argmax(row[::-1]))  # the largest minimum area among the best
                if row[j] > best[0]:
                    best = (row[j], t, min_area_grid[j], gate)
        if pixels:
            result.setdefault("pixel_thresholds", []).append(best[1])
        result["score_thresholds"].append(score_thresholds[index] if pixels else best[1])
        result["min_areas"].append(best[2])
        result["presence_thresholds"].append(best[3])
        result["curves"][class_id] = {t: curves[best[3]][t] for t in grid}
        result["dice_per_class"][class_id] = best[0]
    return result


def _instance_areas(d: ImageDetections, index: int, threshold: float, gt) -> tuple[int, int, int]:
    """(intersection, predicted, true) pixels of class ``index``'s mask from instances scoring ``threshold``."""
    chosen = [d.rles[i] for i in class_instances(d.class_ids, d.scores, CLASS_IDS[index], threshold)]
    union = mask_util.merge(chosen) if chosen else None
    inter = int(mask_util.area(mask_util.merge([union, gt], intersect=True))) if union and gt else 0
    return inter, int(mask_util.area(union)) if union else 0, int(mask_util.area(gt)) if gt else 0


def _pixel_areas(d: ImageDetections, index: int, threshold: float, gt) -> tuple[int, int, int]:
    """(intersection, predicted, true) pixels of class ``index``'s mask from the per-pixel head at ``threshold``."""
    mask = class_pixels(d.det.class_probs[index], threshold)
    true = mask_util.decode(gt).astype(bool) if gt else None
    return int((mask & true).sum()) if gt else 0, int(mask.sum()), int(true.sum()) if gt else 0


def save_thresholds(tuned: dict, folder: str | Path) -> Path:
    """Write what :func:`tune_thresholds` chose as the run's ``thresholds.json``, checked, atomically."""
    saved = {k: tuned[k] for k in ("score_thresholds", "min_areas", "presence_thresholds", "pixel_thresholds",
                                   "dice_per_class") if k in tuned}
    return Thresholds.from_dict(saved, where=str(Path(folder) / THRESHOLDS_FILE)).write(folder)


def detections_to_instances(det: Detections):
    """:class:`Detections` -> Detectron2 ``Instances`` (what Detectron2's evaluators consume)."""
    import torch
    from detectron2.structures import Boxes, Instances

    instances = Instances((det.height, det.width))
    instances.pred_boxes = Boxes(torch.as_tensor(det.boxes))
    instances.scores = torch.as_tensor(det.scores)
    instances.pred_classes = torch.as_tensor(det.class_ids - 1)
    instances.pred_masks = torch.as_tensor(det.masks)
    return instances


def evaluation_dir(weights: str | Path, output_dir: str | Path | None = None) -> Path:
    """Where :func:`evaluate` writes: ``output_dir``, else ``eval/`` in the run folder of ``weights`` (a weights file
    or the folder itself)."""
    run = Path(weights) if Path(weights).is_dir() else Path(weights).parent
    return Path(output_dir or run / EVALUATION_DIR)


def evaluate(weights: str | Path, data_dir: str | Path | None = None, output_dir: str | Path | None = None,
             tune: bool = False, tta: bool = False, batch_size: int = 4, predictor=None) -> dict:
    """Evaluate a training run on its validation split: mean Dice, per-class Dice, COCO AP.

    Args:
        weights: the run's weights file or output folder (``config.yaml`` and ``split.json`` beside it).
        data_dir: the data folder (Kaggle layout); default: the one the run was trained on.
        output_dir: where COCO results and ``evaluation.json`` go; default ``<run>/eval`` (:func:`evaluation_dir`).
        tune: pick per-class score thresholds and minimum areas on this split and save them next to
            the weights (``thresholds.json``) for prediction and serving.
        tta: merge flipped views (the config's ``SEVERSTAL.TTA_FLIPS``).
        predictor: a ready :class:`severstal.model.predict.Predictor` (another backend); default: PyTorch.

    Returns:
        ``mean_dice``, ``dice_per_class``, ``dice_nonempty``, ``empty_baseline``, ``segm_AP``, ``bbox_AP``,
        ``images``, and with ``tune`` the chosen ``score_thresholds`` / ``min_areas``, the Dice before
        tuning (``mean_dice_untuned``) and the search's ``threshold_curves``: ``{"min_areas": [grid], "dice":
        {class: {score threshold: [Dice per min area]}}}`` (what :func:`severstal.viz.draw.plot_evaluation` draws).
    """
    from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
    from tqdm import tqdm


    bundle = load_bundle(weights)
    cfg = bundle.cfg
    data_dir = Path(data_dir or cfg.SEVERSTAL.DATA_DIR)
    output_dir = evaluation_dir(bundle.folder, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    predictor = predictor or Predictor(cfg, backend=make_backend(None, cfg), tta=tta)
    name = "severstal_eval"
    split = register_data_dir(data_dir, None, name, image_ids=bundle.val_image_ids or None)
    try:
        dicts = DatasetCatalog.get(name)
        dice_eval = DiceEvaluator(name, cfg)
        evaluators = DatasetEvaluators([
            dice_eval,
            COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False, output_dir=str(output_dir),
                          use_fast_impl=False),
        ])
        evaluators.reset()
        for start in tqdm(range(0, len(dicts), batch_size), desc="evaluate", unit="batch"):
            batch = dicts[start : start + batch_size]
            dets = predictor.detect([read_image(d["file_name"]) for d in batch])
            evaluators.process(batch, [{"instances": detections_to_instances(d), "presence": d.presence,
                                        "class_probs": d.class_probs} for d in dets])
        raw = evaluators.evaluate()
        truth = truth_frame(dicts)
    finally:
        unregister(name)
    dice = raw["dice"]
    results = {
        "mean_dice": dice["mean_dice"],
        "dice_per_class": {str(c): dice[f"dice_class_{c}"] for c in CLASS_IDS},
        "dice_nonempty": dice["dice_nonempty"],
        "empty_baseline": dice["empty_baseline"],
        "segm_AP": float(raw.get("segm", {}).get("AP", float("nan"))),
        "bbox_AP": float(raw.get("bbox", {}).get("AP", float("nan"))),
        "images": len(split["val"]),
    }
    if tune:
        tuned = tune_thresholds(dice_eval.detections, truth, score_thresholds=cfg.SEVERSTAL.SCORE_THRESHOLDS)
        save_thresholds(tuned, bundle.folder)
        table = dice_eval.rescore(tuned["score_thresholds"], tuned["min_areas"], truth, tuned["presence_thresholds"],
                                  tuned.get("pixel_thresholds"))
        results["mean_dice_untuned"] = results["mean_dice"]
        results["mean_dice"] = table["mean_dice"]
        results["dice_per_class"] = {str(c): table["dice_per_class"][c] for c in CLASS_IDS}
        results["dice_nonempty"] = table["dice_nonempty"]
        results["score_thresholds"] = tuned["score_thresholds"]
        results["min_areas"] = tuned["min_areas"]
        results["presence_thresholds"] = tuned["presence_thresholds"]
        if "pixel_thresholds" in tuned:
            results["pixel_thresholds"] = tuned["pixel_thresholds"]
        results["threshold_curves"] = {"min_areas": list(MIN_AREA_GRID), "dice": {
            str(c): {f"{t:g}": row for t, row in curves.items()} for c, curves in tuned["curves"].items()}}
    write_text_atomic(output_dir / EVALUATION_FILE, json.dumps(results, indent=1))
    return results


class ScoredImage(NamedTuple):
    """One predicted image with its Dice: what a gallery of the best or worst images shows.

    Attributes:
        image_id: the ImageId.
        path: its file.
        dice: mean Dice of its four (image, class) pairs.
        truth: class id -> Kaggle RLE of the true masks.
        record: the predicted answer (:func:`severstal.model.predict.make_record`).
    """

    image_id: str
    path: Path
    dice: float
    truth: dict
    record: dict


def score_images(weights: str | Path, data_dir: str | Path | None = None, image_ids: list[str] | None = None,
                 predictor=None, batch_size: int = 4) -> list[ScoredImage]:
    """Predict images of a data folder and score each with the competition's Dice, worst first.

    Args:
        weights: a training run's weights file or folder (its tuned thresholds apply when saved).
        data_dir: the data folder (Kaggle layout); default: the one the run was trained on.
        image_ids: the images to score; default: the run's validation split.
        predictor: a ready :class:`severstal.model.predict.Predictor`; default: PyTorch from ``weights``.

    Returns:
        :class:`ScoredImage` s sorted by Dice, lowest first (ties by ImageId).
    """

    bundle = load_bundle(weights)
    data_dir = Path(data_dir or bundle.cfg.SEVERSTAL.DATA_DIR)
    image_ids = list(image_ids if image_ids is not None else bundle.val_image_ids)
    if not image_ids:
        raise ValueError(f"no images to score: {bundle.folder} has no validation split; pass image_ids")
    predictor = predictor or Predictor(bundle.cfg, backend=make_backend(None, bundle.cfg))
    paths = [data_dir / TRAIN_IMAGES / i for i in image_ids]
    records = {path.name: record for path, record in predictor.predict_files(paths, batch_size=batch_size)}
    truth = read_train_csv(data_dir / TRAIN_CSV)
    truth = truth[truth["ImageId"].isin(image_ids)]
    scores = dice_per_image(records_frame(image_ids, [records[i] for i in image_ids]), truth, image_ids)
    true_rles = {i: dict(zip(g["ClassId"].astype(int), g["EncodedPixels"])) for i, g in truth.groupby("ImageId")}
    scored = [ScoredImage(i, p, float(d), true_rles.get(i, {}), records[i])
              for i, p, d in zip(image_ids, paths, scores["mean_dice"])]
    return sorted(scored, key=lambda s: (s.dice, s.image_id))

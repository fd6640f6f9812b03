"""Prediction: image -> Mask R-CNN -> instances -> per-class masks -> Kaggle RLE records.

The pipeline is split so that every backend (PyTorch, ONNX Runtime, TensorRT) shares the same pre- and
post-processing and differs only in running the network:

    preprocess (decode, resize)  ->  backend.run  ->  postprocess (rescale boxes, flip-merge, paste masks)
    ->  Detections  ->  make_record (score thresholds, minimum areas, presence gate, RLE)

A record is the REST answer for one image (the README's curl stage shows one)::

    {"height": 256, "width": 1600,
     "defects": [{"class_id": 3, "score": 0.97, "bbox": [x0, y0, x1, y1], "area": 5123, "rle": "..."}],
     "classes": {"1": "", "2": "", "3": "<Kaggle RLE>", "4": ""}}
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.layers import batched_nms, paste_masks_in_image
from detectron2.structures import Boxes, pairwise_iou
from tqdm import tqdm

from severstal import CLASS_IDS
from severstal.data.annotations import list_images, write_submission
from severstal.data.dice import dice
from severstal.data.images import ImageError, read_image
from severstal.data.rle import mask_to_rle, rle_to_mask
from severstal.model.backends import Backend, RawOutput, TorchBackend, make_backend
from severstal.model.config import ModelBundle, load_bundle

log = logging.getLogger(__name__)


@dataclass
class Detections:
    """Instances of one image at its original size, before thresholds.

    Attributes:
        height, width: the original image size.
        boxes: (N, 4) float32 XYXY in pixels of the original image.
        scores: (N,) float32.
        class_ids: (N,) int64, Kaggle class ids 1..4.
        masks: (N, height, width) bool.
        presence: (4,) float32 image-level probability of classes 1..4 (models with the presence head), or None.
        class_probs: (4, height, width) float32 probability of classes 1..4 at each pixel (models with the
            per-pixel head, ``SEVERSTAL.SEMANTIC_HEAD``), or None.
    """

    height: int
    width: int
    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    masks: np.ndarray
    presence: np.ndarray | None = None
    class_probs: np.ndarray | None = None


def prediction_resize(cfg) -> T.ResizeShortestEdge:
    """The resize every image gets before the network at prediction time."""
    return T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)


def network_input(image: np.ndarray, resize: T.ResizeShortestEdge) -> torch.Tensor:
    """(H, W, 3) uint8 BGR -> (3, H', W') float32 tensor at the network's input size."""
    resized = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)), dtype=torch.float32)


class Predictor:
    """Predicts Severstal records from images with any backend and the config's thresholds.

    Args:
        cfg: a Severstal config (``severstal.model.config``) with ``SEVERSTAL`` thresholds.
        backend: runs the network; default: the PyTorch model from ``cfg.MODEL.WEIGHTS``.
        tta: apply the config's ``SEVERSTAL.TTA_FLIPS``.
    """

    def __init__(self, cfg, backend: Backend | None = None, tta: bool = False):
        self.cfg = cfg
        self.backend = backend if backend is not None else TorchBackend(cfg)
        self.resize = prediction_resize(cfg)
        self.flips = list(cfg.SEVERSTAL.TTA_FLIPS) if tta else []
        self.score_floor = float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST)

    @classmethod
    def from_weights(cls, weights_or_folder: str | Path, device: str | None = None, tta: bool = False,
                     backend: str | None = None, precision: str | None = None) -> Predictor:
        """A predictor for a run's weights, an exported model (``.onnx``, ``.engine``) or their folder.

        Args:
            backend: "torch", "onnxruntime", "openvino" or "tensorrt" (``severstal.model.backends``); default:
                ``choose_backend``'s for the model file.
            precision: "fp32", "bf16" or "fp16" where the backend has it; default: ``choose_backend``'s
                (fp32 on a CPU). ``predictor.backend.choice`` says which.
        """
        bundle: ModelBundle = load_bundle(weights_or_folder, device=device)
        return cls(bundle.cfg, backend=make_backend(backend, bundle.cfg, precision=precision), tta=tta)

    @property
    def thresholds(self) -> tuple[list[float], list[int]]:
        """Per-class score thresholds and minimum areas (classes 1..4)."""
        return list(self.cfg.SEVERSTAL.SCORE_THRESHOLDS), list(self.cfg.SEVERSTAL.MIN_AREAS)

    @property
    def presence_thresholds(self) -> list[float]:
        """Per class 1..4, the presence probability under which a class mask is emptied (see :func:`make_record`)."""
        return list(self.cfg.SEVERSTAL.PRESENCE_THRESHOLDS)

    @property
    def pixel_thresholds(self) -> list[float]:
        """Per class 1..4, the probability a pixel of the per-pixel head needs to be in the class mask."""
        return list(self.cfg.SEVERSTAL.PIXEL_THRESHOLDS)

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 BGR -> (3, H', W') float32 tensor at the network's input size."""
        return network_input(image, self.resize)

    def detect(self, images: Sequence[np.ndarray], min_scores: Sequence[float] | None = None) -> list[Detections]:
        """All instances above the config's score floor, at each image's original size.

        Args:
            images: (H, W, 3) uint8 BGR arrays; sizes may differ.
            min_scores: per class 1..4, also drop instances below their class's score before their masks are
                pasted (``predict`` passes its thresholds: pasting masks that ``make_record`` drops is wasted).
        """
        tensors = [self.preprocess(image) for image in images]
        # Without TTA nothing under the lowest threshold can count, so the backend may skip it; TTA averages
        # the scores of both views, so it needs every detection above the floor.
        min_score = min(min_scores) if min_scores is not None and not self.flips else 0.0
        raws = self.backend.run(tensors, min_score=min_score)
        for i, flip in enumerate(self.flips):
            dim = 2 if flip == "horizontal" else 1
            flipped = self.backend.run([t.flip(dim) for t in tensors])
            raws = [_merge(raw, _unflip(f, t.shape[1:], flip), self.cfg.SEVERSTAL.TTA_MERGE_IOU, views=2 + i)
                    for raw, f, t in zip(raws, flipped, tensors)]
        return [self.postprocess(raw, t.shape[1:], image.shape[:2], min_scores)
                for raw, t, image in zip(raws, tensors, images)]

    def postprocess(self, raw: RawOutput, input_hw: tuple[int, int], original_hw: tuple[int, int],
                    min_scores: Sequence[float] | None = None) -> Detections:
        """Rescale boxes to the original image and paste the instance masks there (see :meth:`detect`)."""
        keep = raw.scores >= self.score_floor
        if min_scores is not None:
            keep &= raw.scores >= torch.as_tensor(min_scores, dtype=raw.scores.dtype)[raw.classes]
        boxes = raw.boxes[keep].clone()
        height, width = int(original_hw[0]), int(original_hw[1])
        boxes[:, 0::2] *= width / input_hw[1]
        boxes[:, 1::2] *= height / input_hw[0]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        if len(boxes):
            masks = paste_masks_in_image(
                raw.mask_probs[keep], Boxes(boxes), (height, width), threshold=self.cfg.SEVERSTAL.MASK_THRESHOLD
            ).numpy()
        else:
            masks = np.zeros((0, height, width), dtype=bool)
        return Detections(
            height=height,
            width=width,
            boxes=boxes.numpy().astype(np.float32),
            scores=raw.scores[keep].numpy().astype(np.float32),
            class_ids=raw.classes[keep].numpy().astype(np.int64) + 1,
            masks=masks,
            presence=None if raw.presence is None else raw.presence.numpy().astype(np.float32),
            class_probs=None if raw.class_probs is None else self._pixel_map(raw.class_probs, input_hw,
                                                                             (height, width)),
        )

    def _pixel_map(self, class_probs: torch.Tensor, input_hw: tuple[int, int], original_hw: tuple[int, int]):
        """(C, h, w) probabilities over the padded input at the head's stride -> (C, H, W) float32 at the original
        size: upsampled to the input's pixels (as Detectron2's semantic heads do), cropped to the unpadded input,
        resized to the image."""
        stride = self.cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE
        x = torch.nn.functional.interpolate(class_probs[None].float(), scale_factor=stride, mode="bilinear",
                                            align_corners=False)[..., : input_hw[0], : input_hw[1]]
        if tuple(input_hw) != tuple(original_hw):
            x = torch.nn.functional.interpolate(x, size=original_hw, mode="bilinear", align_corners=False)
        return x[0].numpy().astype(np.float32)

    def predict(self, images: Sequence[np.ndarray]) -> list[dict]:
        """Records (the REST answer) for a batch of (H, W, 3) uint8 BGR images."""
        thresholds, min_areas = self.thresholds
        return [make_record(d, thresholds, min_areas, self.presence_thresholds, self.pixel_thresholds)
                for d in self.detect(images, min_scores=thresholds)]

    def predict_files(self, paths: Iterable[Path], batch_size: int = 4, progress: bool = True,
                      skip_unreadable: bool = False) -> Iterator[tuple[Path, dict]]:
        """Yield ``(path, record)`` for image files, in their order, in batches, with a progress bar.

        Args:
            skip_unreadable: a file that cannot be read or decoded (missing, empty, truncated, not an image)
                yields :func:`unreadable_record` instead of raising, so that one bad file costs no other.
        """
        paths = list(paths)
        with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress) as bar:
            for start in range(0, len(paths), batch_size):
                chunk = paths[start : start + batch_size]
                if skip_unreadable:
                    records = predict_readable(self, [functools.partial(read_image, p) for p in chunk])
                else:
                    records = self.predict([read_image(p) for p in chunk])
                yield from zip(chunk, records)
                bar.update(len(chunk))


def _unflip(raw: RawOutput, input_hw: tuple[int, int], flip: str) -> RawOutput:
    """Map detections made on a flipped input back to the unflipped input."""
    boxes = raw.boxes.clone()
    if flip == "horizontal":
        boxes[:, [0, 2]] = input_hw[1] - raw.boxes[:, [2, 0]]
        masks = raw.mask_probs.flip(2)
    else:
        boxes[:, [1, 3]] = input_hw[0] - raw.boxes[:, [3, 1]]
        masks = raw.mask_probs.flip(1)
    # The pixel map covers the input padded to the backbone's size divisibility: a flip of a padded input would
    # shift it by the padding (Severstal's 1600 x 256 strips have none).
    class_probs = None if raw.class_probs is None else raw.class_probs.flip(2 if flip == "horizontal" else 1)
    return RawOutput(boxes=boxes, scores=raw.scores, classes=raw.classes, mask_probs=masks, presence=raw.presence,
                     class_probs=class_probs)


def _merge(a: RawOutput, b: RawOutput, iou: float, views: int = 2) -> RawOutput:
    """Merge two views' detections: per-class NMS, then each kept detection takes the mean score and
    mask of the detections it overlaps (same class, IoU > ``iou``); one view's lone detection is halved.
    Presence and pixel probabilities are averaged over the ``views`` seen so far (``a`` holds the mean of
    ``views - 1``)."""
    presence = None if a.presence is None else (a.presence * (views - 1) + b.presence) / views
    class_probs = None if a.class_probs is None else (a.class_probs * (views - 1) + b.class_probs) / views
    boxes = torch.cat([a.boxes, b.boxes])
    scores = torch.cat([a.scores, b.scores])
    classes = torch.cat([a.classes, b.classes])
    masks = torch.cat([a.mask_probs, b.mask_probs])
    if len(boxes) == 0:
        return RawOutput(a.boxes, a.scores, a.classes, a.mask_probs, presence, class_probs)
    keep = batched_nms(boxes, scores, classes, iou)
    overlap = pairwise_iou(Boxes(boxes[keep]), Boxes(boxes)) > iou
    overlap &= classes[keep][:, None] == classes[None, :]
    weights = overlap.float() / 2.0  # two views: a detection seen once scores half
    return RawOutput(
        boxes=boxes[keep],
        scores=(weights @ scores).clamp(max=1.0),
        classes=classes[keep],
        mask_probs=torch.einsum("kn,nij->kij", weights, masks) / weights.sum(1).clamp(min=1e-6)[:, None, None],
        presence=presence,
        class_probs=class_probs,
    )


def class_instances(class_ids: np.ndarray, scores: np.ndarray, class_id: int, score_threshold: float) -> np.ndarray:
    """Indices of the instances whose union is class ``class_id``'s mask: that class, scoring at least the threshold.

    With :func:`keeps_class_mask`, the one rule that turns detections into a class mask: prediction
    (:func:`make_record`) and threshold tuning (``severstal.model.evaluation.tune_thresholds``) both use it.
    """
    return np.flatnonzero((class_ids == class_id) & (scores >= score_threshold))


CLASS_OFF = 2**31 - 1
"""A class's minimum area when the class is never predicted (tuning found no setting that beats leaving it empty)."""


def keeps_class_mask(area, min_area: int):
    """Whether a class mask of ``area`` pixels (an int or an array of them) is kept rather than emptied.

    A mask is kept when it is non-empty and has at least ``min_area`` pixels: a false mask on an empty
    (image, class) pair costs a whole Dice point, so small ones are dropped.
    """
    return np.asarray(area) >= max(int(min_area), 1)


def passes_gate(presence, threshold: float):
    """Whether an image-level presence probability (a float, an array of them, or None for a model without the
    presence head) lets a class mask through: at least ``threshold``. With ``class_instances`` and
    :func:`keeps_class_mask`, part of the one class-mask rule."""
    return True if presence is None else np.asarray(presence) >= threshold


def class_pixels(class_probs: np.ndarray, threshold: float) -> np.ndarray:
    """A class mask from the per-pixel head: the pixels whose probability of the class is at least ``threshold``.
    Part of the one class-mask rule (see :func:`class_instances`)."""
    return class_probs >= threshold


def make_record(det: Detections, score_thresholds: Sequence[float], min_areas: Sequence[int],
                presence_thresholds: Sequence[float] | None = None,
                pixel_thresholds: Sequence[float] | None = None) -> dict:
    """The answer for one image: instances above their class's score threshold, and per-class masks.

    A class mask is the union of its kept instances (:func:`class_instances`), or for a model with the per-pixel
    head its pixels at the class's pixel threshold (:func:`class_pixels`, default 0.5); when
    :func:`keeps_class_mask` or the presence gate (:func:`passes_gate`, models with the presence head) says no,
    it is emptied together with its instances.
    """
    defects, classes = [], {}
    for index, class_id in enumerate(CLASS_IDS):
        chosen = class_instances(det.class_ids, det.scores, class_id, score_thresholds[index])
        if det.class_probs is not None:
            union = class_pixels(det.class_probs[index], pixel_thresholds[index] if pixel_thresholds else 0.5)
        else:
            union = det.masks[chosen].any(axis=0) if len(chosen) else None
        gate = presence_thresholds[index] if presence_thresholds is not None else 0.0
        presence = None if det.presence is None else det.presence[index]
        if union is None or not keeps_class_mask(int(union.sum()), min_areas[index]) or not passes_gate(presence, gate):
            classes[str(class_id)] = ""
            continue
        classes[str(class_id)] = mask_to_rle(union)
        for i in chosen:
            area = int(det.masks[i].sum())
            if area:
                defects.append({
                    "class_id": class_id,
                    "score": round(float(det.scores[i]), 4),
                    "bbox": [round(float(v), 1) for v in det.boxes[i]],
                    "area": area,
                    "rle": mask_to_rle(det.masks[i]),
                })
    defects.sort(key=lambda d: -d["score"])
    return {"height": det.height, "width": det.width, "defects": defects, "classes": classes}


def records_dice(records: Sequence[dict], reference: Sequence[dict]) -> float:
    """Mean Dice of the class masks of ``records`` against ``reference`` (the same images, in order) over every
    (image, class) pair, 1 where both are empty: how far two predictors' answers agree."""
    values = [dice(rle_to_mask(r["classes"][c], (r["height"], r["width"])).astype(bool),
                   rle_to_mask(ref["classes"][c], (ref["height"], ref["width"])).astype(bool))
              for r, ref in zip(records, reference) for c in ref["classes"]]
    return float(np.mean(values)) if values else float("nan")


EXIT_UNREADABLE = 3
"""Exit status of ``severstal predict`` when some files could not be read: the submission is complete (their
masks empty) and every unreadable file is named on stderr, so a pipeline can tell this from success (0) and
from an error that wrote nothing (2 for bad arguments, 1 for anything else)."""


def unreadable_record(error: str) -> dict:
    """The record of an image that could not be read: no defects, every class mask empty, and ``error`` saying why.

    ``height`` and ``width`` are None (unknown). Records of readable images have no ``error`` key.
    """
    return {"height": None, "width": None, "defects": [], "classes": {str(c): "" for c in CLASS_IDS}, "error": error}


def predict_readable(predictor: Predictor, readers: Sequence[Callable[[], np.ndarray]]) -> list[dict]:
    """Records for one batch of images, each given as a reader; an image that cannot be read costs no other.

    Args:
        predictor: predicts the images that were read, together in one batch.
        readers: functions returning an (H, W, 3) uint8 BGR image, or raising ``ImageError`` / ``OSError``
            (``functools.partial(read_image, path)``, or ``decode_image`` of bytes read elsewhere).

    Returns:
        One record per reader, in order; an unreadable image's is :func:`unreadable_record` with the error.
    """
    images, records = {}, {}
    for i, read in enumerate(readers):
        try:
            images[i] = read()
        except (ImageError, OSError) as err:
            records[i] = unreadable_record(str(err))
    if images:
        records.update(zip(images, predictor.predict(list(images.values()))))
    return [records[i] for i in range(len(readers))]


def submission_summary(image_ids: Sequence[str], records: Sequence[dict], out: str | Path, fmt: str = "new") -> dict:
    """Write the Kaggle submission of ``records`` (one per image of ``image_ids``, same order) and summarise it.

    Every (image, class) pair gets a row (:func:`severstal.data.annotations.write_submission`); an unreadable
    image's masks are empty (and it is logged). The single-process and the Ray path both end here, so their
    submissions agree.

    Returns:
        ``images``, ``masks`` (non-empty class masks), ``masks_per_class``, ``submission`` path, and
        ``unreadable``: ``[{"image": ImageId, "error": message}]`` in image order (empty when all were read).
    """
    import pandas as pd

    for record in records:
        if record.get("error"):
            log.warning("unreadable, written with empty masks: %s", record["error"])
    rows = [(image_id, int(c), rle) for image_id, record in zip(image_ids, records)
            for c, rle in record["classes"].items() if rle]
    frame = pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"])
    write_submission(frame, out, image_ids=image_ids, fmt=fmt)
    counts = frame["ClassId"].value_counts()
    return {"images": len(image_ids), "masks": len(frame),
            "masks_per_class": {str(c): int(counts.get(c, 0)) for c in CLASS_IDS}, "submission": str(out),
            "unreadable": [{"image": i, "error": r["error"]} for i, r in zip(image_ids, records) if r.get("error")]}


def predict_folder(weights: str | Path, images: str | Path, out: str | Path, fmt: str = "new", tta: bool = False,
                   batch_size: int = 4, predictor: Predictor | None = None, backend: str | None = None,
                   on_record: Callable[[Path, dict], object] | None = None) -> dict:
    """Predict every image of a folder and write a Kaggle submission with every (image, class) pair.

    A file that cannot be read or decoded does not stop the others: it is logged, its masks are written
    empty, and the summary's ``unreadable`` names it (``severstal predict`` then exits with
    :data:`EXIT_UNREADABLE`).

    Args:
        weights: a training run's weights file or folder, or an exported model (ignored when ``predictor`` is given).
        images: folder of JPEG/PNG images.
        out: submission CSV path, written atomically.
        fmt: "new" (``ImageId,EncodedPixels,ClassId``) or "old" (``ImageId_ClassId,EncodedPixels``).
        tta: merge horizontally/vertically flipped views.
        backend: "torch", "onnxruntime" or "tensorrt"; default: the one ``weights`` runs on.
        on_record: called with each image file and its record as they come (e.g.
            :func:`severstal.viz.draw.overlay_writer`, which draws the masks over the image).

    Returns:
        as :func:`submission_summary`.
    """
    predictor = predictor or Predictor.from_weights(weights, tta=tta, backend=backend)
    paths = [Path(images) / name for name in list_images(images)]
    if not paths:
        raise FileNotFoundError(f"no images in {images}")
    records = []
    for path, record in predictor.predict_files(paths, batch_size=batch_size, skip_unreadable=True):
        records.append(record)
        if on_record is not None:
            on_record(path, record)
    return submission_summary([p.name for p in paths], records, out, fmt=fmt)

"""Detectron2 configs for Severstal: the project's own keys, the named YAMLs and how to load them.

Every Severstal YAML sits on top of Detectron2's ``COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml``
(merged first), then ``Base-Severstal.yaml``, then the named config that inherits from it with
``_BASE_``. A training run dumps its complete config as ``config.yaml`` next to its weights; that file
loads the same way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg

from severstal import CLASS_IDS
from severstal.files import CONFIG_FILE, SPLIT_FILE
from severstal.model.run import Thresholds, checked_model_file

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
NAMED_CONFIGS = {"r50": CONFIG_DIR / "r50.yaml", "small": CONFIG_DIR / "small.yaml",
                 "fewlabels": CONFIG_DIR / "fewlabels.yaml"}
MODEL_ZOO_BASE = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
TTA_FLIPS = ("horizontal", "vertical")
OPTIMIZERS = ("SGD", "AdamW")

def add_severstal_config(cfg: CfgNode) -> None:
    """Add the project's own keys (``cfg.SEVERSTAL``) to a Detectron2 config, in place."""
    cfg.SEVERSTAL = CfgNode()
    # Per class 1..4: instances scoring below the threshold are dropped before the class mask is formed.
    cfg.SEVERSTAL.SCORE_THRESHOLDS = [0.5, 0.5, 0.5, 0.5]
    # Per class 1..4: a class mask with fewer pixels (at the original size) is emptied; an empty
    # (image, class) pair is worth a whole Dice point, so small false positives are costly.
    cfg.SEVERSTAL.MIN_AREAS = [0, 0, 0, 0]
    # Per class 1..4: a class mask is emptied when the image-level presence probability of the class is under
    # this (models with the presence head, severstal.model.presence; 0 keeps every mask). Tuned with the others.
    cfg.SEVERSTAL.PRESENCE_THRESHOLDS = [0.0, 0.0, 0.0, 0.0]
    # The presence head (MODEL.META_ARCHITECTURE "PresenceRCNN"): the FPN levels it pools, its hidden width and
    # the weight of its loss beside the detector's.
    cfg.SEVERSTAL.PRESENCE_IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.SEVERSTAL.PRESENCE_HIDDEN = 128
    cfg.SEVERSTAL.PRESENCE_LOSS_WEIGHT = 1.0
    # With trees (> 0) the presence probabilities come from a random forest per class on image texture statistics,
    # fitted on the training images after the detector (severstal.model.presence.PresenceForest), not the head.
    cfg.SEVERSTAL.PRESENCE_FOREST_TREES = 0
    cfg.SEVERSTAL.PRESENCE_FOREST_DEPTH = 6
    # Class masks from a per-pixel head (Detectron2's SemSegFPNHead, MODEL.SEM_SEG_HEAD) on the PresenceRCNN's
    # FPN instead of the union of instance masks; a pixel is of a class where its probability is at least the
    # class's PIXEL_THRESHOLDS (tuned with the others). The instances are still detected and listed.
    cfg.SEVERSTAL.SEMANTIC_HEAD = False
    cfg.SEVERSTAL.PIXEL_THRESHOLDS = [0.5, 0.5, 0.5, 0.5]
    # Training augmentation (severstal.model.augment). Width in pixels of the original image of the random
    # crops a training image is cut to (0: the whole strip); prediction always sees the whole image.
    cfg.SEVERSTAL.CROP_WIDTH = 0
    # Random brightness and contrast factors drawn from [1 - x, 1 + x] (0: off).
    cfg.SEVERSTAL.BRIGHTNESS_CONTRAST = 0.0
    # Probability that a training image gets the defect instances of another training image pasted onto it
    # (Simple Copy-Paste, Ghiasi et al. 2021), at the same rows and a random horizontal shift (0: off).
    cfg.SEVERSTAL.COPY_PASTE_PROB = 0.0
    # Pixel probability above which a pasted instance mask counts as defect.
    cfg.SEVERSTAL.MASK_THRESHOLD = 0.5
    # Test-time flips whose detections are merged with the plain ones: any of "horizontal", "vertical".
    cfg.SEVERSTAL.TTA_FLIPS = []
    # IoU above which detections of the same class from different flips are merged into one.
    cfg.SEVERSTAL.TTA_MERGE_IOU = 0.5
    # Optimizer: "SGD" (Detectron2's default, with SOLVER.MOMENTUM) or "AdamW" (converges faster in the
    # short from-scratch schedules a CPU allows); both use SOLVER.BASE_LR and SOLVER.WEIGHT_DECAY.
    cfg.SEVERSTAL.OPTIMIZER = "SGD"
    # Iterations between two lines of metrics.json, the console and TensorBoard (Detectron2 fixes 20).
    cfg.SEVERSTAL.LOG_PERIOD = 20
    # Folder in Kaggle's layout (train.csv + train_images/) the model was trained on.
    cfg.SEVERSTAL.DATA_DIR = ""
    # Share of images held out for validation, and the seed of that (class-stratified) split.
    cfg.SEVERSTAL.VAL_FRACTION = 0.2
    cfg.SEVERSTAL.SPLIT_SEED = 0


def resolve_config(name_or_path: str | Path) -> Path:
    """Return the YAML for a named config or an existing path; an unknown name lists the valid ones."""
    if str(name_or_path) in NAMED_CONFIGS:
        return NAMED_CONFIGS[str(name_or_path)]
    path = Path(name_or_path)
    if path.is_file():
        return path
    raise ValueError(f"unknown config {str(name_or_path)!r}: use one of {sorted(NAMED_CONFIGS)} or a YAML file path")


def get_severstal_cfg(name_or_path: str | Path, opts: list[str] | tuple[str, ...] = ()) -> CfgNode:
    """Build the config for a named config or YAML path, with Detectron2-style ``KEY VALUE`` overrides."""
    path = resolve_config(name_or_path)
    cfg = get_cfg()
    add_severstal_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file(MODEL_ZOO_BASE))
    cfg.merge_from_file(str(path))
    if len(opts) % 2:
        raise ValueError(f"overrides come in KEY VALUE pairs, got {list(opts)}")
    cfg.merge_from_list(list(opts))
    validate_severstal_cfg(cfg)
    if cfg.MODEL.META_ARCHITECTURE == "PresenceRCNN":
        import severstal.model.presence  # noqa: F401  registers the architecture with Detectron2
    return cfg


def validate_severstal_cfg(cfg: CfgNode) -> None:
    """Check the project's keys early, naming the allowed values."""
    s = cfg.SEVERSTAL
    for key in ("SCORE_THRESHOLDS", "MIN_AREAS", "PRESENCE_THRESHOLDS", "PIXEL_THRESHOLDS"):
        if len(s[key]) != len(CLASS_IDS):
            raise ValueError(f"SEVERSTAL.{key} needs one value per class {CLASS_IDS}, got {list(s[key])}")
    if s.OPTIMIZER not in OPTIMIZERS:
        raise ValueError(f"SEVERSTAL.OPTIMIZER: unknown {s.OPTIMIZER!r}; allowed: {list(OPTIMIZERS)}")
    unknown = set(s.TTA_FLIPS) - set(TTA_FLIPS)
    if unknown:
        raise ValueError(f"SEVERSTAL.TTA_FLIPS: unknown {sorted(unknown)}; allowed: {list(TTA_FLIPS)}")
    if not 0.0 <= s.COPY_PASTE_PROB <= 1.0:
        raise ValueError(f"SEVERSTAL.COPY_PASTE_PROB must be in [0, 1], got {s.COPY_PASTE_PROB}")
    if not 0.0 <= s.BRIGHTNESS_CONTRAST < 1.0:
        raise ValueError(f"SEVERSTAL.BRIGHTNESS_CONTRAST must be in [0, 1), got {s.BRIGHTNESS_CONTRAST}")
    if s.PRESENCE_FOREST_TREES < 0 or not 1 <= s.PRESENCE_FOREST_DEPTH <= 12:
        raise ValueError("SEVERSTAL.PRESENCE_FOREST_TREES must be >= 0 (0: off) and PRESENCE_FOREST_DEPTH in "
                         f"1..12, got {s.PRESENCE_FOREST_TREES} and {s.PRESENCE_FOREST_DEPTH}")
    needs_presence = [k for k in ("PRESENCE_FOREST_TREES", "SEMANTIC_HEAD") if s[k]]
    if needs_presence and cfg.MODEL.META_ARCHITECTURE != "PresenceRCNN":
        raise ValueError(f"SEVERSTAL.{needs_presence[0]} needs MODEL.META_ARCHITECTURE \"PresenceRCNN\", got "
                         f"{cfg.MODEL.META_ARCHITECTURE!r}")
    if s.SEMANTIC_HEAD and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1:
        raise ValueError("MODEL.SEM_SEG_HEAD.NUM_CLASSES must be MODEL.ROI_HEADS.NUM_CLASSES + 1 (the background), "
                         f"got {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}")
    if s.CROP_WIDTH < 0:
        raise ValueError(f"SEVERSTAL.CROP_WIDTH must be 0 (off) or a width in pixels, got {s.CROP_WIDTH}")


def use_scratch_weights(cfg: CfgNode) -> None:
    """Train from random weights: GroupNorm everywhere and no frozen stage (FrozenBN diverges)."""
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.FPN.NORM = "GN"
    cfg.MODEL.ROI_MASK_HEAD.NORM = "GN"


@dataclass
class ModelBundle:
    """What prediction needs from a training run: the config (thresholds included) and the weights."""

    cfg: CfgNode
    weights: Path
    folder: Path

    @property
    def val_image_ids(self) -> list[str]:
        """The validation images of the run's split (empty when the split was not saved)."""
        split = self.folder / SPLIT_FILE
        return json.loads(split.read_text())["val"] if split.is_file() else []


def load_bundle(weights_or_folder: str | Path, device: str | None = None) -> ModelBundle:
    """Load a training run's config and tuned thresholds from its weights file or output folder.

    Args:
        weights_or_folder: ``model_final.pth`` (or any checkpoint), an exported ``model.onnx`` /
            ``model-int8.onnx`` / ``model.engine``, or the folder holding one or several (the fastest on
            ``device`` is taken: ``severstal.files.FASTEST_FIRST``); the folder must hold ``config.yaml``;
            ``thresholds.json`` is applied when present.
        device: "cpu", "cuda" or "cuda:N"; default: CUDA when available.
    """
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = checked_model_file(weights_or_folder, device)
    folder = weights.parent
    cfg = get_severstal_cfg(folder / CONFIG_FILE)
    tuned = Thresholds.read(folder)
    if tuned is not None:
        tuned.apply(cfg)
    cfg.MODEL.WEIGHTS = str(weights)
    cfg.MODEL.DEVICE = device
    return ModelBundle(cfg=cfg, weights=weights, folder=folder)

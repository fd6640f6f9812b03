"""Training a Mask R-CNN on a folder in Kaggle's layout (``train.csv`` + ``train_images/``).

``train`` splits the images into train/val (class-stratified, by seed), registers both splits, and
trains with :class:`SeverstalTrainer` (Detectron2's ``DefaultTrainer`` with flips, Dice + COCO evaluation,
checkpoints, ``metrics.json`` and TensorBoard events). It runs through Detectron2's ``launch`` so the
same call trains on several GPUs or machines. The output folder ends up holding everything prediction,
evaluation and serving need: ``model_final.pth``, ``config.yaml`` and ``split.json``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetMapper, build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.engine import DefaultTrainer, hooks, launch
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from severstal.data.datasets import register_data_dir, unregister
from severstal.files import CONFIG_FILE, SPLIT_FILE, WEIGHTS_FILE, write_text_atomic
from severstal.model.config import get_severstal_cfg, use_scratch_weights
from severstal.model.evaluation import DiceEvaluator

log = logging.getLogger(__name__)

TRAIN_SPLIT = "severstal_train"
VAL_SPLIT = "severstal_val"


class SeverstalTrainer(DefaultTrainer):
    """``DefaultTrainer`` with flip augmentation and the competition's Dice beside COCO AP."""

    @classmethod
    def build_train_loader(cls, cfg):
        augmentations = [
            T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING),
            T.RandomFlip(horizontal=True, vertical=False),
            T.RandomFlip(horizontal=False, vertical=True),
        ]
        return build_detection_train_loader(cfg, mapper=DatasetMapper(cfg, is_train=True, augmentations=augmentations))

    def build_hooks(self):
        hook_list = super().build_hooks()
        for hook in hook_list:
            if isinstance(hook, hooks.PeriodicWriter):
                hook._period = self.cfg.SEVERSTAL.LOG_PERIOD
        return hook_list

    @classmethod
    def build_optimizer(cls, cfg, model):
        if cfg.SEVERSTAL.OPTIMIZER == "SGD":
            return super().build_optimizer(cfg, model)
        params = get_default_optimizer_params(model, base_lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                                              weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM)
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(params, lr=cfg.SOLVER.BASE_LR)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return DatasetEvaluators([
            DiceEvaluator(dataset_name, cfg),
            COCOEvaluator(dataset_name, tasks=("bbox", "segm"), distributed=True, output_dir=output_folder,
                          use_fast_impl=False),
        ])


def check_pretrained_weights(cfg: CfgNode) -> None:
    """Fetch remote starting weights now, or fail with what to do instead when offline."""
    weights = cfg.MODEL.WEIGHTS
    if not weights or os.path.exists(weights) or "://" not in weights:
        return
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        PathManager.get_local_path(weights)
    except Exception as err:  # iopath raises many kinds for "no network"
        raise RuntimeError(
            f"cannot download the starting weights {weights} ({type(err).__name__}: {err}). "
            "You may be offline: download the file elsewhere and pass `MODEL.WEIGHTS /path/to/file`, "
            "or start from random weights with --scratch (much weaker than COCO-pretrained)."
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def setup_cfg(data_dir: str | Path, config: str | Path, output_dir: str | Path, opts=(),
              scratch: bool = False) -> CfgNode:
    """The complete training config: named config + overrides + data, split and device."""
    cfg = get_severstal_cfg(config, opts)
    if scratch:
        use_scratch_weights(cfg)
    cfg.SEVERSTAL.DATA_DIR = str(Path(data_dir).resolve())
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.DATASETS.TRAIN = (TRAIN_SPLIT,)
    cfg.DATASETS.TEST = (VAL_SPLIT,) if cfg.SEVERSTAL.VAL_FRACTION > 0 else ()
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def _train_worker(cfg: CfgNode, resume: bool) -> None:
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="detectron2")
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="severstal")
    split = register_data_dir(cfg.SEVERSTAL.DATA_DIR, TRAIN_SPLIT, VAL_SPLIT,
                              val_fraction=cfg.SEVERSTAL.VAL_FRACTION, seed=cfg.SEVERSTAL.SPLIT_SEED)
    if comm.is_main_process():
        out = Path(cfg.OUTPUT_DIR)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / SPLIT_FILE, json.dumps(split, indent=1))
        write_text_atomic(out / CONFIG_FILE, cfg.dump())
    try:
        if not resume:
            check_pretrained_weights(cfg)
        trainer = SeverstalTrainer(cfg)
        trainer.resume_or_load(resume=resume)
        trainer.train()
    finally:  # train() may run in the caller's process: leave its catalogs as they were
        for name in (TRAIN_SPLIT, VAL_SPLIT):
            if name in DatasetCatalog.list():
                unregister(name)


def train(data_dir: str | Path, config: str | Path, output_dir: str | Path, opts=(), *, resume: bool = False,
          scratch: bool = False, num_gpus: int = 1, num_machines: int = 1, machine_rank: int = 0,
          dist_url: str = "auto") -> Path:
    """Train and return the path of the final weights.

    Args:
        data_dir: folder with ``train.csv`` (either Kaggle format) and ``train_images/``.
        config: a named config (``small``, ``r50``) or a YAML path.
        output_dir: where weights, ``config.yaml``, ``split.json``, ``metrics.json`` and events go.
        opts: Detectron2-style ``KEY VALUE`` overrides.
        resume: continue from the last checkpoint in ``output_dir``.
        scratch: start from random weights (GroupNorm) instead of the config's pretrained weights.
        num_gpus, num_machines, machine_rank, dist_url: as Detectron2's ``launch`` (torch.distributed).
    """
    cfg = setup_cfg(data_dir, config, output_dir, opts, scratch)
    if cfg.MODEL.DEVICE == "cpu" and num_gpus * num_machines > 1:
        raise ValueError("several processes need CUDA GPUs; none is available")
    cfg.freeze()
    launch(_train_worker, num_gpus, num_machines=num_machines, machine_rank=machine_rank, dist_url=dist_url,
           args=(cfg, resume))
    return Path(output_dir) / WEIGHTS_FILE

"""Training a Mask R-CNN on a folder in Kaggle's layout (``train.csv`` + ``train_images/``).

``train`` splits the images into train/val (class-stratified, by seed), registers both splits, and
trains with :class:`SeverstalTrainer` (Detectron2's ``DefaultTrainer`` with flips, Dice + COCO evaluation,
checkpoints, ``metrics.json`` and TensorBoard events). It runs through Detectron2's ``launch`` so the
same call trains on several GPUs or machines; ``launch_cpu`` does the same on CPUs with the gloo backend
(Detectron2 0.6's ``launch`` needs CUDA and NCCL). The output folder ends up holding everything prediction,
evaluation and serving need: ``model_final.pth``, ``config.yaml`` and ``split.json``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.engine import DefaultTrainer, SimpleTrainer, hooks, launch
from detectron2.engine import defaults as d2_defaults
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from severstal.data.datasets import register_data_dir, unregister
from severstal.files import CONFIG_FILE, SPLIT_FILE, WEIGHTS_FILE, atomic_path, write_text_atomic
from severstal.model.augment import SteelMapper
from severstal.model.backends import bf16_backbone, cpu_has_bf16
from severstal.model.config import get_severstal_cfg, use_scratch_weights
from severstal.model.evaluation import DiceEvaluator
from severstal.model.presence import has_presence

log = logging.getLogger(__name__)

TRAIN_SPLIT = "severstal_train"
VAL_SPLIT = "severstal_val"
DISTRIBUTED_FILE = "distributed.json"
"""Written by rank 0 after training in several processes: world size, backend, every rank's weight digest and
the checkpoint's (all equal, or training fails)."""


class SeverstalTrainer(DefaultTrainer):
    """``DefaultTrainer`` with steel augmentation (:class:`SteelMapper`) and the competition's Dice beside COCO AP."""

    def __init__(self, cfg):
        if cfg.MODEL.DEVICE != "cpu" or comm.get_world_size() == 1:
            super().__init__(cfg)
        else:
            # Detectron2 0.6 hands DistributedDataParallel the local rank as a CUDA device id, which a CPU model
            # must not have: for the length of this constructor its create_ddp_model passes none.
            original = d2_defaults.create_ddp_model
            d2_defaults.create_ddp_model = functools.partial(original, device_ids=None)
            try:
                super().__init__(cfg)
            finally:
                d2_defaults.create_ddp_model = original
        if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED:  # Detectron2 built its CUDA-only AMPTrainer
            # Mixed precision on a CPU is bf16, which needs no loss scaling (docs/training.md: measured).
            model = self._trainer.model
            bf16_backbone(getattr(model, "module", model).backbone)  # under DistributedDataParallel: its module
            self._trainer = SimpleTrainer(self._trainer.model, self._trainer.data_loader, self._trainer.optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        donors = DatasetCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.SEVERSTAL.COPY_PASTE_PROB else ()
        return build_detection_train_loader(cfg, mapper=SteelMapper(cfg, donors))

    def build_hooks(self):
        hook_list = super().build_hooks()
        for hook in hook_list:
            if isinstance(hook, hooks.PeriodicWriter):
                hook._period = self.cfg.SEVERSTAL.LOG_PERIOD
        if self.cfg.SEVERSTAL.PRESENCE_FOREST_TREES and has_presence(self.model):
            # before the final evaluation, which should see the fitted forest
            at = next((i for i, h in enumerate(hook_list) if isinstance(h, hooks.EvalHook)), len(hook_list))
            hook_list.insert(at, PresenceForestHook(self.cfg))
        return hook_list

    @classmethod
    def build_optimizer(cls, cfg, model):
        if cfg.SEVERSTAL.OPTIMIZER == "SGD":
            return super().build_optimizer(cfg, model)
        params = get_default_optimizer_params(model, base_lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                                              weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM)
        # fused: one kernel over all parameters; the default loops over the ~100 tensors, 13% of a `small` iteration
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(params, lr=cfg.SOLVER.BASE_LR, fused=True)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return DatasetEvaluators([
            DiceEvaluator(dataset_name, cfg),
            COCOEvaluator(dataset_name, tasks=("bbox", "segm"), distributed=True, output_dir=output_folder,
                          use_fast_impl=False),
        ])


class PresenceForestHook(hooks.HookBase):
    """After training: fit the presence forest (``severstal.model.presence``) on the training images, un-augmented,
    at the network's input size, and put its trees into the final checkpoint (every rank fits the same trees)."""

    def __init__(self, cfg: CfgNode):
        self.cfg = cfg

    def after_train(self):
        from severstal.data.images import read_image
        from severstal.model.predict import network_input, prediction_resize
        from severstal.model.presence import fit_presence_forest

        model = getattr(self.trainer.model, "module", self.trainer.model)
        records = DatasetCatalog.get(self.cfg.DATASETS.TRAIN[0])
        resize = prediction_resize(self.cfg)
        images = [network_input(read_image(r["file_name"]), resize) for r in records]
        labels = np.zeros((len(records), self.cfg.MODEL.ROI_HEADS.NUM_CLASSES))
        for row, record in enumerate(records):
            labels[row, [a["category_id"] for a in record["annotations"]]] = 1
        fit_presence_forest(model, images, labels, seed=self.cfg.SEVERSTAL.SPLIT_SEED)
        log.info("presence forest fitted on %d training images (%s with each class)", len(records),
                 " / ".join(str(int(n)) for n in labels.sum(0)))
        path = Path(self.cfg.OUTPUT_DIR) / WEIGHTS_FILE
        if comm.is_main_process() and path.is_file():
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            checkpoint["model"] = {k: v.cpu() for k, v in model.state_dict().items()}
            with atomic_path(path) as target:
                torch.save(checkpoint, target)
        comm.synchronize()


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
              scratch: bool = False, evaluate_after: bool = True) -> CfgNode:
    """The complete training config: named config + overrides + data, split and device (``evaluate_after``: the
    trainer evaluates the val split, at the end and every ``TEST.EVAL_PERIOD``)."""
    cfg = get_severstal_cfg(config, opts)
    if scratch:
        use_scratch_weights(cfg)
    cfg.SEVERSTAL.DATA_DIR = str(Path(data_dir).resolve())
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.DATASETS.TRAIN = (TRAIN_SPLIT,)
    cfg.DATASETS.TEST = (VAL_SPLIT,) if cfg.SEVERSTAL.VAL_FRACTION > 0 and evaluate_after else ()
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
        if comm.get_world_size() > 1:
            _check_ranks_agree(trainer, cfg.OUTPUT_DIR)
    finally:  # train() may run in the caller's process: leave its catalogs as they were
        for name in (TRAIN_SPLIT, VAL_SPLIT):
            if name in DatasetCatalog.list():
                unregister(name)


def state_digest(model: torch.nn.Module | dict) -> str:
    """SHA-256 of a model's weights (a module, DDP-wrapped or not, or a state dict): equal digests, equal weights."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_ranks_agree(trainer: DefaultTrainer, output_dir: str) -> None:
    """After distributed training: every rank's weights must equal the saved checkpoint's (DDP keeps them in
    step; a difference is a bug). Rank 0 writes what it found to ``distributed.json``; a mismatch raises."""
    digests = comm.all_gather(state_digest(trainer.model))
    if not comm.is_main_process():
        return
    saved = torch.load(Path(output_dir) / WEIGHTS_FILE, map_location="cpu", weights_only=True)["model"]
    report = {"world_size": comm.get_world_size(), "backend": dist.get_backend(), "rank_digests": digests,
              "checkpoint_digest": state_digest(saved)}
    write_text_atomic(Path(output_dir) / DISTRIBUTED_FILE, json.dumps(report, indent=1))
    if set(digests) != {report["checkpoint_digest"]}:
        raise RuntimeError(f"ranks ended with different weights: see {Path(output_dir) / DISTRIBUTED_FILE}")


def _cpu_worker(local_rank: int, main_func, world_size: int, processes: int, machine_rank: int, dist_url: str,
                args: tuple, threads: int) -> None:
    """Detectron2's ``_distributed_worker`` for CPUs: the gloo backend instead of NCCL, no CUDA device to set.

    Detectron2 0.6's own worker asserts CUDA and hard-codes NCCL (later upstream versions fall back to gloo in
    the same way); everything else is the same: one process group, a local group per machine, a barrier.
    """
    torch.set_num_threads(threads)  # N processes on the same cores: do not let each spin up all of them
    rank = machine_rank * processes + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=rank,
                            timeout=DEFAULT_TIMEOUT)
    for machine in range(world_size // processes):
        group = dist.new_group(list(range(machine * processes, (machine + 1) * processes)))
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def launch_cpu(main_func, num_processes: int, num_machines: int = 1, machine_rank: int = 0, dist_url: str = "auto",
               args: tuple = ()) -> None:
    """Detectron2's ``launch`` on CPUs: ``num_processes`` per machine over torch.distributed's gloo backend.

    The same contract as ``detectron2.engine.launch`` (and ``torch.multiprocessing.spawn`` under it): a global
    rank of ``machine_rank * num_processes + local_rank``, ``dist_url`` "auto" picks a free local port on one
    machine, and an exception in any process ends the run with that error.
    """
    world_size = num_processes * num_machines
    if world_size == 1:
        main_func(*args)
        return
    if dist_url == "auto":
        if num_machines > 1:
            raise ValueError("dist_url=auto only works on one machine: pass --dist-url tcp://HOST:PORT of machine 0")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    threads = max(1, (os.cpu_count() or 1) // num_processes)
    mp.start_processes(_cpu_worker, nprocs=num_processes, start_method="spawn", join=True,
                       args=(main_func, world_size, num_processes, machine_rank, dist_url, args, threads))


def train(data_dir: str | Path, config: str | Path, output_dir: str | Path, opts=(), *, resume: bool = False,
          scratch: bool = False, num_gpus: int = 1, num_machines: int = 1, machine_rank: int = 0,
          dist_url: str = "auto", num_processes: int | None = None, evaluate_after: bool = True) -> Path:
    """Train and return the path of the final weights.

    Args:
        data_dir: folder with ``train.csv`` (either Kaggle format) and ``train_images/``.
        config: a named config (``small``, ``r50``) or a YAML path.
        output_dir: where weights, ``config.yaml``, ``split.json``, ``metrics.json`` and events go.
        opts: Detectron2-style ``KEY VALUE`` overrides.
        resume: continue from the last checkpoint in ``output_dir``.
        scratch: start from random weights (GroupNorm) instead of the config's pretrained weights.
        num_gpus, num_machines, machine_rank, dist_url: as Detectron2's ``launch`` (torch.distributed, NCCL):
            ``num_gpus`` processes per machine, one GPU each.
        num_processes: train on CPUs in this many processes per machine instead (torch.distributed's gloo
            backend; ``num_machines``, ``machine_rank``, ``dist_url`` as for GPUs). ``SOLVER.IMS_PER_BATCH`` is
            the batch over all processes and must divide by their number.
        evaluate_after: let the trainer evaluate the val split after training (False when the caller evaluates it
            itself, e.g. ``severstal evaluate --tune``).

    With more than one process, every rank's final weights are checked against the saved checkpoint
    (``distributed.json`` in ``output_dir``).
    """
    cfg = setup_cfg(data_dir, config, output_dir, opts, scratch, evaluate_after)
    if num_processes is not None:
        if num_gpus > 1:
            raise ValueError("choose --num-gpus (CUDA, NCCL) or --num-processes (CPU, gloo), not both")
        if num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {num_processes}")
        cfg.MODEL.DEVICE = "cpu"
    elif cfg.MODEL.DEVICE == "cpu" and num_gpus * num_machines > 1:
        raise ValueError("several GPU processes need CUDA GPUs and none is available; "
                         "train in several CPU processes with --num-processes N (gloo) instead")
    if cfg.MODEL.DEVICE == "cpu" and cfg.SOLVER.AMP.ENABLED and not cpu_has_bf16():
        raise ValueError("SOLVER.AMP.ENABLED on a CPU trains in bfloat16, which this CPU lacks (no avx512_bf16 or "
                         "amx_bf16 flag): emulated it is several times slower than fp32; leave AMP off here")
    world_size = (num_processes or num_gpus) * num_machines
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} must divide by the {world_size} processes")
    cfg.freeze()
    if num_processes is not None:
        launch_cpu(_train_worker, num_processes, num_machines=num_machines, machine_rank=machine_rank,
                   dist_url=dist_url, args=(cfg, resume))
    else:
        launch(_train_worker, num_gpus, num_machines=num_machines, machine_rank=machine_rank, dist_url=dist_url,
               args=(cfg, resume))
    return Path(output_dir) / WEIGHTS_FILE

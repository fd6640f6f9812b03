"""Training: a few iterations write weights, the config, the split and metrics; resume continues."""

from __future__ import annotations

import json

import pytest
import torch

from severstal.model.config import load_bundle
from severstal.model.train import check_pretrained_weights, setup_cfg

pytestmark = pytest.mark.slow


def test_a_short_run_leaves_everything_prediction_needs(trained_run, synthetic_data):
    assert (trained_run / "model_final.pth").is_file()
    split = json.loads((trained_run / "split.json").read_text())
    images = {p.name for p in (synthetic_data / "train_images").iterdir()}
    assert set(split["train"]) | set(split["val"]) == images
    assert not set(split["train"]) & set(split["val"]) and len(split["val"]) == 6
    bundle = load_bundle(trained_run)
    assert bundle.cfg.SOLVER.MAX_ITER == 6 and bundle.val_image_ids == split["val"]
    state = torch.load(trained_run / "model_final.pth", map_location="cpu", weights_only=True)
    assert state["iteration"] == 5 and any(k.startswith("roi_heads.mask_head") for k in state["model"])
    metrics = [json.loads(line) for line in (trained_run / "metrics.json").read_text().splitlines()]
    assert metrics and all(m["total_loss"] > 0 for m in metrics if "total_loss" in m)
    assert list(trained_run.glob("events.out.tfevents.*"))


def test_offline_download_of_pretrained_weights_says_what_to_do(synthetic_data, tmp_path, monkeypatch):
    cfg = setup_cfg(synthetic_data, "r50", tmp_path)
    cfg.MODEL.WEIGHTS = "https://localhost.invalid/model_final.pkl"
    with pytest.raises(RuntimeError, match="--scratch"):
        check_pretrained_weights(cfg)


def test_several_processes_without_gpus_are_refused(synthetic_data, tmp_path):
    from severstal.model.train import train

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA"):
        train(synthetic_data, "small", tmp_path, num_gpus=2)


def test_amp_on_a_cpu_trains_the_backbone_in_bf16(synthetic_data, tmp_path, monkeypatch):
    """Detectron2's AMPTrainer needs CUDA; on a CPU SOLVER.AMP.ENABLED runs the backbone under bf16 autocast."""
    from detectron2.engine import SimpleTrainer

    from severstal.model import train as train_module

    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: False)
    opts = ["SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "2", "DATALOADER.NUM_WORKERS", "0"]
    with pytest.raises(ValueError, match="lacks"):  # emulated bf16 would be slower than fp32: refused
        train_module.train(synthetic_data, "small", tmp_path / "refused", opts)

    cfg = setup_cfg(synthetic_data, "small", tmp_path / "run", opts)
    cfg.MODEL.DEVICE = "cpu"
    split = train_module.register_data_dir(synthetic_data, train_module.TRAIN_SPLIT, train_module.VAL_SPLIT)
    try:
        trainer = train_module.SeverstalTrainer(cfg)
        assert type(trainer._trainer) is SimpleTrainer
        backbone = trainer.model.backbone
        image = torch.zeros(1, 3, 128, 800)
        assert all(f.dtype == torch.float32 for f in backbone(image).values())  # handed on in fp32
        seen = []  # the stem's convolution computes in bf16, its GroupNorm in fp32
        norm = backbone.bottom_up.stem.conv1.norm
        hook = norm.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
        backbone(image)
        hook.remove()
        assert seen == [(torch.bfloat16, torch.float32)]
        trainer.train()
        assert all(v.dtype == torch.float32 for v in trainer.model.state_dict().values() if v.is_floating_point())
        assert split["train"]
    finally:
        for name in (train_module.TRAIN_SPLIT, train_module.VAL_SPLIT):
            train_module.unregister(name)


def test_adamw_steps_every_trainable_parameter_in_one_fused_kernel(synthetic_data, tmp_path):
    """PyTorch's AdamW loops over the tensors on a CPU unless fused (docs/cpu-speed.md: 55 ms against 11 ms)."""
    from detectron2.modeling import build_model

    from severstal.model.train import SeverstalTrainer

    cfg = setup_cfg(synthetic_data, "small", tmp_path, scratch=True)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    optimizer = SeverstalTrainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert stepped == {id(p) for p in model.parameters() if p.requires_grad}

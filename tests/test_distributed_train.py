"""Training in two CPU processes (torch.distributed, gloo): one run; every rank's weights equal the checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from severstal.model.train import DISTRIBUTED_FILE, state_digest, train


@pytest.mark.slow
def test_two_cpu_processes_train_one_run_with_equal_weights(synthetic_data, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "severstal.cli", "train", "--data", str(synthetic_data), "--config", "small",
         "--output", str(out), "--scratch", "--num-processes", "2",
         "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
         "SOLVER.CHECKPOINT_PERIOD", "1000", "SEVERSTAL.VAL_FRACTION", "0.25", "SEVERSTAL.LOG_PERIOD", "1",
         "DATALOADER.NUM_WORKERS", "0"],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"weights: {out / 'model_final.pth'}" in done.stdout

    report = json.loads((out / DISTRIBUTED_FILE).read_text())
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert saved["iteration"] == 2
    assert report["rank_digests"] == [state_digest(saved["model"])] * 2  # both ranks: the checkpoint's weights

    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_final.pth"]  # one checkpoint
    assert len(list(out.glob("events.out.tfevents.*"))) == 1  # one event log, from rank 0
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    iterations = [m["iteration"] for m in metrics if "total_loss" in m]
    assert iterations == sorted(set(iterations)) and iterations[-1] == 2  # one writer: no line twice
    assert any("dice/mean" in m or any(k.startswith("dice") for k in m) for m in metrics), "evaluation ran"


def test_the_digest_sees_every_weight():
    model = torch.nn.Linear(3, 2)
    before = state_digest(model)
    assert state_digest(model.state_dict()) == before
    with torch.no_grad():
        model.bias[1] += 1e-7
    assert state_digest(model) != before


def test_bad_process_counts_are_refused_before_starting(synthetic_data, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        train(synthetic_data, "small", tmp_path, num_gpus=2, num_processes=2)
    with pytest.raises(ValueError, match="must divide by the 2 processes"):
        train(synthetic_data, "small", tmp_path, ["SOLVER.IMS_PER_BATCH", "3"], num_processes=2)
    with pytest.raises(ValueError, match="num_processes must be >= 1"):
        train(synthetic_data, "small", tmp_path, num_processes=0)
    with pytest.raises(ValueError, match="dist_url=auto only works on one machine"):
        train(synthetic_data, "small", tmp_path, ["SOLVER.IMS_PER_BATCH", "4"], num_processes=2, num_machines=2)

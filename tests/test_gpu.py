"""The GPU path: GPU tests (marked ``gpu``, skipped without CUDA) and the CPU-only parts of ``make gpu-check``."""

from __future__ import annotations

import pytest
import torch

from severstal.bench.gpu import (
    CheckSettings,
    Skip,
    cuda_missing,
    gpu_check,
    parse_pytest_summary,
    row,
    run_step,
    with_masks,
)

NO_CUDA = "needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False)"


def gpu(test):
    """Mark a test ``gpu`` (``pytest -m gpu`` selects them) and skip it, saying why, where CUDA is missing."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)(test))


# The check's own logic, without a GPU ------------------------------------------------------------------


def test_a_step_that_cannot_run_says_why_and_the_next_still_runs():
    settings = CheckSettings(device="cpu")
    rows: list[dict] = []

    def skipped():
        raise Skip("no tensorrt")

    def broken():
        raise RuntimeError("boom")

    assert run_step(rows, "tensorrt", "fp16 engine", skipped, settings) is None
    assert run_step(rows, "train", "r50", broken, settings) is None
    assert run_step(rows, "predict", "torch", lambda: [row("predict", "torch fp32", "1 ms")], settings) == [
        row("predict", "torch fp32", "1 ms")]
    assert [r["status"] for r in rows] == ["skipped: no tensorrt", "failed: RuntimeError: boom", "ok"]


def test_the_time_budget_skips_late_steps():
    settings = CheckSettings(device="cpu", budget_s=1.0)
    rows: list[dict] = []
    assert run_step(rows, "serve", "TorchServe", lambda: pytest.fail("must not run"), settings, need_s=60) is None
    assert rows[0]["status"] == "skipped: the 1 s budget is spent"


def test_cuda_reasons():
    assert cuda_missing("cpu") == "device cpu (this step needs CUDA)"
    if not torch.cuda.is_available():
        assert cuda_missing("cuda") == "no CUDA device (torch.cuda.is_available() is False)"


def test_pytest_summary_counts():
    assert parse_pytest_summary("....\n3 passed, 2 skipped, 120 deselected in 4.10s\n") == {
        "passed": 3, "skipped": 2, "deselected": 120}
    assert parse_pytest_summary("1 failed, 1 error in 2s") == {"failed": 1, "error": 1}
    assert parse_pytest_summary("") == {}


def test_quick_and_full_settings():
    quick, full = CheckSettings(quick=True), CheckSettings()
    assert (quick.config, quick.iterations, quick.batch_sizes) == ("small", 2, (1, 2))
    assert (full.config, full.iterations, full.batch_sizes, full.requests[0]) == ("r50", 50, (1, 8), 50)
    assert full.left_s() <= 480


def test_cli_refuses_bad_arguments(capsys):
    from severstal.cli import main

    assert main(["bench", "gpu", "--device", "tpu"]) == 2
    assert "--device must be cpu or cuda" in capsys.readouterr().err
    assert main(["bench", "gpu", "--budget", "0"]) == 2


def test_without_a_model_or_images_every_later_step_says_why(tmp_path):
    settings = CheckSettings(device="cpu", run_tests=False, budget_s=30, images=tmp_path / "absent")
    r = gpu_check(settings, root=tmp_path)
    statuses = {x["step"]: x["status"] for x in r["rows"]}
    assert statuses["train"] == "skipped: the 30 s budget is spent"
    assert statuses["predict"] == "skipped: no model (pass --weights)"
    assert r["ok"]


@pytest.mark.slow
def test_quick_check_runs_end_to_end_on_a_cpu(scratch_run, real_data, tmp_path):
    """Every step's code on a CPU: train, predict, TorchServe, ONNX Runtime; GPU-only rows say why."""
    r = gpu_check(CheckSettings(device="cpu", quick=True, run_tests=False, weights=scratch_run), root=tmp_path)
    by_what = {x["what"].split(" (")[0]: x for x in r["rows"]}
    assert r["ok"], r["rows"]
    assert "s/iter" in by_what["small from scratch, 2 iterations, fp32"]["result"]
    assert "ms/image" in by_what["torch fp32, batch 1"]["result"]
    assert by_what["torch fp16, batch 1"]["status"] == "skipped: device cpu (this step needs CUDA)"
    assert by_what["fp16 engine"]["step"] == "tensorrt" and by_what["fp16 engine"]["status"].startswith("skipped: ")
    assert "Dice vs torch fp32 1.0000" in by_what["onnxruntime fp32, batch 2"]["result"]
    assert by_what["TorchServe on cpu, 1 client"]["result"].startswith("p50 ")
    assert "images/s" in by_what["TorchServe on cpu, 8 clients"]["result"]


# GPU tests: run by make gpu-check on a machine with CUDA ---------------------------------------------


@gpu
def test_handler_model_runs_on_the_gpu_torchserve_assigns(scratch_run, real_data):
    from severstal.data.images import read_image
    from severstal.serve.worker import ServingModel

    model = ServingModel.load(scratch_run, gpu_id=0)
    assert model.device == "cuda:0"
    image = read_image(sorted((real_data / "train_images").glob("*.jpg"))[0])
    (record,) = model.predictor.predict([image])
    assert (record["height"], record["width"]) == (256, 1600)


@gpu
def test_fp16_keeps_the_answers_of_fp32_on_the_real_sample(scratch_run, real_data):
    from severstal.data.images import read_image
    from severstal.model.backends import make_backend
    from severstal.model.config import load_bundle
    from severstal.model.predict import Predictor, records_dice

    bundle = load_bundle(scratch_run, device="cuda")
    fp32 = Predictor(bundle.cfg, backend=make_backend("torch", bundle.cfg, precision="fp32"))
    fp16 = Predictor(bundle.cfg, backend=make_backend("torch", bundle.cfg, precision="fp16"))
    images = [read_image(p) for p in sorted((real_data / "train_images").glob("*.jpg"))[:24]]
    reference = [r for i in range(0, len(images), 8) for r in fp32.predict(images[i:i + 8])]
    half = [r for i in range(0, len(images), 8) for r in fp16.predict(images[i:i + 8])]
    assert sum(len(r["defects"]) for r in reference) > 0, "the scratch model should give defects to compare"
    assert records_dice(half, reference) >= 0.99


@gpu
def test_amp_training_steps_on_the_gpu(synthetic_data, tmp_path):
    from severstal.model.train import train

    weights = train(synthetic_data, "small", tmp_path, ["SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2",
                                                        "SOLVER.AMP.ENABLED", "True", "SEVERSTAL.VAL_FRACTION", "0",
                                                        "DATALOADER.NUM_WORKERS", "0"], scratch=True)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_with_masks_lowers_the_thresholds_of_a_copy_and_leaves_the_run_alone(scratch_run, tmp_path):
    from severstal.model.config import load_bundle

    cfg = load_bundle(with_masks(scratch_run, tmp_path / "model"), device="cpu").cfg
    assert (cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST, cfg.TEST.DETECTIONS_PER_IMAGE) == (0.01, 20)
    assert list(cfg.SEVERSTAL.SCORE_THRESHOLDS) == [0.02] * 4
    run = load_bundle(scratch_run, device="cpu").cfg
    assert (run.TEST.DETECTIONS_PER_IMAGE, list(run.SEVERSTAL.SCORE_THRESHOLDS)) == (10, [0.1] * 4)

"""The GPU path in one command (``make gpu-check`` = ``severstal bench gpu``): tests and one table, in minutes.

On a machine with an NVIDIA GPU it runs the GPU tests (``pytest -m gpu``) and measures, on the real sample:

========== =================================================================================================
train      r50 from scratch, 50 iterations with AMP: s/iteration, peak GPU memory
predict    PyTorch fp32 and fp16 at batch 1 and 8: ms/image, images/s; Dice of fp16 against fp32 (>= 0.99)
serve      TorchServe with the handler on ``gpu_id``: p50 at 1 client, images/s at 8 clients
onnx/trt   ONNX Runtime's CUDA provider and a TensorRT fp16 engine: ms/image, Dice against PyTorch (>= 0.99)
========== =================================================================================================

Every step that cannot run here (no CUDA, no TensorRT, no onnxruntime-gpu, the time budget spent) becomes a
row that says why, and the others still run; a step that fails is a row with its error, and the check then
ends non-zero. ``--device cpu --quick`` runs every step's code on a CPU in a minute or two (a smaller model,
fewer images and iterations), so the script is tested where there is no GPU.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PARITY_DICE = 0.99
"""Reduced precision and exported models must reach this mean Dice against PyTorch fp32."""
BUDGET_S = 480.0
"""The whole check stays within 8 minutes: a step that would start later is skipped, saying so."""


class Skip(Exception):
    """A step that cannot run here; the message says why (and what would make it run)."""


@dataclass
class CheckSettings:
    """What the check runs with.

    Attributes:
        device: "cuda" (default) or "cpu" (runs every step's code without a GPU).
        quick: fewer images, iterations and requests, the ``small`` config (for a CPU, or a first try).
        weights: a trained run to predict, serve and export with; default: the model the train step leaves
            (random-ish after 50 iterations, so its thresholds are lowered to have masks to compare).
        images: folder of real images (default: the real sample's ``train_images``).
        budget_s: seconds for the whole check.
        run_tests: run ``pytest -m gpu`` first (needs the repository's ``tests/``).
    """

    device: str = "cuda"
    quick: bool = False
    weights: Path | None = None
    images: Path | None = None
    budget_s: float = BUDGET_S
    run_tests: bool = True
    started: float = field(default_factory=time.monotonic)

    @property
    def config(self) -> str:
        return "small" if self.quick else "r50"

    @property
    def iterations(self) -> int:
        return 2 if self.quick else 50

    @property
    def limit(self) -> int:
        return 4 if self.quick else 64

    @property
    def batch_sizes(self) -> tuple[int, int]:
        return (1, 2) if self.quick else (1, 8)

    @property
    def requests(self) -> tuple[int, int]:
        """Requests at one client and at eight."""
        return (3, 8) if self.quick else (50, 400)

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)


def row(step: str, what: str, result: str = "", status: str = "ok") -> dict:
    """One line of the table: ``status`` is "ok", "FAIL: ...", "skipped: <why>" or "failed: <error>"."""
    return {"step": step, "what": what, "result": result, "status": status}


def run_step(rows: list[dict], step: str, what: str, func: Callable[[], list[dict]], settings: CheckSettings,
             need_s: float = 20.0) -> object:
    """Run one step and add its rows; a :class:`Skip` or an error becomes one row instead.

    Returns:
        What ``func`` returned (its rows are added), or None when it was skipped or failed.
    """
    if settings.left_s() < need_s:
        rows.append(row(step, what, status=f"skipped: the {settings.budget_s:.0f} s budget is spent"))
        return None
    try:
        result = func()
    except Skip as why:
        rows.append(row(step, what, status=f"skipped: {why}"))
        return None
    except Exception as err:  # the check goes on: one broken step must not hide the others' numbers
        log.error("%s failed:\n%s", step, traceback.format_exc())
        rows.append(row(step, what, status=f"failed: {type(err).__name__}: {str(err)[:200]}"))
        return None
    rows.extend(result["rows"] if isinstance(result, dict) else result)
    return result


def cuda_missing(device: str) -> str | None:
    """Why ``device`` cannot run CUDA work here, or None."""
    if not device.startswith("cuda"):
        return f"device {device} (this step needs CUDA)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def ort_cuda_missing() -> str | None:
    """Why ONNX Runtime cannot use the CUDA provider here, or None."""
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return (f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider: install onnxruntime-gpu of the "
                "same version in place of onnxruntime")
    return None


def parse_pytest_summary(text: str) -> dict[str, int]:
    """Counts from pytest's last line, e.g. ``3 passed, 2 skipped in 4.1s`` -> ``{"passed": 3, "skipped": 2}``."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", last)}


# Steps ------------------------------------------------------------------------------------------------


def step_tests(settings: CheckSettings, root: Path) -> list[dict]:
    tests = root / "tests"
    if not tests.is_dir():
        raise Skip(f"no tests/ folder at {root} (run from a checkout)")
    timeout = max(30.0, settings.left_s() - 240)
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                           str(tests)], cwd=root, capture_output=True, text=True, timeout=timeout)
    counts = parse_pytest_summary(done.stdout)
    result = ", ".join(f"{n} {k}" for k, n in counts.items() if k != "deselected") or "no summary"
    reasons = sorted(set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", done.stdout)))
    failed = done.returncode not in (0, 5) or counts.get("failed") or counts.get("error") or counts.get("errors")
    status = "FAIL: see pytest -m gpu" if failed else ("ok" if not reasons else f"ok; skipped: {'; '.join(reasons)}")
    if failed:
        log.error("pytest -m gpu:\n%s", done.stdout[-4000:])
    return [row("tests", "pytest -m gpu", result, status)]


def step_train(settings: CheckSettings, work: Path) -> dict:
    """Train ``r50`` from scratch (``small`` when quick) on synthetic images; s/iteration and peak memory."""
    import statistics

    import torch
    from detectron2.utils.events import EventStorage

    from severstal.data.datasets import register_data_dir, unregister
    from severstal.data.synth import make_synthetic_dataset
    from severstal.files import CONFIG_FILE, WEIGHTS_FILE
    from severstal.model.train import TRAIN_SPLIT, SeverstalTrainer, setup_cfg

    cuda = cuda_missing(settings.device) is None
    data = work / "data"
    make_synthetic_dataset(data, 16, seed=0)
    run = work / "train"
    opts = ["DATALOADER.NUM_WORKERS", "2", "SOLVER.MAX_ITER", str(settings.iterations), "SOLVER.AMP.ENABLED",
            str(cuda), "SOLVER.IMS_PER_BATCH", "2" if settings.quick else "4"]
    cfg = setup_cfg(data, settings.config, run, opts, scratch=True)
    cfg.MODEL.DEVICE = settings.device if cuda else "cpu"
    register_data_dir(data, TRAIN_SPLIT, None, val_fraction=0.0)
    # Detectron2's trainer logs the whole model to stdout unless its logger is already set up: keep the table clean.
    d2_log = logging.getLogger("detectron2")
    saved = d2_log.level, d2_log.propagate, d2_log.handlers[:]
    quiet = logging.NullHandler()
    d2_log.setLevel(logging.INFO)
    d2_log.propagate = False
    d2_log.handlers = [quiet]
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer = SeverstalTrainer(cfg)
        times = []
        with EventStorage(0):
            for _ in range(settings.iterations):
                start = time.perf_counter()
                trainer._trainer.run_step()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        warm = times[min(5, len(times) - 1):]
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        run.mkdir(parents=True, exist_ok=True)
        trainer.checkpointer.save(Path(WEIGHTS_FILE).stem)
        (run / CONFIG_FILE).write_text(cfg.dump())
    finally:
        unregister(TRAIN_SPLIT)
        d2_log.setLevel(saved[0])
        d2_log.propagate = saved[1]
        d2_log.handlers = saved[2]
    what = f"{settings.config} from scratch, {settings.iterations} iterations, " + ("AMP" if cuda else "fp32")
    result = f"{statistics.median(warm):.3f} s/iter" + (f", peak {peak:.2f} GiB" if cuda else "")
    status = "ok" if cuda else f"ok; no AMP or peak memory: {cuda_missing(settings.device)}"
    return {"rows": [row("train", what, result, status)], "run": run}


def with_masks(run: Path, out: Path) -> Path:
    """A copy of ``run``'s model with lowered thresholds, so that a barely trained model has masks to compare."""
    from severstal.model.run import copy_run

    return copy_run(run, out, ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.01", "TEST.DETECTIONS_PER_IMAGE", "20",
                               "SEVERSTAL.SCORE_THRESHOLDS", "[0.02, 0.02, 0.02, 0.02]"])


def _predict_rows(result: dict, batch: int, skip_reference: bool = False, labels: dict | None = None) -> list[dict]:
    rows = []
    for r in result["rows"]:
        if skip_reference and (r["backend"], r.get("precision", "fp32")) == ("torch", "fp32"):
            continue
        name = f"{r['backend']} {r.get('precision', 'fp32')}"
        what = f"{name}, batch {batch}" + (f" ({labels[r['backend']]})" if r["backend"] in (labels or {}) else "")
        text = f"{r['e2e_p50_ms']:.1f} ms/image, {r['e2e_images_per_s']:.1f} images/s"
        status = "ok"
        if (r["backend"], r.get("precision", "fp32")) != ("torch", "fp32"):
            text += f", Dice vs torch fp32 {r['dice_vs_torch']:.4f}"
            if not r["dice_vs_torch"] >= PARITY_DICE:
                status = f"FAIL: Dice under {PARITY_DICE}"
        if "detections" in r:
            text += f", {r['detections']} defects"
        rows.append(row("predict", what, text, status))
    return rows


def step_predict(settings: CheckSettings, weights: Path, images: Path) -> list[dict]:
    """PyTorch fp32 and fp16 at two batch sizes, end to end (decode -> record with RLE)."""
    from severstal.bench.predict import bench_predict

    cuda = cuda_missing(settings.device)
    rows = []
    for batch in settings.batch_sizes:
        variants = ["torch"] if cuda else ["torch", "torch:fp16"]
        result = bench_predict(weights, images, variants, batch_size=batch, repeats=2, limit=settings.limit,
                               device=settings.device if not cuda else "cpu")
        rows += _predict_rows(result, batch)
        if cuda:
            rows.append(row("predict", f"torch fp16, batch {batch}", status=f"skipped: {cuda}"))
    return rows


def step_exported(settings: CheckSettings, weights: Path, images: Path, work: Path) -> list[dict]:
    """ONNX Runtime with the CUDA provider and a TensorRT fp16 engine against PyTorch, same images and batches."""
    from severstal.bench.predict import bench_predict
    from severstal.model.backends import tensorrt_missing
    from severstal.model.export import export_onnx

    cuda = cuda_missing(settings.device)
    device = "cpu" if cuda else settings.device
    rows, variants = [], []
    why_ort = cuda or ort_cuda_missing()
    if why_ort and not settings.quick:
        rows.append(row("onnxruntime", "CUDA provider", status=f"skipped: {why_ort}"))
    else:
        variants.append("onnxruntime")  # quick on a CPU: the CPU provider, to run the code path
    why_trt = cuda or tensorrt_missing()
    if why_trt:
        rows.append(row("tensorrt", "fp16 engine", status=f"skipped: {why_trt}"))
    else:
        variants.append("tensorrt:fp16")
    if variants:
        onnx = export_onnx(weights, work / "onnx")
        result = bench_predict(weights, images, variants, batch_size=settings.batch_sizes[1], repeats=2,
                               limit=settings.limit, device=device, onnx=onnx, work_dir=work)
        provider = "CPU provider" if why_ort else "CUDA provider"
        rows = _predict_rows(result, settings.batch_sizes[1], skip_reference=True,
                             labels={"onnxruntime": provider}) + rows
        for r in rows:
            r["step"] = r["what"].split(" ")[0] if r["step"] == "predict" else r["step"]
    return rows


def step_serve(settings: CheckSettings, weights: Path, images: Path, work: Path) -> list[dict]:
    """TorchServe with the handler on the GPU TorchServe assigns: p50 at 1 client, images/s at 8."""
    import shutil

    from severstal.bench.serve import bench_serve
    from severstal.serve.archive import archive
    from severstal.serve.server import running_server

    if shutil.which("java") is None:
        raise Skip("no java on the PATH (TorchServe needs Java 17: apt-get install openjdk-17-jre-headless)")
    cuda = cuda_missing(settings.device)
    store = work / "model_store"
    archive(weights, store)
    folder = work / "serve_images"
    folder.mkdir(exist_ok=True)
    for name in sorted(os.listdir(images))[: settings.limit]:
        (folder / name).symlink_to(Path(images).resolve() / name)
    rows = []
    with running_server(store, port=0, workers=1, run_dir=work / "serve") as server:
        url = server.predictions_url()
        device = "cpu" if cuda else "gpu_id 0"
        for clients, requests in zip((1, 8), settings.requests):
            r = bench_serve(url, folder, concurrency=clients, requests=requests, headers=server.headers(), rounds=1)
            served = r["rows"][0]
            errors = f", {r['errors']} errors" if r["errors"] else ""
            text = (f"p50 {1000 * served['p50']:.1f} ms" if clients == 1 else
                    f"{served['images_per_s']:.1f} images/s") + errors
            rows.append(row("serve", f"TorchServe on {device}, {clients} client{'s' if clients > 1 else ''}", text,
                            "FAIL: errors" if r["errors"] else ("ok" if not cuda else f"ok; on CPU: {cuda}")))
    return rows


def gpu_check(settings: CheckSettings | None = None, root: Path | None = None) -> dict:
    """Run the GPU tests and every measurement; each step that cannot run says why.

    Returns:
        ``{"rows": [...], "device", "gpu", "torch", "cuda", "seconds", "ok"}``; a row is ``{"step", "what",
        "result", "status"}``; ``ok`` is False when a step failed or missed a parity goal.
    """
    import torch

    from severstal.files import TRAIN_IMAGES, real_data_root

    settings = settings or CheckSettings()
    root = root or Path(__file__).resolve().parents[2]
    images = Path(settings.images or real_data_root() / TRAIN_IMAGES)
    rows: list[dict] = []
    if settings.run_tests:
        run_step(rows, "tests", "pytest -m gpu", lambda: step_tests(settings, root), settings)
    with tempfile.TemporaryDirectory(prefix="severstal-gpu-check-") as tmp:
        work = Path(tmp)
        trained = run_step(rows, "train", f"{settings.config} from scratch", lambda: step_train(settings, work),
                           settings, need_s=60)
        weights = settings.weights
        if weights is None and trained is not None:
            weights = with_masks(trained["run"], work / "model")
        if weights is None:
            rows.append(row("predict", "serve, onnxruntime, tensorrt", status="skipped: no model (pass --weights)"))
        elif not images.is_dir():
            rows.append(row("predict", "serve, onnxruntime, tensorrt", status=f"skipped: no images at {images}"))
        else:
            run_step(rows, "predict", "torch fp32/fp16", lambda: step_predict(settings, weights, images), settings)
            run_step(rows, "serve", "TorchServe", lambda: step_serve(settings, weights, images, work), settings,
                     need_s=60)
            run_step(rows, "onnx/trt", "ONNX Runtime, TensorRT",
                     lambda: step_exported(settings, weights, images, work), settings, need_s=60)
    cuda = torch.cuda.is_available()
    return {"rows": rows, "device": settings.device, "quick": settings.quick,
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "seconds": time.monotonic() - settings.started,
            "ok": not any(r["status"].startswith(("failed", "FAIL")) for r in rows)}

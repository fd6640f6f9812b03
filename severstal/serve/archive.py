"""The ``.mar`` archive: weights, config, thresholds, the handler and ``model-config.yaml``, packed with
torch-model-archiver. The TorchServe files come from the installed package (:data:`severstal.serve.TORCHSERVE_DIR`),
so archiving works from a wheel as well as from a checkout.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from severstal.files import backend_for, backends_for
from severstal.model.run import checked_model_file, files_with_model
from severstal.serve import HANDLER_FILE, MODEL_CONFIG_FILE, torchserve_file
from severstal.serve.worker import HandlerSettings

log = logging.getLogger(__name__)

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def export_for_serving(weights: str | Path, calibration: str | Path | None = None) -> tuple[list[Path], dict]:
    """The faster models of a training run, made into its ``export/`` folder: ONNX fp32 and, when real images to
    calibrate on are at hand (``calibration``, else the run's training images) and its answers hold, int8. Exports
    newer than the weights are reused; weights trained again are exported again.

    Returns:
        The model files (the int8 one only where ``severstal.model.quantize`` accepted it), and what int8 gave:
        ``{"kept": bool}`` with ``quantize_export``'s report when it was made now, or ``"why"`` when it was not.
    """
    from severstal.files import INT8_ONNX_FILE, ONNX_FILE, TRAIN_IMAGES
    from severstal.model.config import load_bundle
    from severstal.model.export import export_onnx
    from severstal.model.quantize import ParityError, quantize_export

    bundle = load_bundle(weights, device="cpu")
    folder = bundle.folder / "export"

    def fresh(path: Path) -> bool:
        return path.is_file() and path.stat().st_mtime >= bundle.weights.stat().st_mtime

    fp32 = folder / ONNX_FILE if fresh(folder / ONNX_FILE) else export_onnx(bundle.weights, folder)
    images = Path(calibration) if calibration else Path(bundle.cfg.SEVERSTAL.DATA_DIR) / TRAIN_IMAGES
    if fresh(folder / INT8_ONNX_FILE):
        return [fp32, folder / INT8_ONNX_FILE], {"kept": True, "why": "made earlier"}
    (folder / INT8_ONNX_FILE).unlink(missing_ok=True)  # an older model's: never served beside this export
    if not images.is_dir():
        why = f"no images to calibrate int8 on ({images}): fp32 ONNX only; pass --calibration DIR"
        log.info("archive: %s", why)
        return [fp32], {"kept": False, "why": why}
    try:
        int8, report = quantize_export(fp32, images, folder)
    except ParityError as err:
        log.warning("archive: %s", err)
        return [fp32], {"kept": False, "why": str(err)}
    return [fp32, int8], {"kept": True, **report}


def archive(weights: str | Path, out_dir: str | Path, name: str = "severstal", version: str = "1.0",
            model_config: str | Path | None = None, also: list[Path] | tuple[Path, ...] = ()) -> Path:
    """Build ``out_dir/NAME.mar`` with torch-model-archiver.

    The archive holds the weights, the files that go with them (``config.yaml``, and ``thresholds.json`` and
    ``split.json`` when present: ``severstal.model.run.WITH_MODEL``), the handler and ``model-config.yaml``; the
    handler imports the installed ``severstal`` package. An exported ``model.onnx`` (``severstal export``) is
    archived the same way and served with ONNX Runtime unless the handler block's ``backend`` says otherwise.

    Args:
        weights: a weights file or exported model, or its folder (``severstal.files.MODEL_FILES``).
        out_dir: the model store to write to (created).
        name: the model name, the ``/predictions/NAME`` path.
        version: the model version.
        model_config: default ``torchserve/model-config.yaml``.
        also: other model files of the same model (:func:`export_for_serving`) packed beside it; with the handler
            block's ``backend`` null the worker runs the fastest of them for its device (``files.FASTEST_FIRST``).

    Returns:
        The path of the archive.
    """

    weights = checked_model_file(weights)
    if not _MODEL_NAME.fullmatch(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit")
    model_config = Path(model_config) if model_config else MODEL_CONFIG_FILE
    backend = _check_model_config(model_config).backend
    if backend is not None and backend not in backends_for(weights):
        raise ValueError(f"{model_config} sets backend {backend!r}, which cannot run {weights.name} "
                         f"(a {backend_for(weights)!r} model): set backend to null or one of "
                         f"{list(backends_for(weights))}")
    extra = [*files_with_model(weights.parent), *(Path(p) for p in also)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "model_archiver.model_packaging",
           "--model-name", name, "--version", str(version),
           "--serialized-file", str(weights), "--handler", str(torchserve_file(HANDLER_FILE)),
           "--extra-files", ",".join(str(p) for p in extra), "--config-file", str(model_config),
           "--export-path", str(out_dir), "--force"]
    # torch-model-archiver stages files in $TMPDIR/NAME: a folder of its own lets two archives run at once.
    with tempfile.TemporaryDirectory(prefix="severstal-archive-") as staging:
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": staging})
    if done.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    path = out_dir / f"{name}.mar"
    log.info("archived %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def _check_model_config(path: Path) -> HandlerSettings:
    """The handler settings of model-config.yaml; fails before archiving when it is unreadable or wrong."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    loaded = yaml.safe_load(path.read_text()) or {}
    return HandlerSettings.from_mapping(loaded.get("handler"))

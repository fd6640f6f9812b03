"""Names of the project's files and folders, the data roots, and atomic writes: one copy for every stage.

A data folder is laid out as Kaggle ships it (``train.csv`` + ``train_images/``). A training run folder holds
what every later stage needs: the weights, ``config.yaml``, ``split.json`` and, after tuning,
``thresholds.json``; ``severstal export`` writes a folder of the same shape around ``model.onnx`` or
``model.engine``. Every file the project writes is written atomically: a reader never sees half a file,
and an interrupted write leaves the old one in place.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

# A data folder in Kaggle's layout.
TRAIN_CSV = "train.csv"
TRAIN_IMAGES = "train_images"
TEST_IMAGES = "test_images"
DATA_ROOT_ENV = "SEVERSTAL_DATA"
DEFAULT_DATA_ROOT = "datasets/severstal"

# A training run folder (what goes with a model, and what thresholds.json holds: severstal.model.run).
WEIGHTS_FILE = "model_final.pth"
CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.json"
THRESHOLDS_FILE = "thresholds.json"
METRICS_FILE = "metrics.json"
EVALUATION_DIR = "eval"
EVALUATION_FILE = "evaluation.json"

# Exported models (``severstal export``).
ONNX_FILE = "model.onnx"
INT8_ONNX_FILE = "model-int8.onnx"
ENGINE_FILE = "model.engine"
MODEL_FILES = (WEIGHTS_FILE, ONNX_FILE, INT8_ONNX_FILE, ENGINE_FILE)
"""Model files a folder may hold: a training run's weights, then the files of ``severstal export`` (ONNX fp32 and
int8, TensorRT)."""
FASTEST_FIRST = {"cpu": (INT8_ONNX_FILE, ONNX_FILE, WEIGHTS_FILE), "cuda": (ENGINE_FILE, WEIGHTS_FILE, ONNX_FILE)}
"""Per device, the model files in the order they are preferred when a folder holds several (each one verified when
it was written: int8 and TensorRT against fp32): int8 ONNX Runtime, then fp32 ONNX Runtime, then PyTorch on a CPU
(``severstal bench predict``); TensorRT, then PyTorch on a GPU."""

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
"""Valid backend names (``severstal.model.backends``): ``severstal predict --backend``, the handler's ``backend``."""
MODEL_SUFFIXES = {".pth": "torch", ".pkl": "torch", ".onnx": "onnxruntime", ".engine": "tensorrt",
                  ".plan": "tensorrt"}
"""The backend each model file type runs on when none is asked for and none is faster (see ``BACKEND_SUFFIXES``)."""
BACKEND_SUFFIXES = {"torch": (".pth", ".pkl"), "onnxruntime": (".onnx",), "openvino": (".onnx",),
                    "tensorrt": (".engine", ".plan")}
"""The model files each backend can run: OpenVINO reads the same exported ONNX model as ONNX Runtime."""

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
"""Valid precision names: ``severstal predict --precision``, ``$SEVERSTAL_PRECISION``."""
BACKEND_PRECISIONS = {"torch": ("fp32", "bf16", "fp16"), "onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "int8"),
                      "tensorrt": ("fp32", "fp16")}
"""The precisions each backend runs: torch bf16 is CPU autocast and fp16 CUDA autocast; an ONNX model's is fixed
when it is exported (``severstal export --int8``), as a TensorRT engine's is when it is built (``--fp16``)."""
PRECISION_ENV = "SEVERSTAL_PRECISION"
"""Forces a precision wherever none is passed (the TorchServe handler, ``severstal predict``): e.g. ``fp32``."""

# The real competition sample beside the repository (../shared/data/severstal-real), used by tests,
# benchmarks and figures when present; $SEVERSTAL_REAL_DATA points elsewhere.
REAL_DATA_ENV = "SEVERSTAL_REAL_DATA"
REAL_MASKS_CSV = "train_partial_newformat.csv"
"""The real sample's masks: 4,908 of the 7,095 real masks, in the later format."""
REAL_LABELS_CSV = "train_labels_per_image.csv"
"""The real sample's per-image class table: ``ImageId,class1..class4,n_defect_classes,rle_known``."""


def data_root() -> Path:
    """The default data folder: ``$SEVERSTAL_DATA``, else ``datasets/severstal``."""
    return Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)


def real_data_root() -> Path:
    """The real sample's folder: ``$SEVERSTAL_REAL_DATA``, else ``shared/data/severstal-real`` beside the checkout."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "severstal-real"
    return Path(os.environ.get(REAL_DATA_ENV) or default)


def model_file_in(folder: str | Path, device: str = "cpu") -> Path:
    """The model file of a run or export folder that runs fastest on ``device`` ("cpu", "cuda[:N]"): the first of
    :data:`FASTEST_FIRST` there, else any of :data:`MODEL_FILES` (else the weights' name)."""
    folder = Path(folder)
    order = FASTEST_FIRST["cuda" if str(device).startswith("cuda") else "cpu"]
    names = [*order, *(n for n in MODEL_FILES if n not in order)]
    return next((folder / name for name in names if (folder / name).is_file()), folder / WEIGHTS_FILE)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; it becomes ``path`` when the block succeeds.

    On an error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name that is not created here, so that the file gets the usual permissions (mkstemp's are 0600).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def check_backend(name: str) -> str:
    """Return ``name`` if it is a backend; otherwise raise ValueError listing the valid ones."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {list(BACKENDS)}")
    return name


def backend_for(model_file: str | Path) -> str:
    """The backend a model file runs on, from its suffix (``.pth`` torch, ``.onnx`` onnxruntime,
    ``.engine``/``.plan`` tensorrt); ValueError for any other suffix."""
    suffix = Path(model_file).suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise ValueError(f"cannot tell the backend of {model_file}: model files end in {sorted(MODEL_SUFFIXES)}")
    return MODEL_SUFFIXES[suffix]


def backends_for(model_file: str | Path) -> tuple[str, ...]:
    """Every backend that can run a model file (``.onnx``: onnxruntime and openvino).

    Raises ValueError for an unknown suffix, as :func:`backend_for`."""
    backend_for(model_file)
    suffix = Path(model_file).suffix.lower()
    return tuple(name for name in BACKENDS if suffix in BACKEND_SUFFIXES[name])


def check_precision(name: str, backend: str | None = None) -> str:
    """Return ``name`` if it is a precision (of ``backend``, when given); else ValueError listing the valid ones."""
    valid = BACKEND_PRECISIONS[check_backend(backend)] if backend is not None else PRECISIONS
    if name not in valid:
        where = f" for backend {backend!r}" if backend is not None else ""
        raise ValueError(f"unknown precision {name!r}{where}; valid precisions: {list(valid)}")
    return name

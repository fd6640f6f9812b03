"""Serving with TorchServe: the worker's logic, the ``.mar`` archive, the server's life cycle and a client.

The files TorchServe itself reads (the thin handler, ``model-config.yaml``, ``config.properties``) live in
``torchserve/`` inside this package, so they travel with a wheel; the repository's top-level ``torchserve/``
is a link to that folder, one copy for both.
"""

from pathlib import Path

TORCHSERVE_DIR = Path(__file__).resolve().parent / "torchserve"
"""The project's TorchServe files: the handler, ``model-config.yaml`` and ``config.properties``."""
HANDLER_FILE = TORCHSERVE_DIR / "handler.py"
MODEL_CONFIG_FILE = TORCHSERVE_DIR / "model-config.yaml"
PROPERTIES_FILE = TORCHSERVE_DIR / "config.properties"


def torchserve_file(path: Path) -> Path:
    """``path`` when it exists; FileNotFoundError saying the package's TorchServe files are incomplete."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall severstal (its torchserve/ package data is incomplete)")
    return path

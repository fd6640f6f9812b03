"""Serving with TorchServe or Ray Serve: the worker's logic, the Open Inference Protocol, the ``.mar`` archive,
the servers' life cycles and a client.

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

RAY_APP = "severstal"
"""The Ray Serve application (and deployment) name of ``severstal serve --engine ray``."""
RAY_PROXY_MARK = "ray::ProxyActor"
"""How Ray Serve's HTTP proxy process is titled (what ``ps`` shows)."""
RAY_REPLICA_MARK = f"ray::ServeReplica:{RAY_APP}:"
"""How a replica process of the project's Ray Serve application is titled."""

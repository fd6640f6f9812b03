"""The notebooks run top to bottom (nbclient), so that a broken notebook fails CI.

Each runs in its own temporary folder (their ``_work/`` scratch goes there) with a kernel of this
interpreter: a kernelspec written to a temporary ``JUPYTER_PATH``, so that no globally installed kernel
is needed or used.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL_NAME = "severstal-test"
NAMES = ["01_exploration", "02_training", "03_evaluation", "04_serving"]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> str:
    """A kernelspec for this interpreter on a temporary JUPYTER_PATH; returns its name."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "severstal tests", "language": "python",
    }))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(root))
        patch.setenv("MPLBACKEND", "Agg")
        yield KERNEL_NAME


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, kernel, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        f"{name}: commit notebooks with outputs stripped"
    client = NotebookClient(notebook, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()
    print(f"{name}: {time.perf_counter() - start:.0f} s")
    figures = sorted(p.name for p in (tmp_path / "_work").rglob("*.png"))
    assert figures, f"{name} drew no figure"
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
              if "image/png" in o.get("data", {})]
    assert images, f"{name} displayed no figure"

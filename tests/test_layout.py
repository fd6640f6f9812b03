"""The package's layout: stages import only the stages below them, no import circle, a light ``import severstal``."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import severstal

PACKAGE = Path(severstal.__file__).parent
ROOT = PACKAGE.parent
LAYERS = {"files": 0, "data": 1, "viz": 2, "model": 3, "serve": 4, "bench": 5, "cli": 5, "demo": 5, "figures": 5}
"""Rank of each stage: a module may import its own rank or lower, never higher."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the severstal modules it imports, at the top or inside functions."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py") if "torchserve" not in p.parts}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("severstal"):
                targets = [f"{node.module}.{a.name}" for a in node.names]
                found |= {t if t in modules else node.module for t in targets}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("severstal")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_module_belongs_to_a_stage():
    assert {stage(m) for m in import_graph() if stage(m)} <= set(LAYERS)


def test_no_stage_imports_a_stage_above_it():
    upward = [(m, t) for m, targets in import_graph().items() for t in targets
              if stage(m) and stage(t) and LAYERS[stage(t)] > LAYERS[stage(m)]]
    assert upward == []


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail(f"import circle: {' -> '.join(path[path.index(nxt):] + [nxt])}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])


def test_importing_severstal_and_its_public_names_stays_light():
    code = ("import sys, severstal; mask = severstal.rle_to_mask('1 3'); assert severstal.mask_to_rle(mask) == '1 3'; "
            "heavy = [m for m in ('torch', 'detectron2', 'ray', 'onnxruntime', 'tensorrt', 'openvino') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_names_are_the_owning_modules_objects():
    from severstal.data import annotations, dice, rle
    from severstal.model import predict

    assert severstal.rle_to_mask is rle.rle_to_mask and severstal.mask_to_rle is rle.mask_to_rle
    assert severstal.read_train_csv is annotations.read_train_csv
    assert severstal.mean_dice is dice.mean_dice and severstal.dice is dice.dice
    assert severstal.Predictor is predict.Predictor
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        severstal.nope  # noqa: B018


def test_the_top_level_torchserve_folder_is_the_packages_one():
    top = ROOT / "torchserve"
    if not top.exists():
        pytest.skip("not a checkout: the package is installed without the repository around it")
    from severstal.serve import TORCHSERVE_DIR

    assert top.resolve() == TORCHSERVE_DIR.resolve()
    assert {p.name for p in TORCHSERVE_DIR.iterdir() if p.is_file()} >= {"handler.py", "model-config.yaml",
                                                                         "config.properties"}

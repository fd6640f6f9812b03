"""The package's layout: stages import only the stages below them, no import circle, a light ``import severstal``."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import severstal

PACKAGE = Path(severstal.__file__).parent
ROOT = PACKAGE.parent
LAYERS = {"files": 0, "data": 1, "model": 2, "serve": 3, "viz": 3, "bench": 4, "cli": 4, "commands": 4, "demo": 4,
          "figures": 4}
"""Rank of each stage: a module may import its own rank or lower, never higher. ``viz`` sits above ``model``: the
model returns data and never draws."""


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


def test_only_viz_draws():
    drawing = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "matplotlib" for n in names) and stage(module_name(path)) != "viz":
                drawing.append(module_name(path))
    assert drawing == []


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

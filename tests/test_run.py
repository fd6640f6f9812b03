"""The run folder (``severstal.model.run``): its file names have one spelling, thresholds are checked on read and
write, a copy with overrides, and the files that go with a model."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

import severstal
from severstal import files
from severstal.model.run import (
    WITH_MODEL,
    Thresholds,
    check_per_class,
    checked_model_file,
    copy_run,
    files_with_model,
)

RUN_FOLDER_NAMES = {"WEIGHTS_FILE": "model_final.pth", "CONFIG_FILE": "config.yaml",
                    "THRESHOLDS_FILE": "thresholds.json", "SPLIT_FILE": "split.json", "METRICS_FILE": "metrics.json",
                    "ONNX_FILE": "model.onnx", "INT8_ONNX_FILE": "model-int8.onnx", "ENGINE_FILE": "model.engine"}
"""The names runs on disk have: changing one would leave every saved run unreadable."""

PACKAGE = Path(severstal.__file__).parent
TUNED = {"score_thresholds": [0.3, 0.4, 0.5, 0.6], "min_areas": [0, 50, 100, 200],
         "presence_thresholds": [0.0, 0.2, 0.0, 0.5], "dice_per_class": {"1": 0.5, "2": 0.6, "3": 0.7, "4": 0.8}}


def spelled_names(path: Path) -> list[tuple[int, str]]:
    """(line, string) of each string in ``path``'s code that is a run-folder file's name or a path ending in one
    (a piece of an f-string included); prose (docstrings, messages, help texts) may name the files."""
    name = re.compile(r"(?:\S*/)?(?:" + "|".join(map(re.escape, RUN_FOLDER_NAMES.values())) + ")")
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and name.fullmatch(node.value)]


def test_the_run_folder_names_are_spelled_once_in_the_package():
    assert {name: getattr(files, name) for name in RUN_FOLDER_NAMES} == RUN_FOLDER_NAMES
    spelled = {str(p.relative_to(PACKAGE)): hits for p in sorted(PACKAGE.rglob("*.py")) if (hits := spelled_names(p))}
    assert set(spelled) == {"files.py"}, f"spell them with severstal.files' constants: {spelled}"
    assert sorted(value for _, value in spelled["files.py"]) == sorted(RUN_FOLDER_NAMES.values())


def test_the_spelling_check_sees_paths_and_skips_prose(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('"""Reads config.yaml."""\nPATH = "run/model_final.pth"\nOTHER = "model-config.yaml"\n'
                      'def f(p):\n    """From thresholds.json."""\n    p.add_argument("--x", help="a config.yaml")\n'
                      '    return f"{p}/split.json", "metrics.json"\n')
    assert sorted(spelled_names(source)) == [(2, "run/model_final.pth"), (7, "/split.json"), (7, "metrics.json")]


def test_thresholds_round_trip_through_the_file_unchanged(tmp_path):
    tuned = Thresholds.from_dict(TUNED)
    assert tuned.write(tmp_path) == tmp_path / files.THRESHOLDS_FILE
    assert json.loads((tmp_path / files.THRESHOLDS_FILE).read_text()) == TUNED  # the fields runs have always had
    assert Thresholds.read(tmp_path) == tuned
    assert tuned.score_thresholds == (0.3, 0.4, 0.5, 0.6) and tuned.min_areas == (0, 50, 100, 200)


def test_a_run_tuned_before_the_presence_gate_keeps_the_configs_gate(tmp_path):
    from severstal.model.config import get_severstal_cfg

    (tmp_path / files.THRESHOLDS_FILE).write_text(json.dumps({"score_thresholds": [0.5] * 4, "min_areas": [0] * 4}))
    old = Thresholds.read(tmp_path)
    assert old.presence_thresholds is None and old.dice_per_class is None
    assert old.to_dict() == {"score_thresholds": [0.5] * 4, "min_areas": [0] * 4}
    cfg = get_severstal_cfg("small", ["SEVERSTAL.PRESENCE_THRESHOLDS", "[0.3, 0.3, 0.3, 0.3]"])
    old.apply(cfg)
    assert Thresholds.from_cfg(cfg).per_class() == {"score_thresholds": [0.5] * 4, "min_areas": [0] * 4,
                                                    "presence_thresholds": [0.3] * 4}
    Thresholds.from_dict(TUNED).apply(cfg)
    assert Thresholds.from_cfg(cfg).per_class() == {k: v for k, v in TUNED.items() if k != "dice_per_class"}


def test_an_untuned_run_has_no_thresholds(tmp_path):
    assert Thresholds.read(tmp_path) is None


@pytest.mark.parametrize("change, words", [
    ({"score_thresholds": [0.5, 0.5]}, "score_thresholds needs 4 values in [0, 1]"),
    ({"score_thresholds": [0.5, 1.5, 0.5, 0.5]}, "score_thresholds needs 4 values in [0, 1]"),
    ({"score_thresholds": ["0.5"] * 4}, "score_thresholds needs 4 values"),
    ({"min_areas": [0, -1, 0, 0]}, "min_areas needs 4 values >= 0"),
    ({"min_areas": [0, 2.5, 0, 0]}, "min_areas needs 4 values >= 0"),
    ({"presence_thresholds": [0.5, None, 0.5, 0.5]}, "presence_thresholds needs 4 values in [0, 1]"),
    ({"dice_per_class": {"7": 0.5}}, "dice_per_class maps class ids"),
    ({"min_areas": None}, "min_areas needs 4 values"),
    ({"gates": [0.5] * 4}, "unknown fields ['gates']; allowed: ['score_thresholds', 'min_areas'"),
])
def test_a_bad_thresholds_file_names_the_file_and_the_field(tmp_path, change, words):
    path = tmp_path / files.THRESHOLDS_FILE
    path.write_text(json.dumps({**TUNED, **change}))
    with pytest.raises(ValueError) as err:
        Thresholds.read(tmp_path)
    assert str(err.value).startswith(f"{path}: ") and words in str(err.value)


def test_a_thresholds_file_that_is_not_json_or_misses_a_field_says_so(tmp_path):
    path = tmp_path / files.THRESHOLDS_FILE
    path.write_text('{"score_thresholds": [0.5, 0.5, 0.5, 0.5]}')
    with pytest.raises(ValueError, match=re.escape(f"{path}: min_areas is missing")):
        Thresholds.read(tmp_path)
    path.write_text('{"score_thresholds": [0.5, ')
    with pytest.raises(ValueError, match=re.escape(f"{path}: not JSON")):
        Thresholds.read(tmp_path)


def test_bad_thresholds_are_never_written(tmp_path):
    from severstal.model.evaluation import save_thresholds

    path = tmp_path / files.THRESHOLDS_FILE
    with pytest.raises(ValueError, match=re.escape(f"{path}: score_thresholds needs 4 values in [0, 1]")):
        save_thresholds({**TUNED, "score_thresholds": [0.5, 0.5, 0.5, float("nan")], "curves": {}}, tmp_path)
    with pytest.raises(ValueError, match="min_areas needs 4 values"):
        Thresholds(score_thresholds=[0.5] * 4, min_areas=[0] * 3)
    assert not path.exists()
    assert save_thresholds({**TUNED, "curves": {}}, tmp_path) == path
    assert Thresholds.read(tmp_path) == Thresholds.from_dict(TUNED)


def test_the_handler_block_checks_thresholds_by_the_same_rule():
    from severstal.serve.worker import HandlerSettings

    for name, values in [("score_thresholds", [0.5, 0.5, 0.5, 2.0]), ("min_areas", [0, 0, 0, 0.5])]:
        with pytest.raises(ValueError) as by_file:
            check_per_class(name, values)
        with pytest.raises(ValueError) as by_handler:
            HandlerSettings.from_mapping({name: values})
        assert str(by_handler.value) == f"handler settings: {by_file.value}"
    settings = HandlerSettings.from_mapping({"score_thresholds": [0.5] * 4, "min_areas": [10, 0, 0, 5]})
    assert (settings.score_thresholds, settings.min_areas) == ((0.5,) * 4, (10, 0, 0, 5))


def make_run(folder: Path, *extra: str) -> Path:
    """A run folder of the ``small`` config with stand-in weights and the ``extra`` files."""
    from severstal.model.config import get_severstal_cfg

    folder.mkdir()
    (folder / files.CONFIG_FILE).write_text(get_severstal_cfg("small").dump())
    (folder / files.WEIGHTS_FILE).write_bytes(b"weights")
    for name in extra:
        (folder / name).write_text("{}")
    return folder


def test_copy_run_applies_the_overrides_and_leaves_the_run_alone(tmp_path):
    from severstal.model.config import get_severstal_cfg

    run = make_run(tmp_path / "run", files.THRESHOLDS_FILE, files.SPLIT_FILE)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    overrides = ["SEVERSTAL.SCORE_THRESHOLDS", "[0.02, 0.02, 0.02, 0.02]", "TEST.DETECTIONS_PER_IMAGE", "20"]
    copy = copy_run(run, tmp_path / "copy", overrides)
    assert copy == tmp_path / "copy"
    assert sorted(p.name for p in copy.iterdir()) == sorted([files.CONFIG_FILE, files.WEIGHTS_FILE])
    assert (copy / files.WEIGHTS_FILE).read_bytes() == b"weights"
    assert (copy / files.CONFIG_FILE).read_text() == get_severstal_cfg(run / files.CONFIG_FILE, overrides).dump()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert (copy_run(run, tmp_path / "plain") / files.CONFIG_FILE).read_text() == get_severstal_cfg(
        run / files.CONFIG_FILE).dump()


@pytest.mark.parametrize("overrides, error, words", [
    (["TEST.DETECTIONS_PER_IMAGE"], ValueError, "KEY VALUE pairs"),
    (["TEST.NO_SUCH_KEY", "1"], AssertionError, "Non-existent key: TEST.NO_SUCH_KEY"),
    (["TEST.DETECTIONS_PER_IMAGE", "'many'"], ValueError, "Type mismatch"),
])
def test_copy_run_refuses_bad_overrides_before_writing(tmp_path, overrides, error, words):
    run = make_run(tmp_path / "run")
    with pytest.raises(error, match=words):
        copy_run(run, tmp_path / "copy", overrides)
    assert not (tmp_path / "copy").exists()


def test_the_files_that_go_with_a_model(tmp_path):
    assert WITH_MODEL == (files.CONFIG_FILE, files.THRESHOLDS_FILE, files.SPLIT_FILE)
    run = make_run(tmp_path / "run", files.SPLIT_FILE)
    assert files_with_model(run) == [run / files.CONFIG_FILE, run / files.SPLIT_FILE]
    (run / files.THRESHOLDS_FILE).write_text("{}")
    assert files_with_model(run) == [run / name for name in WITH_MODEL]


def test_checked_model_file_finds_the_fastest_and_says_what_is_missing(tmp_path):
    run = make_run(tmp_path / "run")
    assert checked_model_file(run) == checked_model_file(run / files.WEIGHTS_FILE) == run / files.WEIGHTS_FILE
    (run / files.ONNX_FILE).write_bytes(b"onnx")
    assert checked_model_file(run) == run / files.ONNX_FILE
    assert checked_model_file(run, device="cuda") == run / files.WEIGHTS_FILE
    with pytest.raises(FileNotFoundError, match=re.escape(f"no weights at {run / 'nope.pth'}")):
        checked_model_file(run / "nope.pth")
    (run / files.CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{run / files.CONFIG_FILE} is missing")):
        checked_model_file(run)


def test_the_module_stays_light():
    import subprocess
    import sys

    code = ("import sys, severstal.model.run; print([m for m in ('torch', 'detectron2') if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"

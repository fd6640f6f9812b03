"""severstal.cli: a light table of contents, errors turned into a message and a status once, one benchmark printer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from severstal.cli import COMMANDS, build_parser, main


def test_the_parser_loads_nothing_heavy():
    code = ("import sys; from severstal.cli import build_parser; build_parser(); "
            "print([m for m in ('numpy', 'pandas', 'torch', 'cv2', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_command_and_benchmark_has_its_help_and_prog():
    from severstal.bench.commands import BENCHMARKS

    assert list(COMMANDS)[-2:] == ["figures", "bench"] and "plots" not in COMMANDS
    args = build_parser().parse_args(["bench", "soak", "--url", "u", "--images", "i", "--json"])
    assert args.prog == "severstal bench soak" and args.json
    assert set(BENCHMARKS) == {"convert", "serve", "soak", "train", "predict", "profile", "ray", "gpu"}


def test_expected_errors_become_a_message_and_status_2_and_bugs_stay_bugs(monkeypatch, tmp_path, capsys):
    import severstal.data.synth as synth

    def refuse(*args, **kwargs):
        raise ValueError("images must be >= 1")

    monkeypatch.setattr(synth, "make_synthetic_dataset", refuse)
    assert main(["synth", "--out", str(tmp_path), "--images", "0"]) == 2
    assert capsys.readouterr().err == "severstal synth: error: images must be >= 1\n"

    def crash(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(synth, "make_synthetic_dataset", crash)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["synth", "--out", str(tmp_path), "--images", "1"])


def test_a_missing_engine_is_an_expected_error_once_its_module_is_loaded(monkeypatch, capsys):
    from severstal.bench import commands
    from severstal.model.backends import BackendUnavailable

    def unavailable(args):
        raise BackendUnavailable("TensorRT is unavailable: no GPU")

    monkeypatch.setitem(commands.BENCHMARKS, "predict", commands.BENCHMARKS["predict"]._replace(run=unavailable))
    assert main(["bench", "predict", "--weights", "w", "--images", "i"]) == 2
    assert capsys.readouterr().err == "severstal bench predict: error: TensorRT is unavailable: no GPU\n"


def test_a_benchmark_prints_its_report_its_json_line_and_why_it_failed(monkeypatch, capsys):
    from severstal.bench import commands

    result = {"masks": 2, "csv": "t.csv", "instances": 3, "repeats": 1, "speedup": 2.0, "identical": False,
              "mismatched_masks": 1, "read_seconds": 0.5,
              "rows": [{"method": "runs", "seconds": 0.25, "masks_per_s": 8.0},
                       {"method": "pixels", "seconds": 0.5, "masks_per_s": 4.0}]}
    monkeypatch.setitem(commands.BENCHMARKS, "convert",
                        commands.BENCHMARKS["convert"]._replace(run=lambda args: result))
    assert main(["bench", "convert", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "convert: 2 masks of t.csv -> 3 instances (median of 1, one core)",
        "method  seconds  masks_per_s",
        "runs      0.250            8",
        "pixels    0.500            4",
        "speed-up: 2.0x; identical instances: NO",
        "reading and validating the CSV: 0.500 s; read + convert: 0.750 s",
        json.dumps(result, sort_keys=True),
    ]
    assert captured.err == "severstal bench convert: 1 masks differ between the two pipelines\n"


def test_demo_takes_a_seed_and_config_overrides(monkeypatch, capsys):
    import severstal.demo as demo

    seen = []

    def stop(out, settings):
        seen.append(settings)
        raise ValueError("stopped before running")

    monkeypatch.setattr(demo, "run_demo", stop)
    assert main(["demo", "--out", "d", "--seed", "7", "--images", "5"]) == 2
    assert (seen[0].seed, seen[0].train_images) == (7, 5)
    assert build_parser().parse_args(["demo"]).seed == demo.DemoSettings().seed
    assert main(["demo", "--out", "d", "--iterations", "40", "SEVERSTAL.CROP_WIDTH", "800"]) == 2
    assert (seen[1].max_iter, seen[1].opts) == (40, ["SEVERSTAL.CROP_WIDTH", "800"])


@pytest.mark.parametrize("iterations, expected", [(None, None), (40, "40")])
def test_demo_trains_the_configs_iterations_unless_told(monkeypatch, tmp_path, iterations, expected):
    """One copy of the count: the config's SOLVER.MAX_ITER, which its STEPS fit; --iterations overrides it."""
    import severstal.demo as demo
    import severstal.model.train as train_module

    seen = []

    def stop(data, config, run, opts, **kwargs):
        seen.append(list(opts))
        raise RuntimeError("stopped before training")

    monkeypatch.setattr(train_module, "train", stop)
    with pytest.raises(RuntimeError, match="stopped"):
        demo.run_demo(tmp_path, demo.DemoSettings(train_images=4, holdout_images=2, max_iter=iterations))
    overrides = dict(zip(seen[0][::2], seen[0][1::2]))
    assert overrides.get("SOLVER.MAX_ITER") == expected and overrides["SEED"] == "0"

"""severstal.bench: the convert benchmark on a few real masks (results, never timings) and its CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from severstal.bench import format_table, latency_stats
from severstal.bench.convert import bench_convert, decode_with_loop, pixel_instances
from severstal.cli import main
from severstal.data.instances import rle_to_instances
from severstal.data.rle import rle_to_mask


@pytest.fixture(scope="module")
def real_csv(real_data):
    return real_data / "train_partial_newformat.csv"


def test_bench_convert_gives_identical_instances_and_positive_rates(real_csv):
    result = bench_convert(real_csv, repeats=1, limit=40)
    assert result["benchmark"] == "convert" and result["masks"] == 40
    assert result["identical"] and result["mismatched_masks"] == 0
    assert result["instances"] >= 40
    assert [row["method"].split()[0] for row in result["rows"]] == ["runs", "pixels"]
    assert all(row["seconds"] > 0 and row["masks_per_s"] > 0 for row in result["rows"])
    assert result["speedup"] > 0 and result["read_seconds"] > 0


def test_the_baseline_pipeline_agrees_with_the_package(real_csv):
    frame = pd.read_csv(real_csv).iloc[:20]
    for rle, class_id in zip(frame["EncodedPixels"], frame["ClassId"]):
        assert np.array_equal(decode_with_loop(rle), rle_to_mask(rle))
        pixel, runs = pixel_instances(rle, class_id), rle_to_instances(rle, class_id)
        assert sorted(pixel, key=str) == sorted(runs, key=str)


def test_format_table_aligns_text_left_and_numbers_right():
    rows = [{"method": "runs", "seconds": 0.5, "n": 12000}, {"method": "pixels", "seconds": 10.25, "n": 400}]
    assert format_table(rows, [("method", ""), ("seconds", ".2f"), ("n", ",d")]).splitlines() == [
        "method  seconds       n",
        "runs       0.50  12,000",
        "pixels    10.25     400",
    ]


def test_cli_bench_convert_prints_a_table_and_the_ratio(real_csv, capsys):
    assert main(["bench", "convert", "--csv", str(real_csv), "--limit", "15", "--repeats", "1", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("convert: 15 masks of")
    assert out[1].split() == ["method", "seconds", "masks_per_s"]
    assert any(line.startswith("speed-up: ") and line.endswith("identical instances: yes") for line in out)
    assert json.loads(out[-1])["masks"] == 15


def test_cli_bench_convert_without_real_data_asks_for_a_csv(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SEVERSTAL_REAL_DATA", str(tmp_path / "absent"))
    assert main(["bench", "convert"]) == 2
    assert "pass --csv TRAIN_CSV" in capsys.readouterr().err


def test_cli_bench_lists_its_benchmarks(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "convert" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "nothing"])
    assert "invalid choice: 'nothing'" in capsys.readouterr().err



def test_cli_bench_predict_times_every_backend_on_the_same_images(low_floor_run, onnx_export, real_data, capsys):
    assert main(["bench", "predict", "--weights", str(low_floor_run), "--onnx", str(onnx_export / "model.onnx"),
                 "--images", str(real_data / "train_images"), "--limit", "2", "--repeats", "1", "--threads", "1",
                 "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("predict: 2 images x 1 passes, batch size 1, 1 threads, cpu")
    r = json.loads(out[-1])
    assert [row["backend"] for row in r["rows"]] == ["torch", "onnxruntime"]
    torch_row, ort_row = r["rows"]
    assert torch_row["e2e_vs_torch"] == 1.0 and ort_row["dice_vs_torch"] >= 0.99
    assert ort_row["e2e_vs_torch"] == pytest.approx(torch_row["e2e_p50_ms"] / ort_row["e2e_p50_ms"])
    assert all(row["e2e_p50_ms"] > 0 and row["net_p50_ms"] > 0 and row["net_images_per_s"] > 0 for row in r["rows"])
    assert main(["bench", "predict", "--weights", str(low_floor_run), "--images", str(real_data / "train_images"),
                 "--backends", "torch,openvino"]) == 2
    assert "unknown backend 'openvino'" in capsys.readouterr().err


def test_latency_stats_interpolate_percentiles_and_count_throughput_by_wall_time():
    stats = latency_stats([0.4, 0.1, 0.2, 0.3], wall=0.5)
    assert stats == {"n": 4, "p50": pytest.approx(0.25), "p95": pytest.approx(0.385), "p99": pytest.approx(0.397),
                     "mean": pytest.approx(0.25), "images_per_s": pytest.approx(8.0)}
    assert latency_stats([0.5, 0.25])["images_per_s"] == pytest.approx(1 / 0.375)  # one after another
    with pytest.raises(ValueError, match="no latencies"):
        latency_stats([])

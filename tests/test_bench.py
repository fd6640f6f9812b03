"""severstal.bench: the convert benchmark on a few real masks (results, never timings) and its CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from severstal.bench import format_table, latency_stats
from severstal.bench.convert import bench_convert, decode_with_loop, pixel_instances
from severstal.bench.profile import STAGES
from severstal.cli import main
from severstal.data.instances import rle_to_instances
from severstal.data.rle import rle_to_mask
from severstal.model.backends import openvino_missing


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
    backends = "torch,onnxruntime" + (",openvino" if openvino_missing() is None else "")
    assert main(["bench", "predict", "--weights", str(low_floor_run), "--onnx", str(onnx_export / "model.onnx"),
                 "--images", str(real_data / "train_images"), "--limit", "2", "--repeats", "1", "--threads", "1",
                 "--backends", backends + ",onnxruntime:int8", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("predict: 2 images x 1 passes, batch size 1, 1 threads, cpu")
    assert "load average" in out[0] and "CPU bf16 instructions: " in out[0]
    r = json.loads(out[-1])
    variants = [(b, "fp32") for b in backends.split(",")] + [("onnxruntime", "int8")]
    assert [(row["backend"], row["precision"]) for row in r["rows"]] == variants
    torch_row, ort_row = r["rows"][:2]
    assert torch_row["e2e_vs_torch"] == 1.0 and ort_row["dice_vs_torch"] >= 0.99
    assert all(row["keeps_answers"] and row["detections"] > 0 for row in r["rows"][:-1])
    int8_row = r["rows"][-1]  # timed whatever its parity; keeps_answers says whether it reached it
    assert "onnxruntime int8" in int8_row["runs"] and int8_row["keeps_answers"] == (int8_row["dice_vs_torch"] >= 0.99)
    assert ort_row["e2e_vs_torch"] == pytest.approx(torch_row["e2e_p50_ms"] / ort_row["e2e_p50_ms"])
    assert all(row["e2e_p50_ms"] > 0 and row["net_p50_ms"] > 0 and row["net_images_per_s"] > 0 for row in r["rows"])
    assert set(r["load_average"]) == {"before", "after"}
    assert main(["bench", "predict", "--weights", str(low_floor_run), "--images", str(real_data / "train_images"),
                 "--backends", "torch,tflite"]) == 2
    assert "unknown backend 'tflite'" in capsys.readouterr().err
    assert main(["bench", "predict", "--weights", str(low_floor_run), "--images", str(real_data / "train_images"),
                 "--backends", "onnxruntime:bf16"]) == 2
    assert "unknown precision 'bf16' for backend 'onnxruntime'; valid precisions: ['fp32', 'int8']" in \
        capsys.readouterr().err


def test_cli_bench_profile_splits_one_image_into_stages(low_floor_run, real_data, capsys):
    image = next((real_data / "train_images").glob("*.jpg"))
    assert main(["bench", "profile", "--weights", str(low_floor_run), "--image", str(image), "--repeats", "1",
                 "--threads", "1", "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"profile: {image.name}, PyTorch fp32, 1 threads, p50 of 1;")
    r = json.loads(out[-1])
    assert [s["stage"] for s in r["stages"]] == list(STAGES)
    assert r["detections"] > 0 and r["pasted"] > 0
    assert all(s["p50_ms"] > 0 for s in r["stages"]) and sum(s["share"] for s in r["stages"]) == pytest.approx(1.0)
    assert r["total_ms"] == pytest.approx(sum(s["p50_ms"] for s in r["stages"]))


def test_latency_stats_interpolate_percentiles_and_count_throughput_by_wall_time():
    stats = latency_stats([0.4, 0.1, 0.2, 0.3], wall=0.5)
    assert stats == {"n": 4, "p50": pytest.approx(0.25), "p95": pytest.approx(0.385), "p99": pytest.approx(0.397),
                     "mean": pytest.approx(0.25), "images_per_s": pytest.approx(8.0)}
    assert latency_stats([0.5, 0.25])["images_per_s"] == pytest.approx(1 / 0.375)  # one after another
    with pytest.raises(ValueError, match="no latencies"):
        latency_stats([])


def test_bench_train_times_each_config_with_each_variant(capsys):
    from severstal.bench.train import bench_train

    result = bench_train(["small"], iterations=1, warmup=0, images=4,
                         variants=[(), ("MODEL.FPN.OUT_CHANNELS", "32")])
    assert [row["config"] for row in result["rows"]] == ["small", "small MODEL.FPN.OUT_CHANNELS 32"]
    assert all(row["s_per_iter"] > 0 and row["input"] == "128x800" for row in result["rows"])
    assert result["ratios"]["small"] == 1.0
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        bench_train(["small"], iterations=1, warmup=0, images=2, variants=[("MODEL.FPN.OUT_CHANNELS",)])
    assert main(["bench", "train", "--configs", "small", "--iterations", "1", "--variant",
                 "MODEL.ROI_MASK_HEAD.CONV_DIM 32"]) == 0
    out = capsys.readouterr().out
    assert "small MODEL.ROI_MASK_HEAD.CONV_DIM 32" in out and "s/image relative to the first" in out

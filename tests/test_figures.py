"""severstal.figures and ``severstal figures``: which figures a dataset and a run give; per-image scores.

``score_images`` (severstal.model.evaluation) is tested here, beside the gallery and the README picture that use it.
"""

from __future__ import annotations

import json

import pytest

from severstal import figures
from severstal.cli import main
from severstal.data.dice import dice_per_image
from severstal.model.evaluation import score_images


def test_read_metrics_sorts_lines_and_skips_a_truncated_one(tmp_path):
    lines = [{"iteration": 39, "total_loss": 1.5}, {"iteration": 19, "total_loss": 2.0},
             {"iteration": 40, "dice/mean_dice": 0.8}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"iteration": 59, "tot')
    metrics = figures.read_metrics(tmp_path)
    assert metrics["iteration"].tolist() == [19, 39, 40]
    assert metrics["dice/mean_dice"].notna().tolist() == [False, False, True]
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        figures.read_metrics(tmp_path / "absent")


def test_latency_row_by_hand():
    row = figures.latency_row("x", [0.4, 0.1, 0.2, 0.3])
    # Percentiles interpolate between order statistics: p95 = 0.3 + 0.85 * (0.4 - 0.3).
    assert row == {"method": "x", "n": 4, "p50": pytest.approx(0.25), "p95": pytest.approx(0.385),
                   "p99": pytest.approx(0.397), "mean": pytest.approx(0.25), "images_per_s": pytest.approx(4.0)}
    with pytest.raises(ValueError, match="no latencies"):
        figures.latency_row("x", [])


def test_figures_command_writes_the_data_figures_and_the_readme_pictures(real_data, tmp_path, capsys):
    assert main(["figures", "--out", str(tmp_path / "graphs"), "--data", str(real_data),
                 "--images-out", str(tmp_path / "images")]) == 0
    written = {p.name for p in (tmp_path / "graphs").iterdir()}
    assert written == {"class_balance.png", "classes_per_image.png", "defect_areas.png", "instances_per_image.png",
                       "defect_positions.png", "examples_per_class.png", "defect_free_examples.png"}
    assert {p.name for p in (tmp_path / "images").iterdir()} == {"real_classes.png", "pipeline.png"}
    for path in [*(tmp_path / "graphs").iterdir(), *(tmp_path / "images").iterdir()]:
        assert 5_000 < path.stat().st_size < 300_000, path
    assert "skipped run figures" in capsys.readouterr().out


def test_a_run_without_weights_gives_its_curves_and_dice_and_says_what_it_skips(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"iteration": 19, "total_loss": 2.0, "loss_cls": 0.8}) + "\n")
    evaluation = {"mean_dice": 0.9, "empty_baseline": 0.85, "dice_per_class": {"1": 0.9, "2": 1.0, "3": 0.8, "4": 0.9}}
    (run / "eval" / "evaluation.json").write_text(json.dumps(evaluation))
    written, skipped = figures.write_run_figures(run, tmp_path / "graphs", tmp_path / "images")
    assert sorted(p.name for p in written) == ["dice_per_class.png", "training_curves.png"]
    assert sorted(s.split(":")[0] for s in skipped) == ["latency.png", "prediction.png", "threshold_curves.png"]
    with pytest.raises(FileNotFoundError, match="make demo"):
        figures.write_run_figures(tmp_path / "absent", tmp_path / "graphs")


def test_a_tuned_runs_threshold_curves_are_drawn_from_its_evaluation(tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    curves = {"min_areas": [0, 100], "dice": {str(c): {"0.5": [0.7, 0.8], "0.9": [0.6, 0.6]} for c in (1, 2, 3, 4)}}
    evaluation = {"mean_dice": 0.9, "empty_baseline": 0.85, "dice_per_class": {"1": 0.9, "2": 1.0, "3": 0.8, "4": 0.9},
                  "threshold_curves": curves}
    (run / "eval" / "evaluation.json").write_text(json.dumps(evaluation))
    written, skipped = figures.write_run_figures(run, tmp_path / "graphs")
    assert sorted(p.name for p in written) == ["dice_per_class.png", "threshold_curves.png"]
    assert [s.split(":")[0] for s in skipped] == ["training_curves.png", "latency.png"]


def test_score_images_predicts_scores_and_sorts_worst_first(scratch_run, synthetic_data):
    from severstal.data.annotations import read_train_csv
    from severstal.model.evaluation import records_frame

    ids = sorted(p.name for p in (synthetic_data / "train_images").iterdir())[:3]
    scored = score_images(scratch_run, data_dir=synthetic_data, image_ids=ids)
    assert sorted(s.image_id for s in scored) == ids
    assert [s.dice for s in scored] == sorted(s.dice for s in scored)
    truth = read_train_csv(synthetic_data / "train.csv")
    expected = dice_per_image(records_frame([s.image_id for s in scored], [s.record for s in scored]), truth,
                              [s.image_id for s in scored])
    assert [s.dice for s in scored] == pytest.approx(expected["mean_dice"].tolist())
    for s in scored:
        rows = truth[truth["ImageId"] == s.image_id]
        assert s.truth == dict(zip(rows["ClassId"], rows["EncodedPixels"]))
        assert s.path.is_file() and set(s.record) == {"height", "width", "defects", "classes"}
    with pytest.raises(ValueError, match="no validation split"):
        score_images(scratch_run, data_dir=synthetic_data)

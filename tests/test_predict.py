"""Prediction: records in the REST contract, thresholds and areas, flips, submissions for every image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from severstal import CLASS_IDS
from severstal.data.annotations import read_submission
from severstal.data.rle import rle_to_mask
from severstal.model.predict import Detections, Predictor, RawOutput, _merge, _unflip, make_record, predict_folder


def _detections(specs, shape=(256, 1600)) -> Detections:
    """specs: (class_id, score, (y0, y1, x0, x1)) rectangles."""
    masks = np.zeros((len(specs), *shape), bool)
    boxes = []
    for i, (_, _, (y0, y1, x0, x1)) in enumerate(specs):
        masks[i, y0:y1, x0:x1] = True
        boxes.append([x0, y0, x1, y1])
    return Detections(shape[0], shape[1], np.array(boxes, np.float32).reshape(-1, 4),
                      np.array([s[1] for s in specs], np.float32), np.array([s[0] for s in specs], np.int64), masks)


def test_record_unions_kept_instances_per_class():
    det = _detections([(3, 0.9, (0, 10, 0, 10)), (3, 0.8, (20, 30, 100, 120)), (3, 0.2, (50, 60, 0, 10)),
                       (1, 0.7, (5, 6, 5, 6))])
    record = make_record(det, [0.5] * 4, [0] * 4)
    assert (record["height"], record["width"]) == (256, 1600)
    assert set(record["classes"]) == {"1", "2", "3", "4"}
    mask3 = rle_to_mask(record["classes"]["3"])
    assert mask3.sum() == 100 + 200  # the 0.2 instance is below the threshold
    assert mask3[0:10, 0:10].all() and mask3[20:30, 100:120].all() and not mask3[50:60, 0:10].any()
    assert record["classes"]["2"] == "" and record["classes"]["4"] == ""
    assert [d["score"] for d in record["defects"]] == pytest.approx([0.9, 0.8, 0.7])
    first = record["defects"][0]
    assert first["class_id"] == 3 and first["area"] == 100 and first["bbox"] == [0.0, 0.0, 10.0, 10.0]
    assert rle_to_mask(first["rle"]).sum() == 100


def test_min_area_empties_small_class_masks_and_their_defects():
    det = _detections([(1, 0.9, (0, 5, 0, 5)), (2, 0.9, (0, 50, 0, 50))])
    record = make_record(det, [0.5] * 4, [30, 30, 0, 0])
    assert record["classes"]["1"] == "" and record["classes"]["2"] != ""
    assert [d["class_id"] for d in record["defects"]] == [2]


def test_per_class_score_thresholds_apply_to_their_class_only():
    det = _detections([(1, 0.6, (0, 5, 0, 5)), (4, 0.6, (0, 5, 10, 15))])
    record = make_record(det, [0.5, 0.5, 0.5, 0.7], [0] * 4)
    assert record["classes"]["1"] != "" and record["classes"]["4"] == ""


def test_unflip_maps_boxes_and_masks_back():
    masks = torch.zeros(1, 28, 28)
    masks[0, :, :7] = 1  # left quarter of the box
    raw = RawOutput(torch.tensor([[10.0, 20.0, 50.0, 40.0]]), torch.tensor([0.9]), torch.tensor([2]), masks)
    back = _unflip(raw, (128, 100), "horizontal")
    assert back.boxes.tolist() == [[50.0, 20.0, 90.0, 40.0]]
    assert back.mask_probs[0, :, 21:].all() and not back.mask_probs[0, :, :21].any()
    back = _unflip(raw, (128, 100), "vertical")
    assert back.boxes.tolist() == [[10.0, 88.0, 50.0, 108.0]]


def test_merge_of_two_views_averages_matches_and_halves_lone_detections():
    a = RawOutput(torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]]), torch.tensor([0.8, 0.6]),
                  torch.tensor([0, 1]), torch.ones(2, 28, 28))
    b = RawOutput(torch.tensor([[0.0, 0, 10, 11]]), torch.tensor([0.6]), torch.tensor([0]), torch.zeros(1, 28, 28))
    merged = _merge(a, b, 0.5)
    order = merged.scores.argsort(descending=True)
    assert merged.scores[order].tolist() == pytest.approx([0.7, 0.3])
    assert merged.mask_probs[order[0]].mean().item() == pytest.approx(0.5)
    assert merged.classes[order].tolist() == [0, 1]


def test_scratch_model_answers_in_the_contract(scratch_run, real_data):
    predictor = Predictor.from_weights(scratch_run, device="cpu")
    path = next((real_data / "train_images").glob("*.jpg"))
    from severstal.data.images import read_image

    image = read_image(path)
    small = image[:128, :800].copy()
    records = predictor.predict([image, small])
    assert [(r["height"], r["width"]) for r in records] == [(256, 1600), (128, 800)]
    # The low thresholds give random weights defects on both images, so the checks below check something.
    assert all(len(r["defects"]) > 0 for r in records)
    for record in records:
        for d in record["defects"]:
            x0, y0, x1, y1 = d["bbox"]
            mask = rle_to_mask(d["rle"], (record["height"], record["width"]))
            ys, xs = np.nonzero(mask)
            assert mask.sum() == d["area"] > 0 and d["class_id"] in CLASS_IDS and 0.1 <= d["score"] <= 1
            assert xs.min() >= np.floor(x0) - 1 and xs.max() <= np.ceil(x1) and ys.min() >= np.floor(y0) - 1


@pytest.mark.slow
def test_every_real_image_goes_through_predict_into_a_valid_submission(scratch_run, real_data, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    sources = [*(real_data / "train_images").glob("*.jpg"), *(real_data / "train_images_png").glob("*.png"),
               *(real_data / "test_images").glob("*.jpg")]
    for path in sources:
        (folder / path.name).symlink_to(path)
    out = tmp_path / "submission.csv"
    summary = predict_folder(scratch_run, folder, out, fmt="old", batch_size=8)
    assert summary["images"] == len(sources) == 118
    parsed = read_submission(out)
    assert parsed.image_ids == sorted(p.name for p in sources)
    assert len(out.read_text().splitlines()) == 1 + 4 * 118
    assert len(parsed.frame) == summary["masks"]


def _folder_with_broken_files(real_data, tmp_path, count=6):
    """``count`` real images (symlinks) plus three unreadable files: truncated, empty and not an image."""
    folder = tmp_path / "images"
    folder.mkdir()
    sources = sorted((real_data / "train_images").glob("*.jpg"))[:count]
    for path in sources:
        (folder / path.name).symlink_to(path)
    (folder / "0000broken.jpg").write_bytes(sources[0].read_bytes()[:2000])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    return folder, sorted([p.name for p in sources] + ["0000broken.jpg", "empty.jpg", "notes.png"])


def test_unreadable_files_cost_no_other_image(scratch_run, real_data, tmp_path):
    folder, names = _folder_with_broken_files(real_data, tmp_path)
    predictor = Predictor.from_weights(scratch_run, device="cpu")
    reference = tmp_path / "good.csv"
    good = tmp_path / "good"
    good.mkdir()
    for name in names:
        if (folder / name).is_symlink():
            (good / name).symlink_to((folder / name).resolve())
    predict_folder(None, good, reference, predictor=predictor, batch_size=4)

    out = tmp_path / "submission.csv"
    summary = predict_folder(None, folder, out, predictor=predictor, batch_size=4)
    assert [u["image"] for u in summary["unreadable"]] == ["0000broken.jpg", "empty.jpg", "notes.png"]
    assert all(u["image"] in u["error"] for u in summary["unreadable"])  # each message names its file
    assert "empty input" in summary["unreadable"][1]["error"]
    parsed = read_submission(out)
    assert parsed.image_ids == names and len(out.read_text().splitlines()) == 1 + 4 * len(names)
    assert summary["masks"] > 0, "the scratch model should give masks to compare"
    bad = {"0000broken.jpg", "empty.jpg", "notes.png"}
    assert not set(parsed.frame["ImageId"]) & bad  # unreadable images: every mask empty
    good_rows = [line for line in out.read_text().splitlines() if line.split(",")[0] not in bad]
    assert good_rows == reference.read_text().splitlines()  # the readable images' rows are unchanged


def test_predict_files_still_raises_on_unreadable_files_unless_asked(scratch_run, real_data, tmp_path):
    from severstal.data.images import ImageError

    folder, _ = _folder_with_broken_files(real_data, tmp_path, count=1)
    predictor = Predictor.from_weights(scratch_run, device="cpu")
    with pytest.raises(ImageError, match="0000broken.jpg: broken image"):
        list(predictor.predict_files(sorted(folder.iterdir()), progress=False))
    with pytest.raises(FileNotFoundError):
        list(predictor.predict_files([folder / "absent.jpg"], progress=False))
    pairs = list(predictor.predict_files([folder / "absent.jpg"], progress=False, skip_unreadable=True))
    assert pairs[0][1]["error"] and pairs[0][1]["classes"] == {"1": "", "2": "", "3": "", "4": ""}


def test_cli_names_unreadable_files_on_stderr_and_exits_3(scratch_run, real_data, tmp_path, capsys):
    from severstal.cli import main
    from severstal.model.predict import EXIT_UNREADABLE

    folder, names = _folder_with_broken_files(real_data, tmp_path, count=2)
    out = tmp_path / "submission.csv"
    assert main(["predict", "--weights", str(scratch_run), "--images", str(folder), "--out", str(out)]) == 3
    assert EXIT_UNREADABLE == 3
    err = capsys.readouterr().err
    for name in ("0000broken.jpg", "empty.jpg", "notes.png"):
        assert f"unreadable: {folder / name}" in err
    assert "3 of 5 images unreadable" in err
    assert read_submission(out).image_ids == names


def test_ray_options_without_ray_are_refused(scratch_run, tmp_path, capsys):
    from severstal.cli import main

    args = ["predict", "--weights", str(scratch_run), "--images", str(tmp_path), "--out", str(tmp_path / "s.csv")]
    assert main(args + ["--actors", "2"]) == 2
    assert "--actors need(s) --ray" in capsys.readouterr().err


def test_the_backend_skips_masks_under_the_lowest_threshold_and_keeps_the_answers(low_floor_run, real_data):
    """predict tells the backend its lowest class threshold: fewer detections reach the mask head, and the
    records are those of the full floor, thresholded afterwards (NMS and the cap only ever drop lower scores)."""
    from severstal.data.images import read_image

    predictor = Predictor.from_weights(low_floor_run, device="cpu", precision="fp32")
    images = [read_image(p) for p in sorted((real_data / "train_images").glob("*.jpg"))[:4]]
    tensors = [predictor.preprocess(image) for image in images]
    full = predictor.backend.run(tensors)
    threshold = float(np.median(torch.cat([r.scores for r in full]).numpy()))
    skipped = predictor.backend.run(tensors, min_score=threshold)
    assert 0 < sum(len(r.scores) for r in skipped) < sum(len(r.scores) for r in full)
    assert all((r.scores >= threshold).all() for r in skipped)

    predictor.cfg.SEVERSTAL.SCORE_THRESHOLDS = [threshold] * 4
    expected = [make_record(d, [threshold] * 4, [0] * 4) for d in predictor.detect(images)]  # the full floor
    records = predictor.predict(images)
    assert sum(len(r["defects"]) for r in records) > 0
    for record, reference in zip(records, expected):
        assert [(d["class_id"], d["bbox"]) for d in record["defects"]] == \
               [(d["class_id"], d["bbox"]) for d in reference["defects"]]
        assert [d["score"] for d in record["defects"]] == pytest.approx([d["score"] for d in reference["defects"]])
        for class_id, rle in reference["classes"].items():
            mine, theirs = rle_to_mask(record["classes"][class_id]), rle_to_mask(rle)
            assert (mine == theirs).mean() > 0.9999

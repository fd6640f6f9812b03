"""severstal.viz.plots: every figure function writes a readable, non-empty PNG of a sensible size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from severstal.data.rle import mask_to_rle
from severstal.model.evaluation import ScoredImage
from severstal.viz import plots
from severstal.viz import stats as data_stats


def _png(path, min_width=300):
    assert path.is_file() and path.stat().st_size > 2000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_width
        return image.size


@pytest.fixture(scope="module")
def synthetic(synthetic_data):
    return data_stats.load_dataset(synthetic_data)


@pytest.fixture(scope="module")
def stats(synthetic):
    return data_stats.mask_statistics(synthetic.masks)


def test_class_balance_and_classes_per_image(tmp_path):
    counts = pd.DataFrame({"all": [897, 247, 5150, 801], "known": [630, 175, 3479, 624]}, index=[1, 2, 3, 4])
    _png(plots.plot_class_balance(counts, tmp_path / "balance.png"))
    per_count = pd.Series([5902, 6239, 425, 2, 0], index=range(5))
    _png(plots.plot_classes_per_image(per_count, tmp_path / "per_count.png"))


def test_area_instance_and_position_figures(synthetic, stats, tmp_path):
    _png(plots.plot_defect_areas(stats, tmp_path / "areas.png"))
    _png(plots.plot_instances_per_image(data_stats.image_statistics(stats), stats, tmp_path / "instances.png"))
    _png(plots.plot_defect_positions(data_stats.defect_heatmaps(synthetic.masks), tmp_path / "positions.png"))


def test_overlays_of_examples_keep_the_image_aspect(synthetic, tmp_path):
    examples = data_stats.pick_examples(synthetic, per_class=1)
    path = plots.plot_examples(examples, tmp_path / "examples.png", "Examples", ncols=1, panel_width=8.0)
    width, height = _png(path)
    assert height > 4 * width * 256 / 1600  # four panels, none squashed
    _png(plots.plot_examples(data_stats.pick_defect_free(synthetic, 2), tmp_path / "free.png", "Defect-free"))


def test_answers_and_gallery_draw_masks_and_boxes(synthetic, tmp_path):
    example = data_stats.pick_examples(synthetic, per_class=1)[3][0]
    mask = np.zeros((256, 1600), np.uint8)
    mask[50:120, 200:500] = 1
    answer = {"height": 256, "width": 1600, "classes": {"1": "", "2": "", "3": mask_to_rle(mask), "4": ""},
              "defects": [{"class_id": 3, "score": 0.9, "bbox": [200, 50, 500, 120], "area": 21000,
                           "rle": mask_to_rle(mask)}]}
    _png(plots.plot_answers({example.image_id: answer}, {example.image_id: example.path}, tmp_path / "answers.png"))
    scored = [ScoredImage(example.image_id, example.path, 0.4, example.classes, answer)]
    _png(plots.plot_prediction_gallery(scored, tmp_path / "gallery.png", "Worst"))


def test_training_curves_with_and_without_evaluations(tmp_path):
    losses = pd.DataFrame({"iteration": [19, 39, 59], "total_loss": [2.5, 1.8, 1.2], "loss_cls": [0.9, 0.6, 0.4],
                           "loss_mask": [0.7, 0.5, 0.3]})
    _png(plots.plot_training_curves(losses, tmp_path / "losses.png"))
    evaluated = pd.concat([losses, pd.DataFrame({"iteration": [59], "dice/mean_dice": [0.7],
                                                 "dice/empty_baseline": [0.5], "dice/dice_class_3": [0.6]})])
    width_one = _png(tmp_path / "losses.png")[0]
    assert _png(plots.plot_training_curves(evaluated, tmp_path / "both.png"))[0] > width_one  # a second panel


def test_latency_and_pipeline(tmp_path):
    rows = [{"method": "PyTorch, bare model", "p50": 0.3, "p95": 0.35, "images_per_s": 3.2},
            {"method": "TorchServe, HTTP", "p50": 0.4, "p95": 0.6}]
    _png(plots.plot_latency(rows, tmp_path / "latency.png"))
    _png(plots.plot_pipeline(tmp_path / "pipeline.png"), min_width=1000)


def test_palette_png_is_smaller_than_full_colour(tmp_path):
    import matplotlib.pyplot as plt

    image = np.random.default_rng(0).integers(0, 255, (256, 1600, 3), dtype=np.uint8)
    sizes = []
    for palette in (False, True):
        fig, ax = plt.subplots(figsize=(8, 1.5))
        ax.imshow(image)
        path = plots.save_figure(fig, tmp_path / f"p{palette}.png", palette=palette)
        sizes.append(path.stat().st_size)
    assert sizes[1] < sizes[0]
    assert not list(tmp_path.glob(".*tmp*"))

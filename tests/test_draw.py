"""severstal.viz.draw: the PNGs are read back and show what they say: masks in their class colour where the mask
is and nowhere else, boxes' edges where the box is, one panel per image.

The overlays are drawn on uniform grey images, so every coloured pixel of a panel comes from a mask or a box, and
each panel is found as a grey rectangle of the PNG.
"""

from __future__ import annotations

import cv2
import matplotlib.colors
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from severstal.data.rle import mask_to_rle
from severstal.model.evaluation import ScoredImage
from severstal.viz import draw
from severstal.viz import stats as data_stats
from severstal.viz.stats import Example

GREY = 128
ALPHA = 0.45  # overlay_masks' default


def colour(class_id: int) -> np.ndarray:
    return np.array(matplotlib.colors.to_rgb(draw.CLASS_COLOURS[class_id])) * 255


def blended(class_id: int) -> np.ndarray:
    """A class's mask colour over the grey images."""
    return (1 - ALPHA) * GREY + ALPHA * colour(class_id)


def rect_mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((256, 1600), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _png(path, min_width=300):
    assert path.is_file() and path.stat().st_size > 2000
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_width
        return image.size


def _rgb(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def _near(rgb: np.ndarray, target, tol: float) -> np.ndarray:
    return np.abs(rgb - np.asarray(target)).max(axis=2) <= tol


class Panel:
    """Where a 256 x 1600 image was drawn in a PNG: maps image pixels to PNG pixels."""

    def __init__(self, left: int, top: int, width: int, height: int):
        self.left, self.top, self.width, self.height = left, top, width, height

    def col(self, x: float) -> int:
        return round(self.left + x * self.width / 1600)

    def row(self, y: float) -> int:
        return round(self.top + y * self.height / 256)

    def crop(self, rgb: np.ndarray) -> np.ndarray:
        return rgb[self.top : self.top + self.height, self.left : self.left + self.width]


def panels(rgb: np.ndarray) -> list[Panel]:
    """The grey images of a PNG, row by row: the large connected areas of grey that no other one holds (a box's
    outline cuts a grey area out of its panel)."""
    count, _, boxes, _ = cv2.connectedComponentsWithStats(_near(rgb, (GREY,) * 3, 2).astype(np.uint8))
    large = [tuple(box[:4]) for box in boxes[1:count] if box[4] > 0.02 * rgb.shape[0] * rgb.shape[1]]

    def holds(outer, inner) -> bool:
        return outer != inner and outer[0] <= inner[0] and outer[1] <= inner[1] and \
            inner[0] + inner[2] <= outer[0] + outer[2] and inner[1] + inner[3] <= outer[1] + outer[3]

    found = [Panel(*box) for box in large if not any(holds(other, box) for other in large)]
    return sorted(found, key=lambda p: (p.top, p.left))


def assert_mask_drawn(rgb: np.ndarray, panel: Panel, class_id: int, y0: int, y1: int, x0: int, x1: int) -> None:
    """The class's mask colour fills the mapped rectangle and appears nowhere else in the panel."""
    inside = np.zeros(rgb.shape[:2], bool)
    inside[panel.row(y0) - 2 : panel.row(y1) + 2, panel.col(x0) - 2 : panel.col(x1) + 2] = True
    tinted = _near(rgb, blended(class_id), 8)
    in_panel = np.zeros_like(tinted)
    in_panel[panel.top : panel.top + panel.height, panel.left : panel.left + panel.width] = True
    assert not (tinted & in_panel & ~inside).any(), "mask colour outside the mask"
    core = tinted[panel.row(y0) + 2 : panel.row(y1) - 2, panel.col(x0) + 2 : panel.col(x1) - 2]
    assert core.mean() > 0.9, "the mask is not filled with its colour"


def assert_box_drawn(rgb: np.ndarray, panel: Panel, class_id: int, box) -> None:
    """Each edge of the box is a line of the class colour at its place; inside the box, off the mask, is grey."""
    x0, y0, x1, y1 = box
    pure = _near(rgb, colour(class_id), 30)
    c0, c1, r0, r1 = panel.col(x0), panel.col(x1), panel.row(y0), panel.row(y1)
    top, bottom = pure[r0 - 2 : r0 + 3, c0 + 5 : c1 - 5], pure[r1 - 2 : r1 + 3, c0 + 5 : c1 - 5]
    left, right = pure[r0 + 5 : r1 - 5, c0 - 2 : c0 + 3], pure[r0 + 5 : r1 - 5, c1 - 2 : c1 + 3]
    for edge in (top.any(axis=0), bottom.any(axis=0), left.any(axis=1), right.any(axis=1)):
        assert edge.mean() > 0.95, "a box edge is missing"
    assert not pure[r0 + 5 : r1 - 5, c1 - 40 : c1 - 5].any(), "the box is filled"


@pytest.fixture(scope="module")
def synthetic(synthetic_data):
    return data_stats.load_dataset(synthetic_data)


@pytest.fixture(scope="module")
def stats(synthetic):
    return data_stats.mask_statistics(synthetic.masks)


@pytest.fixture
def grey_image(tmp_path):
    path = tmp_path / "grey.png"
    cv2.imwrite(str(path), np.full((256, 1600, 3), GREY, np.uint8))
    return path


def test_overlay_masks_tints_the_mask_outlines_it_and_leaves_the_rest(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (256, 1600, 3), dtype=np.uint8)
    out = draw.overlay_masks(image, {2: rect_mask(10, 60, 100, 300), 4: np.zeros((256, 1600), bool)})
    rgb = image[:, :, ::-1].astype(float)
    outside = ~rect_mask(10, 60, 100, 300).astype(bool)
    assert (out[outside] == image[:, :, ::-1][outside]).all()
    interior = (slice(11, 59), slice(101, 299))
    assert np.abs(out[interior] - ((1 - ALPHA) * rgb[interior] + ALPHA * colour(2))).max() <= 1
    assert (np.abs(out[10, 100:300] - colour(2)) <= 1).all() and (np.abs(out[10:60, 299] - colour(2)) <= 1).all()


def test_class_balance_and_classes_per_image(tmp_path):
    counts = pd.DataFrame({"all": [897, 247, 5150, 801], "known": [630, 175, 3479, 624]}, index=[1, 2, 3, 4])
    rgb = _rgb(draw.plot_class_balance(counts, tmp_path / "balance.png"))
    for class_id in (1, 2, 3, 4):  # each class's bars in its colour
        assert _near(rgb, colour(class_id), 3).sum() > 100, class_id
    per_count = pd.Series([5902, 6239, 425, 2, 0], index=range(5))
    _png(draw.plot_classes_per_image(per_count, tmp_path / "per_count.png"))


def test_area_instance_and_position_figures(synthetic, stats, tmp_path):
    rgb = _rgb(draw.plot_defect_areas(stats, tmp_path / "areas.png"))
    for class_id in sorted(set(stats["ClassId"])):  # one histogram line per class present
        assert _near(rgb, colour(class_id), 10).sum() > 50, class_id
    _png(draw.plot_instances_per_image(data_stats.image_statistics(stats), stats, tmp_path / "instances.png"))
    _png(draw.plot_defect_positions(data_stats.defect_heatmaps(synthetic.masks), tmp_path / "positions.png"))


def test_examples_draw_one_panel_per_image_with_its_mask_in_place(grey_image, tmp_path):
    rects = {1: (20, 90, 100, 400), 2: (100, 250, 700, 760), 4: (30, 200, 1200, 1550)}
    examples = {c: [Example(f"grey{c}", grey_image, {c: mask_to_rle(rect_mask(*r))})] for c, r in rects.items()}
    path = draw.plot_examples(examples, tmp_path / "examples.png", "Examples", ncols=1, panel_width=8.0)
    rgb = _rgb(path)
    found = panels(rgb)
    assert len(found) == 3
    for panel, (class_id, rect) in zip(found, rects.items()):
        assert panel.height == pytest.approx(panel.width * 256 / 1600, abs=2)  # the image's aspect, not squashed
        assert_mask_drawn(rgb, panel, class_id, *rect)
        others = [c for c in rects if c != class_id]
        assert not any(_near(panel.crop(rgb), blended(c), 8).any() for c in others)
    free = [Example(f"free{k}", grey_image, {}) for k in range(4)]
    rgb = _rgb(draw.plot_examples(free, tmp_path / "free.png", "Defect-free"))
    assert len(panels(rgb)) == 4
    assert all(_near(p.crop(rgb), (GREY,) * 3, 2).all() for p in panels(rgb))  # nothing drawn on them


def test_answers_and_gallery_draw_masks_and_boxes(grey_image, tmp_path):
    mask = rect_mask(50, 120, 200, 500)
    box = (150, 30, 700, 160)  # wider than the mask: its edges are the box's own
    answer = {"height": 256, "width": 1600, "classes": {"1": "", "2": "", "3": mask_to_rle(mask), "4": ""},
              "defects": [{"class_id": 3, "score": 0.9, "bbox": list(box), "area": int(mask.sum()),
                           "rle": mask_to_rle(mask)}]}
    rgb = _rgb(draw.plot_answers({"grey.png": answer}, {"grey.png": grey_image}, tmp_path / "answers.png"))
    (panel,) = panels(rgb)
    assert_mask_drawn(rgb, panel, 3, 50, 120, 200, 500)
    assert_box_drawn(rgb, panel, 3, box)

    truth = {1: mask_to_rle(rect_mask(150, 230, 900, 1300))}
    scored = [ScoredImage("grey.png", grey_image, 0.4, truth, answer)]
    rgb = _rgb(draw.plot_prediction_gallery(scored, tmp_path / "gallery.png", "Worst"))
    left, right = panels(rgb)
    assert left.top == right.top and left.left < right.left  # truth beside prediction
    assert_mask_drawn(rgb, left, 1, 150, 230, 900, 1300)
    assert not _near(left.crop(rgb), blended(3), 8).any() and not _near(left.crop(rgb), colour(3), 30).any()
    assert_mask_drawn(rgb, right, 3, 50, 120, 200, 500)
    assert_box_drawn(rgb, right, 3, box)
    assert not _near(right.crop(rgb), blended(1), 8).any()


def test_overlay_writer_draws_a_record_over_its_image_and_skips_unreadable_ones(grey_image, tmp_path):
    record = {"classes": {"1": "", "2": mask_to_rle(rect_mask(60, 200, 300, 900)), "3": "", "4": ""}, "defects": []}
    write = draw.overlay_writer(tmp_path / "overlays")
    path = write(grey_image, record)
    assert path == tmp_path / "overlays" / "grey.png"
    rgb = _rgb(path)
    (panel,) = panels(rgb)
    assert_mask_drawn(rgb, panel, 2, 60, 200, 300, 900)
    assert write(tmp_path / "broken.jpg", {**record, "error": "broken.jpg: not an image"}) is None
    assert [p.name for p in (tmp_path / "overlays").iterdir()] == ["grey.png"]


def test_overlay_writer_stops_after_its_limit(grey_image, tmp_path):
    record = {"classes": {"1": "", "2": "", "3": "", "4": ""}, "defects": []}
    write = draw.overlay_writer(tmp_path / "overlays", limit=1)
    assert write(grey_image, record) == tmp_path / "overlays" / "grey.png"
    assert write(grey_image, record) is None
    assert len(list((tmp_path / "overlays").iterdir())) == 1


def test_evaluation_figures_are_the_dice_bars_and_the_curves_after_tuning(tmp_path):
    results = {"mean_dice": 0.9, "empty_baseline": 0.85, "dice_per_class": {"1": 0.9, "2": 1.0, "3": 0.8, "4": 0.9}}
    written = draw.plot_evaluation(results, tmp_path / "untuned")
    assert [p.name for p in written] == ["dice_per_class.png"]
    rgb = _rgb(written[0])
    for class_id in (1, 2, 3, 4):
        assert _near(rgb, colour(class_id), 3).sum() > 500, class_id
    curves = {"min_areas": [0, 100, 200], "dice": {str(c): {"0.5": [0.5, 0.6, 0.7], "0.9": [0.4, 0.5, 0.5]}
                                                   for c in (1, 2, 3, 4)}}
    written = draw.plot_evaluation({**results, "threshold_curves": curves}, tmp_path / "tuned")
    assert [p.name for p in written] == ["dice_per_class.png", "threshold_curves.png"]
    _png(written[1])


def test_training_curves_with_and_without_evaluations(tmp_path):
    losses = pd.DataFrame({"iteration": [19, 39, 59], "total_loss": [2.5, 1.8, 1.2], "loss_cls": [0.9, 0.6, 0.4],
                           "loss_mask": [0.7, 0.5, 0.3]})
    _png(draw.plot_training_curves(losses, tmp_path / "losses.png"))
    evaluated = pd.concat([losses, pd.DataFrame({"iteration": [59], "dice/mean_dice": [0.7],
                                                 "dice/empty_baseline": [0.5], "dice/dice_class_3": [0.6]})])
    width_one = _png(tmp_path / "losses.png")[0]
    rgb = _rgb(draw.plot_training_curves(evaluated, tmp_path / "both.png"))
    assert rgb.shape[1] > width_one  # a second panel
    assert _near(rgb, colour(3), 10).sum() > 20  # class 3's Dice in its colour


def test_latency_and_pipeline(tmp_path):
    rows = [{"method": "PyTorch, bare model", "p50": 0.3, "p95": 0.35, "images_per_s": 3.2},
            {"method": "TorchServe, HTTP", "p50": 0.4, "p95": 0.6}]
    _png(draw.plot_latency(rows, tmp_path / "latency.png"))
    _png(draw.plot_pipeline(tmp_path / "pipeline.png"), min_width=1000)


def test_palette_png_is_smaller_than_full_colour(tmp_path):
    import matplotlib.pyplot as plt

    image = np.random.default_rng(0).integers(0, 255, (256, 1600, 3), dtype=np.uint8)
    sizes = []
    for palette in (False, True):
        fig, ax = plt.subplots(figsize=(8, 1.5))
        ax.imshow(image)
        path = draw.save_figure(fig, tmp_path / f"p{palette}.png", palette=palette)
        sizes.append(path.stat().st_size)
    assert sizes[1] < sizes[0]
    assert not list(tmp_path.glob(".*tmp*"))

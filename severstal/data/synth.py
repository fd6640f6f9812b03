"""Synthetic Severstal-like data, so that the whole pipeline runs without the Kaggle download.

``make_synthetic_dataset`` writes Kaggle's layout: ``train.csv`` in the later format
(``ImageId,ClassId,EncodedPixels``, non-empty masks only) and ``train_images/<id>.jpg``, 1600 x 256 grey
steel stored as 3-channel JPEG. Each defect is first drawn into a per-class binary mask and the image is
then darkened or brightened through that mask, so the labels are exactly the drawn defects.

The classes keep the character of the real ones:

- 1: clusters of small pits or spots;
- 2: thin vertical cracks;
- 3: long, mostly horizontal scratches and irregular patches (the most common class);
- 4: large dark blobs.

Everything is deterministic by seed: each image has its own random stream spawned from the seed, and
its id is a bijection of (seed, index), so a train set and a held-out set made with different seeds
never share an image id.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
from tqdm import tqdm

from severstal import CLASS_IDS, IMAGE_HEIGHT, IMAGE_WIDTH
from severstal.data.rle import mask_to_rle
from severstal.files import TRAIN_CSV, TRAIN_IMAGES, write_bytes_atomic

logger = logging.getLogger(__name__)

DEFECT_FREE_FRACTION = 0.45
"""Share of images without any defect (the real train set: 5,902 / 12,568 = 0.47)."""

TWO_CLASS_FRACTION = 0.07
"""Share of defective images that carry a second class (real: 427 / 6,666 = 0.064)."""

CLASS_WEIGHTS = {1: 0.17, 2: 0.12, 3: 0.50, 4: 0.21}
"""Frequency of each class among defective images. The real shares (0.13 / 0.03 / 0.73 / 0.11) are
flattened so that a few hundred images still hold enough examples of class 2 to learn it."""

EDGE_PROBABILITY = 0.15
"""Chance that an image shows the strip's edge with dark background beside it, as real images often do."""

JPEG_QUALITY = 90

# An image id is 9 hex digits, a bijection of (seed, index) packed into 36 bits.
_SEED_BITS, _INDEX_BITS = 16, 20
MAX_SEED = 2**_SEED_BITS - 1
MAX_IMAGES = 2**_INDEX_BITS
_ID_MASK = (1 << (_SEED_BITS + _INDEX_BITS)) - 1
_ID_OFFSET = 0x5A3C96E1D  # keeps (seed 0, index 0) away from the id 000000000
_ID_MULTIPLIER = 0x9E3779B1  # odd, so multiplying modulo 2**36 is a bijection
_WINDOW_GAP = 40
"""Pixels kept free between the windows of different classes in one image, so their masks never touch."""
_STRIP_MARGIN = 12
"""Pixels kept free between a defect and the strip's edge."""


class RealShapes:
    """Real defect masks to draw synthetic defects with: their outlines and places on the strip are real.

    Args:
        masks: a masks table (``ImageId, ClassId, EncodedPixels``, e.g. the real sample's 4,908 partial masks).
        exclude: ImageIds whose masks are not used (e.g. every image a model is later scored on, so that no
            held-out shape leaks into pretraining).
    """

    def __init__(self, masks, exclude: Sequence[str] = ()):
        kept = masks[~masks["ImageId"].isin(set(exclude))]
        self.rles = {c: list(kept.loc[kept["ClassId"] == c, "EncodedPixels"]) for c in CLASS_IDS}
        empty = [c for c, rles in self.rles.items() if not rles]
        if empty:
            raise ValueError(f"no real mask of class(es) {empty} to draw synthetic defects with")

    def sample(self, class_id: int, rng: np.random.Generator) -> np.ndarray:
        """A random real mask of ``class_id``: ``(256, 1600)`` uint8 0/1, flipped left-right half the time."""
        from severstal.data.rle import rle_to_mask

        rles = self.rles[class_id]
        mask = rle_to_mask(rles[int(rng.integers(len(rles)))]).astype(np.uint8)
        return np.ascontiguousarray(mask[:, ::-1]) if rng.random() < 0.5 else mask


def make_synthetic_dataset(out_dir: str | os.PathLike, n_images: int, seed: int = 0,
                           shapes: RealShapes | None = None) -> dict:
    """Write a synthetic dataset in Kaggle's layout (``train.csv`` + ``train_images/``).

    Call it twice with different seeds for a training set and a held-out set: their image ids never
    collide. Files are written atomically; ``train.csv`` is written last.

    Args:
        out_dir: folder to create or reuse. Its ``train_images/`` must not hold images of another
            dataset, since the later CSV format lists defect-free images only through the folder.
        n_images: number of images, 1 to ``MAX_IMAGES``.
        seed: 0 to ``MAX_SEED``; the same seed gives byte-identical files.
        shapes: draw each defect's mask from these real masks (its outline and place) instead of the class's
            drawing; the grey-level change stays synthetic.

    Returns:
        Summary dict: ``out_dir``, ``csv``, ``images_dir``, ``seed``, ``images``, ``defect_free``,
        ``masks_per_class`` (class id -> number of masks) and ``two_class_images``.
    """
    _check_range("n_images", n_images, 1, MAX_IMAGES)
    _check_range("seed", seed, 0, MAX_SEED)
    out = Path(out_dir)
    images_dir = out / TRAIN_IMAGES
    image_ids = [f"{_image_id(seed, index)}.jpg" for index in range(n_images)]
    _check_no_foreign_images(images_dir, image_ids)
    images_dir.mkdir(parents=True, exist_ok=True)

    root = np.random.SeedSequence(seed)
    plan = _plan_classes(n_images, np.random.default_rng(root))
    rows = []
    for image_id, class_ids, stream in zip(
        tqdm(image_ids, desc="synth", unit="img"), plan, root.spawn(n_images)
    ):
        grey, masks = _render(class_ids, np.random.default_rng(stream), shapes)
        bgr = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)  # 3 channels of grey, like the real images
        ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode {image_id} as JPEG")
        write_bytes_atomic(images_dir / image_id, jpeg.tobytes())
        rows.extend((image_id, class_id, mask_to_rle(masks[class_id])) for class_id in class_ids)

    rows.sort()
    csv_text = "ImageId,ClassId,EncodedPixels\n" + "".join(f"{i},{c},{r}\n" for i, c, r in rows)
    write_bytes_atomic(out / TRAIN_CSV, csv_text.encode("ascii"))

    summary = {
        "out_dir": str(out),
        "csv": str(out / TRAIN_CSV),
        "images_dir": str(images_dir),
        "seed": seed,
        "images": n_images,
        "defect_free": sum(not classes for classes in plan),
        "masks_per_class": {c: sum(c in classes for classes in plan) for c in CLASS_IDS},
        "two_class_images": sum(len(classes) == 2 for classes in plan),
    }
    logger.info("wrote %d synthetic images (%d defect-free) to %s", n_images, summary["defect_free"], out)
    return summary


def make_synthetic_image(class_ids: Sequence[int] = (), seed: int = 0) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """One synthetic image and its masks, in memory (before JPEG compression).

    Args:
        class_ids: defect classes to draw, distinct values of ``CLASS_IDS``; empty for a clean image.
        seed: seed of the image's random stream.

    Returns:
        ``(image, masks)``: image ``(256, 1600, 3)`` uint8 BGR with equal channels, as ``cv2.imread``
        gives; masks maps each requested class id to a ``(256, 1600)`` uint8 mask of 0 and 1.
    """
    if not set(class_ids) <= set(CLASS_IDS) or len(set(class_ids)) != len(class_ids):
        raise ValueError(f"class_ids must be distinct values of {CLASS_IDS}, got {tuple(class_ids)}")
    grey, masks = _render(tuple(class_ids), np.random.default_rng(seed))
    return cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), masks


# Planning ------------------------------------------------------------------------------------------


def _plan_classes(n_images: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Classes of each image: exact shares of defect-free and per-class images, in random order.

    Apportioning the counts (instead of drawing each image independently) guarantees every class
    its share even in a small dataset.
    """
    n_defective = round(n_images * (1 - DEFECT_FREE_FRACTION))
    n_two = round(n_defective * TWO_CLASS_FRACTION)
    weights = np.array([CLASS_WEIGHTS[c] for c in CLASS_IDS])
    primary = np.repeat(CLASS_IDS, _apportion(n_defective, weights))
    plan: list[tuple[int, ...]] = [(int(c),) for c in primary]
    for i in rng.choice(n_defective, size=n_two, replace=False):
        others = weights * (np.array(CLASS_IDS) != plan[i][0])
        plan[i] += (int(rng.choice(CLASS_IDS, p=others / others.sum())),)
    plan += [()] * (n_images - n_defective)
    order = rng.permutation(n_images)
    return [plan[i] for i in order]


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integer parts proportional to ``weights`` (largest remainder method)."""
    exact = total * weights / weights.sum()
    parts = np.floor(exact).astype(int)
    parts[np.argsort(parts - exact, kind="stable")[: total - parts.sum()]] += 1
    return parts


def _image_id(seed: int, index: int) -> str:
    """9 hex digits, a scrambled bijection of (seed, index): random-looking and never colliding."""
    x = ((seed << _INDEX_BITS) | index) ^ _ID_OFFSET
    for _ in range(3):
        x = (x * _ID_MULTIPLIER) & _ID_MASK
        x ^= x >> 17
    return f"{x:09x}"


# Rendering -----------------------------------------------------------------------------------------


def _render(class_ids: tuple[int, ...], rng: np.random.Generator,
            shapes: RealShapes | None = None) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Draw a steel background and the defects of ``class_ids``, each class in its own window (with ``shapes``:
    real masks where they are, on the steel, a later class losing the pixels of an earlier one).

    Returns:
        ``(grey, masks)``: grey ``(256, 1600)`` uint8 and ``{class_id: (256, 1600) uint8 0/1}``.
    """
    image, (strip_lo, strip_hi) = _steel_background(rng)
    # Defects vary in intensity inside too, like real ones, but never fade away.
    roughness = np.clip(1.0 + 0.3 * _smooth_noise(rng, (24, 150)), 0.6, 1.4)
    masks = {}
    windows = _class_windows(strip_lo, strip_hi, len(class_ids), rng)
    taken = np.zeros((IMAGE_HEIGHT, IMAGE_WIDTH), bool)
    for class_id, (x0, x1) in zip(class_ids, windows):
        style = _STYLES[class_id]
        mask = np.zeros((IMAGE_HEIGHT, IMAGE_WIDTH), np.uint8)
        if shapes is None:
            mask[:, x0:x1] = style.draw(rng, x1 - x0)
        else:
            mask[:, strip_lo:strip_hi] = shapes.sample(class_id, rng)[:, strip_lo:strip_hi]
            mask[taken] = 0
            taken |= mask.astype(bool)
            if not mask.any():  # the real shape lay off the strip: draw the class's own instead
                mask[:, x0:x1] = style.draw(rng, x1 - x0) * ~taken[:, x0:x1]
        sign = 1.0 if rng.random() < style.bright_probability else -1.0
        image += (sign * rng.uniform(*style.contrast)) * roughness * mask
        masks[class_id] = mask
    return np.clip(image, 0, 255).round().astype(np.uint8), masks


def _steel_background(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """Grey steel: a base level, slow brightness variation, horizontal rolling streaks, column gain
    of the line-scan camera, pixel noise, and sometimes the strip's edge with dark background.

    Returns:
        ``(image, (strip_lo, strip_hi))``: image ``(256, 1600)`` float32 grey levels, and the columns
        where the steel is (defects go there).
    """
    image = np.full((IMAGE_HEIGHT, IMAGE_WIDTH), rng.uniform(80, 145), np.float32)
    image += rng.uniform(4, 10) * _smooth_noise(rng, (3, 12))
    # Streaks: thin along y, stretched along x, fading in and out over a few hundred pixels.
    image += rng.uniform(3, 7) * _smooth_noise(rng, (IMAGE_HEIGHT // 2, 16))
    image += rng.uniform(2, 4) * _smooth_noise(rng, (IMAGE_HEIGHT, 60))
    image += rng.uniform(1, 3) * rng.standard_normal((1, IMAGE_WIDTH), np.float32)
    image += rng.uniform(3, 6) * rng.standard_normal(image.shape, np.float32)

    strip_lo, strip_hi = 0, IMAGE_WIDTH
    if rng.random() < EDGE_PROBABILITY:
        width = int(rng.integers(60, 500))
        background = slice(0, width) if rng.random() < 0.5 else slice(IMAGE_WIDTH - width, IMAGE_WIDTH)
        image[:, background] = rng.uniform(3, 15) + 2 * rng.standard_normal((IMAGE_HEIGHT, width), np.float32)
        edge = width if background.start == 0 else IMAGE_WIDTH - width
        image[:, max(edge - 3, 0) : edge + 3] += rng.uniform(30, 70)  # the bright rim of the strip's edge
        strip_lo, strip_hi = (width, IMAGE_WIDTH) if background.start == 0 else (0, IMAGE_WIDTH - width)
    return image, (strip_lo + _STRIP_MARGIN, strip_hi - _STRIP_MARGIN)


def _smooth_noise(rng: np.random.Generator, grid: tuple[int, int]) -> np.ndarray:
    """Unit-variance noise on a coarse ``grid`` (rows, columns), smoothly upsampled to the image.

    Returns:
        ``(256, 1600)`` float32.
    """
    coarse = rng.standard_normal(grid, np.float32)
    return cv2.resize(coarse, (IMAGE_WIDTH, IMAGE_HEIGHT), interpolation=cv2.INTER_CUBIC)


def _class_windows(lo: int, hi: int, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Split columns ``[lo, hi)`` into ``n`` disjoint windows of jittered width, in random order."""
    step = (hi - lo) / max(n, 1)
    cuts = [lo] + [int(lo + step * (k + rng.uniform(-0.15, 0.15))) for k in range(1, n)] + [hi]
    windows = [
        (cuts[k] + (_WINDOW_GAP // 2 if k else 0), cuts[k + 1] - (_WINDOW_GAP // 2 if k < n - 1 else 0))
        for k in range(n)
    ]
    return [windows[k] for k in rng.permutation(n)]


# The four defect classes. Each draws into a fresh (256, width) uint8 canvas; OpenCV clips at its border.


def _draw_pits(rng: np.random.Generator, width: int) -> np.ndarray:
    """Class 1: one or two clusters of small round or oval pits."""
    canvas = np.zeros((IMAGE_HEIGHT, width), np.uint8)
    for _ in range(rng.integers(1, 3)):
        cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(40, IMAGE_HEIGHT - 40)
        spread = rng.uniform(20, 80, size=2)
        for k in range(rng.integers(3, 9)):
            # The first pit sits at the centre so that a cluster is never clipped away entirely.
            dx, dy = (0.0, 0.0) if k == 0 else rng.normal(0, spread)
            axes = (int(rng.integers(5, 14)), int(rng.integers(4, 10)))
            centre = (int(cx + dx), int(cy + dy))
            cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return canvas


def _draw_cracks(rng: np.random.Generator, width: int) -> np.ndarray:
    """Class 2: one to three thin, slightly wandering vertical cracks, often side by side."""
    canvas = np.zeros((IMAGE_HEIGHT, width), np.uint8)
    x = rng.uniform(0.1, 0.9) * width
    for _ in range(rng.integers(1, 4)):
        top = rng.uniform(-20, 120)
        ys = np.arange(top, top + rng.uniform(90, 300), 16)
        xs = x + np.cumsum(rng.normal(0, 1.5, ys.size))
        points = np.stack([xs, ys], axis=1).round().astype(np.int32)
        cv2.polylines(canvas, [points], False, 1, int(rng.integers(5, 12)))
        x += rng.choice([-1, 1]) * rng.uniform(15, 60)
    return canvas


def _draw_scratches_and_patches(rng: np.random.Generator, width: int) -> np.ndarray:
    """Class 3: long, mostly horizontal scratches, irregular elongated patches, or both."""
    canvas = np.zeros((IMAGE_HEIGHT, width), np.uint8)
    kind = rng.choice(["scratches", "patches", "both"], p=[0.45, 0.4, 0.15])
    if kind != "patches":
        for _ in range(rng.integers(1, 5)):
            length = min(rng.uniform(150, 900), 0.9 * width)
            x0 = rng.uniform(0, width - length)
            xs = np.linspace(x0, x0 + length, max(int(length // 50), 2))
            ys = rng.uniform(10, IMAGE_HEIGHT - 10) + np.linspace(0, rng.uniform(-25, 25), xs.size)
            ys += rng.normal(0, 1.5, xs.size)
            points = np.stack([xs, ys], axis=1).round().astype(np.int32)
            cv2.polylines(canvas, [points], False, 1, int(rng.integers(4, 10)))
    if kind != "scratches":
        for _ in range(rng.integers(1, 3)):
            box_w, box_h = min(rng.uniform(80, 350), 0.9 * width), rng.uniform(20, 90)
            x0, y0 = rng.uniform(0, width - box_w), rng.uniform(0, IMAGE_HEIGHT - box_h)
            for _ in range(rng.integers(3, 9)):
                centre = (int(x0 + rng.uniform(0, box_w)), int(y0 + rng.uniform(0, box_h)))
                axes = (int(rng.uniform(20, 90)), int(rng.uniform(6, 25)))
                cv2.ellipse(canvas, centre, axes, float(rng.uniform(-10, 10)), 0, 360, 1, -1)
    return canvas


def _draw_blobs(rng: np.random.Generator, width: int) -> np.ndarray:
    """Class 4: one or two large blobs with ragged outlines."""
    canvas = np.zeros((IMAGE_HEIGHT, width), np.uint8)
    for _ in range(rng.integers(1, 3)):
        radii = np.array([min(rng.uniform(50, 160), 0.45 * width), rng.uniform(35, 100)])
        centre = np.array([rng.uniform(0.2, 0.8) * width, rng.uniform(40, IMAGE_HEIGHT - 40)])
        angles = np.linspace(0, 2 * np.pi, int(rng.integers(14, 26)), endpoint=False)
        ragged = rng.uniform(0.65, 1.2, angles.size)
        ragged = (ragged + np.roll(ragged, 1) + np.roll(ragged, -1)) / 3  # neighbouring vertices agree
        outline = centre + (ragged[:, None] * radii) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        cv2.fillPoly(canvas, [outline.round().astype(np.int32)], 1)
    return canvas


class _DefectStyle(NamedTuple):
    draw: Callable[[np.random.Generator, int], np.ndarray]
    contrast: tuple[float, float]
    """Range of the grey-level change through the mask."""
    bright_probability: float
    """Chance that the defect brightens instead of darkens."""


_STYLES = {
    1: _DefectStyle(_draw_pits, (45, 80), 0.3),
    2: _DefectStyle(_draw_cracks, (45, 80), 0.0),
    3: _DefectStyle(_draw_scratches_and_patches, (40, 80), 0.7),
    4: _DefectStyle(_draw_blobs, (45, 85), 0.0),
}


# Files ---------------------------------------------------------------------------------------------


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


def _check_no_foreign_images(images_dir: Path, image_ids: list[str]) -> None:
    """Refuse a folder that holds images of another dataset: they would read as defect-free."""
    foreign = sorted({p.name for p in images_dir.glob("*.jpg")} - set(image_ids))
    if foreign:
        raise ValueError(
            f"{images_dir} already holds {len(foreign)} images of another dataset (e.g. {foreign[0]}); "
            "choose an empty output folder"
        )

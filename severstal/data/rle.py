"""The competition's run-length encoding (RLE), and its translation to and from COCO RLE.

This module is the one owner of the Kaggle RLE; everything else in the package calls it.

The convention, stated once:

* An RLE string is space-separated ``start length`` pairs, e.g. ``"1 3 10 5"``.
* Starts are **1-indexed**: pixel 1 is the top-left pixel.
* Pixels are numbered **column-major** (Fortran order): top to bottom, then left to right, so pixel
  ``k`` (1-indexed) of an image of height ``H`` is at row ``(k - 1) % H``, column ``(k - 1) // H``.
* Severstal images are ``256 x 1600`` (height x width), 409,600 pixels.
* Starts ascend, runs have length >= 1, do not overlap and stay inside the image. An empty mask is an
  empty string (a missing value, ``None`` or NaN, reads the same).
* The canonical string (what :func:`mask_to_rle` writes) also merges runs that touch.

COCO's uncompressed RLE is also column-major run lengths (alternating background and foreground,
starting with background), so the translation from Kaggle RLE to COCO RLE works on the runs and never
builds a pixel array; pycocotools only compresses the counts into its string form.

Internally runs are kept as 0-indexed flat ``starts`` and ``lengths`` (``int64`` arrays), the form that
:func:`parse_rle` and :func:`parse_rles` return.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import cv2
import numpy as np
from pycocotools import mask as mask_util

from severstal import IMAGE_HEIGHT, IMAGE_WIDTH

SHAPE = (IMAGE_HEIGHT, IMAGE_WIDTH)
"""Height and width of a Severstal image, the default shape of every function here."""

_INTEGER = re.compile(r"[+-]?[0-9]+")
_LARGEST = 2**40  # any larger value is an error; the bound keeps int64 sums exact


class RLEError(ValueError):
    """A malformed RLE string; ``index`` is its position in a batch given to :func:`parse_rles`."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class Runs(NamedTuple):
    """The runs of a batch of masks, concatenated in input order.

    Attributes:
        starts: ``(R,) int64`` 0-indexed flat (column-major) start of each run.
        lengths: ``(R,) int64`` length of each run, >= 1.
        mask_index: ``(R,) int64`` position in the batch of the mask each run belongs to.
        offsets: ``(M + 1,) int64`` runs of mask ``i`` are ``offsets[i]:offsets[i + 1]``.
    """

    starts: np.ndarray
    lengths: np.ndarray
    mask_index: np.ndarray
    offsets: np.ndarray


def _as_text(rle: str | float | None) -> str:
    """The RLE as a string: ``None`` and NaN (pandas' missing value) become ``""``."""
    if rle is None or (isinstance(rle, float) and math.isnan(rle)):
        return ""
    if not isinstance(rle, str):
        raise RLEError(f"an RLE must be a string, got {type(rle).__name__}: {rle!r}")
    return rle


def _integers_fast(text: str) -> np.ndarray | None:
    """Parse single-space separated integers in C.

    Returns ``None`` for anything unusual (other spacing, non-integers), which :func:`_integers_strict`
    then parses or explains. Huge numbers saturate at the int64 limits: callers check the range.
    """
    if not text:
        return np.zeros(0, np.int64)
    try:
        values = np.fromstring(text, dtype=np.int64, sep=" ")
    except ValueError:
        return None
    # fromstring also accepts other whitespace: leave that to the strict parser.
    return values if values.size == text.count(" ") + 1 else None


def _integers_strict(text: str) -> np.ndarray:
    """Parse whitespace-separated integers token by token, saying which token is wrong."""
    tokens = text.split()
    for position, token in enumerate(tokens):
        if not _INTEGER.fullmatch(token):
            raise RLEError(f"value {token!r} (value {position + 1}) is not an integer")
    values = [int(token) for token in tokens]
    for position, value in enumerate(values):
        if abs(value) > _LARGEST:
            raise RLEError(f"value {value} (value {position + 1}) is far past the end of any image")
    return np.array(values, dtype=np.int64)


def _check_runs(starts: np.ndarray, lengths: np.ndarray, n_pixels: int, shape: tuple[int, int]) -> None:
    """Raise :class:`RLEError` naming the first rule that the runs of one mask break."""
    bad = np.flatnonzero(starts < 1)
    if bad.size:
        i = bad[0]
        raise RLEError(f"start {starts[i]} of run {i + 1} is < 1 (starts are 1-indexed)")
    bad = np.flatnonzero(lengths < 1)
    if bad.size:
        i = bad[0]
        raise RLEError(f"length {lengths[i]} of run {i + 1} (start {starts[i]}) is < 1")
    ends = starts + lengths - 1
    bad = np.flatnonzero(ends > n_pixels)
    if bad.size:
        i = bad[0]
        raise RLEError(
            f"run {i + 1} (start {starts[i]}, length {lengths[i]}) runs past the end of the image: "
            f"it ends at pixel {ends[i]} > {n_pixels} = {shape[0]} x {shape[1]}"
        )
    bad = np.flatnonzero(starts[1:] <= starts[:-1])
    if bad.size:
        i = bad[0] + 1
        raise RLEError(f"starts not ascending: run {i + 1} starts at {starts[i]}, run {i} at {starts[i - 1]}")
    bad = np.flatnonzero(starts[1:] <= ends[:-1])
    if bad.size:
        i = bad[0] + 1
        raise RLEError(
            f"runs overlap: run {i + 1} starts at {starts[i]}, inside run {i} ({starts[i - 1]}..{ends[i - 1]})"
        )


def parse_rle(rle: str | float | None, shape: tuple[int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Parse and validate one Kaggle RLE string.

    Args:
        rle: the RLE string; ``""``, ``None`` or NaN is an empty mask.
        shape: ``(height, width)`` of the image.

    Returns:
        ``(starts, lengths)``: ``(R,) int64`` arrays, starts 0-indexed in column-major order.

    Raises:
        RLEError: (a ``ValueError``) saying what is wrong: not a string, a non-integer value, an odd
            number of values, a start < 1, a length < 1, a run past the end of the image, starts not
            ascending or runs overlapping.
    """
    text = _as_text(rle)
    n_pixels = shape[0] * shape[1]
    values = _integers_fast(text)
    if values is None or (values.size and (values.min() < 0 or values.max() > n_pixels)):
        values = _integers_strict(text)
    if values.size % 2:
        raise RLEError(f"odd number of values ({values.size}): an RLE is a list of 'start length' pairs")
    starts, lengths = values[0::2], values[1::2]
    _check_runs(starts, lengths, n_pixels, shape)
    return starts - 1, lengths


def parse_rles(rles: Iterable[str | float | None], shape: tuple[int, int] = SHAPE) -> Runs:
    """Parse and validate a batch of Kaggle RLE strings at once.

    All checks run vectorised over the whole batch; only a mask that fails them is parsed again on its
    own, to say what is wrong with it.

    Args:
        rles: RLE strings (``""``, ``None`` or NaN for an empty mask).
        shape: ``(height, width)`` of the images.

    Returns:
        The concatenated :class:`Runs` of all masks.

    Raises:
        RLEError: as :func:`parse_rle`, with ``index`` set to the position of the first bad string.
    """
    texts = []
    for index, rle in enumerate(rles):
        try:
            texts.append(_as_text(rle))
        except RLEError as err:
            raise RLEError(str(err), index) from None
    n_pixels = shape[0] * shape[1]
    arrays = [_integers_fast(text) for text in texts]
    if any(values is None or values.size % 2 for values in arrays):
        return _parse_each(texts, shape)
    run_counts = np.fromiter((values.size // 2 for values in arrays), np.int64, len(arrays))
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum(run_counts, out=offsets[1:])
    mask_index = np.repeat(np.arange(len(arrays)), run_counts)
    values = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    out_of_range = (values < 0) | (values > n_pixels)
    starts, lengths = values[0::2], values[1::2]
    ends = starts + lengths
    bad_runs = out_of_range[0::2] | out_of_range[1::2] | (starts < 1) | (lengths < 1) | (ends - 1 > n_pixels)
    bad_runs[1:] |= (mask_index[1:] == mask_index[:-1]) & (starts[1:] < ends[:-1])
    if bad_runs.any():
        index = int(mask_index[np.flatnonzero(bad_runs)[0]])
        try:
            parse_rle(texts[index], shape)
        except RLEError as err:
            raise RLEError(str(err), index) from None
    return Runs(starts - 1, lengths, mask_index, offsets)


def _parse_each(texts: Sequence[str], shape: tuple[int, int]) -> Runs:
    """:func:`parse_rles` one string at a time: explains a bad string, or parses unusual spacing."""
    parsed = []
    for index, text in enumerate(texts):
        try:
            parsed.append(parse_rle(text, shape))
        except RLEError as err:
            raise RLEError(str(err), index) from None
    run_counts = np.array([starts.size for starts, _ in parsed], np.int64)
    offsets = np.zeros(len(parsed) + 1, np.int64)
    np.cumsum(run_counts, out=offsets[1:])
    return Runs(
        np.concatenate([s for s, _ in parsed]) if parsed else np.zeros(0, np.int64),
        np.concatenate([n for _, n in parsed]) if parsed else np.zeros(0, np.int64),
        np.repeat(np.arange(len(parsed)), run_counts),
        offsets,
    )


def rle_to_mask(rle: str | float | None, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """Decode a Kaggle RLE string into a binary mask.

    Args:
        rle: the RLE string; ``""``, ``None`` or NaN gives an empty mask.
        shape: ``(height, width)`` of the image.

    Returns:
        ``(height, width) uint8`` array of 0 and 1 (C-contiguous).

    Raises:
        RLEError: (a ``ValueError``) when the string is malformed, see :func:`parse_rle`.
    """
    starts, lengths = parse_rle(rle, shape)
    height, width = shape
    # Alternating background / foreground run lengths, written out by one np.repeat.
    counts = np.empty(2 * starts.size + 1, np.int64)
    counts[1:-1:2] = lengths
    counts[0:-1:2] = np.diff(starts, prepend=0) - np.r_[0, lengths[:-1]]
    counts[-1] = height * width - (starts[-1] + lengths[-1] if starts.size else 0)
    values = np.zeros(counts.size, np.uint8)
    values[1::2] = 1
    flat = np.repeat(values, counts)
    # OpenCV transposes uint8 faster than numpy's strided copy does.
    return cv2.transpose(flat.reshape(width, height))


def mask_to_rle(mask: np.ndarray) -> str:
    """Encode a binary mask as the canonical Kaggle RLE string.

    Args:
        mask: ``(height, width)`` array; any non-zero pixel is foreground. Severstal masks are
            ``256 x 1600``; the encoding is relative to the mask's own height.

    Returns:
        The RLE string (1-indexed column-major starts, touching runs merged); ``""`` for an empty mask.

    Raises:
        ValueError: if ``mask`` is not 2-dimensional.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-dimensional (height, width), got shape {mask.shape}")
    flat = cv2.transpose((mask != 0).view(np.uint8)).ravel().view(bool)
    edges = np.flatnonzero(np.diff(flat, prepend=False, append=False))
    pairs = np.empty(edges.size, np.int64)
    pairs[0::2] = edges[0::2] + 1
    pairs[1::2] = edges[1::2] - edges[0::2]
    return " ".join(map(str, pairs.tolist()))


def compress_coco_counts(run_counts: Sequence[np.ndarray], shape: tuple[int, int] = SHAPE) -> list[str]:
    """Compress COCO uncompressed RLE counts into COCO's string form, many masks in one pycocotools call.

    Args:
        run_counts: per mask, a ``(K,) int64`` array of alternating background / foreground run
            lengths in column-major order, starting with background (0 if the first pixel is set),
            summing to ``height * width``.
        shape: ``(height, width)`` of the masks.

    Returns:
        The compressed ``counts`` strings, one per mask.
    """
    if not run_counts:
        return []
    height, width = shape
    compressed = mask_util.frPyObjects([{"counts": c, "size": [height, width]} for c in run_counts], height, width)
    return [rle["counts"].decode("ascii") for rle in compressed]


def runs_to_coco_counts(starts: np.ndarray, lengths: np.ndarray, n_pixels: int) -> np.ndarray:
    """COCO uncompressed counts of one mask from its sorted, non-overlapping runs (touching runs merge).

    Args:
        starts: ``(R,) int64`` 0-indexed flat starts, ascending.
        lengths: ``(R,) int64`` run lengths.
        n_pixels: ``height * width``.

    Returns:
        ``(K,) int64`` alternating background / foreground lengths summing to ``n_pixels``, in the
        canonical form that ``pycocotools.mask.encode`` produces (no zero-length runs except a leading
        0 when the first pixel is set).
    """
    ends = starts + lengths
    first = np.ones(starts.size, bool)
    first[1:] = starts[1:] != ends[:-1]
    last = np.ones(starts.size, bool)
    last[:-1] = first[1:]
    starts, ends = starts[first], ends[last]
    counts = np.empty(2 * starts.size + 1, np.int64)
    counts[0:-1:2] = starts - np.r_[0, ends[:-1]]
    counts[1:-1:2] = ends - starts
    counts[-1] = n_pixels - (ends[-1] if ends.size else 0)
    return counts if counts[-1] or counts.size == 1 else counts[:-1]


def kaggle_to_coco_rle(rle: str | float | None, shape: tuple[int, int] = SHAPE) -> dict:
    """Translate a Kaggle RLE string into a compressed COCO RLE, without building a pixel array.

    Args:
        rle: the Kaggle RLE string (``""``, ``None`` or NaN for an empty mask).
        shape: ``(height, width)`` of the image.

    Returns:
        ``{"size": [height, width], "counts": str}``, equal to what ``pycocotools.mask.encode`` gives
        for the decoded mask.

    Raises:
        RLEError: (a ``ValueError``) when the string is malformed, see :func:`parse_rle`.
    """
    starts, lengths = parse_rle(rle, shape)
    counts = runs_to_coco_counts(starts, lengths, shape[0] * shape[1])
    return {"size": [shape[0], shape[1]], "counts": compress_coco_counts([counts], shape)[0]}


def coco_rle_to_kaggle(coco_rle: dict) -> str:
    """Translate a COCO RLE (compressed, ``counts`` str or bytes, or uncompressed) into a Kaggle RLE string.

    Args:
        coco_rle: ``{"size": [height, width], "counts": ...}``.

    Returns:
        The canonical Kaggle RLE string of the mask; ``""`` when it is empty.
    """
    height, width = coco_rle["size"]
    counts = coco_rle["counts"]
    if isinstance(counts, list):
        coco_rle = mask_util.frPyObjects(coco_rle, height, width)
    elif isinstance(counts, str):
        coco_rle = {"size": [height, width], "counts": counts.encode("ascii")}
    return mask_to_rle(mask_util.decode(coco_rle))

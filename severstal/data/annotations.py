"""Annotation tables: the competition's ``train.csv`` (both formats), submissions, image folders.

Two ``train.csv`` formats exist, and users have both; the header tells them apart:

* original (2019-07): ``ImageId_ClassId,EncodedPixels``, four rows per image (``0002cc93b.jpg_1`` ..
  ``_4``), empty masks blank, so defect-free images are listed too;
* later: ``ImageId,ClassId,EncodedPixels``, one row per non-empty mask only; defect-free images are
  absent (the list of all images then comes from the image folder).

Either way a table reads into one frame with columns ``ImageId, ClassId, EncodedPixels``: one row per
non-empty mask, ``ClassId`` an int in 1..4, sorted by image then class. Every RLE is validated when read
(:mod:`severstal.data.rle`), and a bad row is an error that names the file, its line and its ImageId.

Submissions come in the same two shapes: ``ImageId_ClassId,EncodedPixels`` and Kaggle's final
``ImageId,EncodedPixels,ClassId``. Kaggle's final sample submission holds one placeholder row per image
with ``ClassId`` 0 and ``EncodedPixels`` ``1 409600``; ClassId 0 is no defect class, so such a row only
lists its image and carries no mask (:func:`read_submission` accepts it, :func:`read_train_csv` does
not).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from severstal import CLASS_IDS
from severstal.data.rle import SHAPE, RLEError, parse_rles
from severstal.files import write_text_atomic

logger = logging.getLogger(__name__)

ORIGINAL_HEADER = ("ImageId_ClassId", "EncodedPixels")
LATER_HEADER = ("ImageId", "ClassId", "EncodedPixels")
SUBMISSION_FORMATS = {"new": ("ImageId", "EncodedPixels", "ClassId"), "old": ORIGINAL_HEADER}
"""Submission formats :func:`write_submission` writes, and their headers."""
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
COLUMNS = list(LATER_HEADER)
PLACEHOLDER_CLASS_ID = 0


class Annotations(NamedTuple):
    """An annotation table as read.

    Attributes:
        frame: one row per non-empty mask, columns ``ImageId`` (str), ``ClassId`` (int, 1..4),
            ``EncodedPixels`` (str), sorted by ImageId then ClassId.
        image_ids: every image the file lists, sorted, including those without a mask (only the
            original format and submissions list defect-free images).
    """

    frame: pd.DataFrame
    image_ids: list[str]


class _Table(NamedTuple):
    path: Path
    lines: pd.Series  # file line number of each row (the header is line 1)
    image_ids: pd.Series
    class_ids: pd.Series
    rles: pd.Series

    def error(self, row: int, problem: str) -> ValueError:
        return ValueError(f"{self.path}, line {self.lines.iloc[row]} (ImageId {self.image_ids.iloc[row]!r}): {problem}")


def _read_table(path: str | Path) -> _Table:
    """Read either format into aligned columns (strings), keeping each row's line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation table not found: {path}")
    try:
        with warnings.catch_warnings():
            # A first row with more fields than the header would otherwise lose them with only a warning.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            raw = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False, index_col=False,
                              encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.ParserWarning, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable CSV table: {err}") from None
    header = tuple(raw.columns)
    # With blank lines kept, row i of the frame is line i + 2 of the file; blank lines are then dropped.
    raw = raw.fillna("")
    raw = raw[(raw != "").any(axis=1)]
    lines = pd.Series(raw.index + 2, dtype="int64")
    raw = raw.reset_index(drop=True)
    if header == ORIGINAL_HEADER:
        image_ids, separator, class_ids = (raw["ImageId_ClassId"].str.rpartition("_")[i] for i in range(3))
        no_separator = (separator == "").to_numpy()
        if no_separator.any():
            row = int(no_separator.argmax())
            raise ValueError(
                f"{path}, line {lines.iloc[row]}: {raw['ImageId_ClassId'].iloc[row]!r} is not "
                "ImageId_ClassId (e.g. '0002cc93b.jpg_1')"
            )
        return _Table(path, lines, image_ids.str.strip(), class_ids, raw["EncodedPixels"])
    if sorted(header) == sorted(LATER_HEADER):
        return _Table(path, lines, raw["ImageId"].str.strip(), raw["ClassId"], raw["EncodedPixels"])
    raise ValueError(
        f"{path}: unknown header {','.join(header)!r}; accepted headers are "
        f"{','.join(ORIGINAL_HEADER)!r} (original train.csv, 4 rows per image) and "
        f"{','.join(LATER_HEADER)!r} (later train.csv and submissions, columns in any order)"
    )


def _validated(table: _Table, allow_placeholder: bool, shape: tuple[int, int]) -> Annotations:
    """Check every row of ``table`` and build its :class:`Annotations`."""
    missing = (table.image_ids == "").to_numpy()
    if missing.any():
        raise table.error(int(missing.argmax()), "the ImageId is empty")
    valid = [str(c) for c in CLASS_IDS] + ([str(PLACEHOLDER_CLASS_ID)] if allow_placeholder else [])
    class_text = table.class_ids.str.strip()
    bad = (~class_text.isin(valid)).to_numpy()
    if bad.any():
        row = int(bad.argmax())
        raise table.error(row, f"class id {table.class_ids.iloc[row]!r} is not one of {', '.join(valid)}")
    class_ids = class_text.astype("int64")

    pairs = pd.DataFrame({"ImageId": table.image_ids, "ClassId": class_ids})
    repeated = pairs.duplicated().to_numpy()
    if repeated.any():
        row = int(repeated.argmax())
        same = (pairs["ImageId"] == pairs["ImageId"].iloc[row]) & (pairs["ClassId"] == class_ids.iloc[row])
        first = int(same.to_numpy().argmax())
        raise table.error(
            row, f"class {class_ids.iloc[row]} of this image is already on line {table.lines.iloc[first]}"
        )

    rles = table.rles.str.strip()
    is_mask = ((rles != "") & (class_ids != PLACEHOLDER_CLASS_ID)).to_numpy()
    rows = is_mask.nonzero()[0]
    try:
        parse_rles(rles.iloc[rows].tolist(), shape)
    except RLEError as err:
        raise table.error(int(rows[err.index]), f"malformed EncodedPixels: {err}") from None
    placeholders = int((class_ids == PLACEHOLDER_CLASS_ID).sum())
    if placeholders:
        logger.info("%s: %d rows with ClassId 0 (placeholders) list their image and carry no mask", table.path,
                    placeholders)

    frame = pd.DataFrame(
        {"ImageId": table.image_ids.iloc[rows].to_numpy(), "ClassId": class_ids.iloc[rows].to_numpy(),
         "EncodedPixels": rles.iloc[rows].to_numpy()}
    )
    frame = frame.sort_values(["ImageId", "ClassId"], kind="stable").reset_index(drop=True)
    return Annotations(frame, sorted(set(table.image_ids)))


def read_annotations(path: str | Path, shape: tuple[int, int] = SHAPE) -> Annotations:
    """Read a ``train.csv`` in either format, with the list of every image it names.

    Args:
        path: the CSV file.
        shape: ``(height, width)`` of the images, to validate the RLE.

    Returns:
        :class:`Annotations` (frame of non-empty masks, sorted image ids).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unknown header (the message lists the two accepted ones), or a bad row: the
            message names the file, the line and the ImageId, and says what is wrong (empty ImageId,
            class id not in 1..4, the same (image, class) twice, malformed EncodedPixels).
    """
    return _validated(_read_table(path), allow_placeholder=False, shape=shape)


def read_train_csv(path: str | Path, shape: tuple[int, int] = SHAPE) -> pd.DataFrame:
    """Read a ``train.csv`` in either format: one row per non-empty mask.

    Args:
        path: the CSV file.
        shape: ``(height, width)`` of the images, to validate the RLE.

    Returns:
        Frame with columns ``ImageId`` (str), ``ClassId`` (int, 1..4), ``EncodedPixels`` (str), sorted
        by ImageId then ClassId.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_annotations`.
    """
    return read_annotations(path, shape).frame


def read_submission(path: str | Path, shape: tuple[int, int] = SHAPE) -> Annotations:
    """Read a submission in either format (``ImageId_ClassId,EncodedPixels`` or ``ImageId,EncodedPixels,ClassId``).

    Rows with ``ClassId`` 0 (Kaggle's final sample submission has one per image, ``1 409600``) list
    their image and carry no mask.

    Args:
        path: the CSV file.
        shape: ``(height, width)`` of the images, to validate the RLE.

    Returns:
        :class:`Annotations`: frame of the non-empty masks of classes 1..4, and every image listed.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_annotations`.
    """
    return _validated(_read_table(path), allow_placeholder=True, shape=shape)


def write_submission(
    frame: pd.DataFrame, path: str | Path, image_ids: Iterable[str], fmt: str = "new"
) -> Path:
    """Write a submission with a row for every (image, class) pair, atomically.

    Args:
        frame: masks with columns ``ImageId, ClassId, EncodedPixels`` (as :func:`read_train_csv`
            returns); pairs without a row, or with an empty RLE, are written empty.
        path: the CSV file to write.
        image_ids: every image of the submission, in the order to write.
        fmt: ``"new"`` (``ImageId,EncodedPixels,ClassId``, Kaggle's final format) or ``"old"``
            (``ImageId_ClassId,EncodedPixels``, four rows per image).

    Returns:
        The path written.

    Raises:
        ValueError: an unknown ``fmt``, missing columns, a class id not in 1..4, an image not in
            ``image_ids``, the same pair twice, or a malformed RLE.
    """
    if fmt not in SUBMISSION_FORMATS:
        raise ValueError(f"unknown submission format {fmt!r}: choose one of {sorted(SUBMISSION_FORMATS)}")
    missing = set(COLUMNS) - set(frame.columns)
    if missing:
        raise ValueError(f"frame lacks column(s) {sorted(missing)}; it needs {COLUMNS}")
    image_ids = list(image_ids)
    masks = frame.loc[frame["EncodedPixels"].fillna("").astype(str).str.strip() != "", COLUMNS]
    unknown_classes = sorted(set(masks["ClassId"].astype(int)) - set(CLASS_IDS))
    if unknown_classes:
        raise ValueError(f"class id(s) {unknown_classes} not in {list(CLASS_IDS)}")
    unknown_images = sorted(set(masks["ImageId"]) - set(image_ids))
    if unknown_images:
        raise ValueError(f"{len(unknown_images)} image(s) with masks are not in image_ids, e.g. {unknown_images[:3]}")
    keys = list(zip(masks["ImageId"], masks["ClassId"].astype(int)))
    if len(set(keys)) != len(keys):
        raise ValueError("the frame has more than one mask for the same (ImageId, ClassId)")
    rles = masks["EncodedPixels"].astype(str).str.strip().tolist()
    try:
        parse_rles(rles)
    except RLEError as err:
        raise ValueError(f"mask of {keys[err.index]}: malformed EncodedPixels: {err}") from None

    by_pair = dict(zip(keys, rles))
    pairs = [(image_id, class_id) for image_id in image_ids for class_id in CLASS_IDS]
    encoded = [by_pair.get(pair, "") for pair in pairs]
    if fmt == "new":
        out = pd.DataFrame({"ImageId": [p[0] for p in pairs], "EncodedPixels": encoded,
                            "ClassId": [p[1] for p in pairs]})
    else:
        out = pd.DataFrame({"ImageId_ClassId": [f"{i}_{c}" for i, c in pairs], "EncodedPixels": encoded})
    return write_text_atomic(path, out.to_csv(index=False, lineterminator="\n"))


def list_images(folder: str | Path) -> list[str]:
    """The image file names (``.jpg``, ``.jpeg``, ``.png``, any case) in ``folder``, sorted.

    Raises:
        FileNotFoundError: ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

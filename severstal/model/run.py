"""The run folder: what travels with a model, its checks, its copies and its tuned thresholds.

A training run folder holds the weights beside ``config.yaml``, ``split.json`` and, after tuning,
``thresholds.json`` (the names are :mod:`severstal.files`'s); an export folder has the same shape around its model
file. This module is the one place that knows which of those files go with a model (an export, a ``.mar``
archive, a Ray worker), how a model file and its config are checked, how a run is copied with config overrides,
and what ``thresholds.json`` may hold (:class:`Thresholds`). It imports no torch: Detectron2 is loaded only by
:func:`copy_run`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from severstal import CLASS_IDS
from severstal.files import CONFIG_FILE, SPLIT_FILE, THRESHOLDS_FILE, WEIGHTS_FILE, model_file_in, write_text_atomic

WITH_MODEL = (CONFIG_FILE, THRESHOLDS_FILE, SPLIT_FILE)
"""The files that go wherever a run's model file goes (export, archive, Ray workers): the config, which every
model needs, then the tuned thresholds and the split, when the run has them."""


def files_with_model(folder: str | Path) -> list[Path]:
    """The files of :data:`WITH_MODEL` that ``folder`` holds, in that order."""
    return [Path(folder) / name for name in WITH_MODEL if (Path(folder) / name).is_file()]


def checked_model_file(weights_or_folder: str | Path, device: str = "cpu") -> Path:
    """The model file to load: the one given, or the fastest on ``device`` of a run or export folder
    (:func:`severstal.files.model_file_in`); FileNotFoundError unless it and its ``config.yaml`` are there."""
    path = Path(weights_or_folder)
    weights = model_file_in(path, device) if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"no weights at {weights}")
    config = weights.parent / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{config} is missing: a training run saves it next to its weights")
    return weights


def copy_run(src: str | Path, dst: str | Path, overrides: Sequence[str] = ()) -> Path:
    """Copy a run's weights and config into ``dst``, the config with Detectron2-style ``KEY VALUE`` overrides.

    The weights are hard-linked where the file system allows (no second copy on disk), else copied. Nothing else
    is copied: the run's ``thresholds.json``, applied over the config, would undo overrides of the thresholds.

    Returns:
        ``dst``.
    """
    from detectron2.config import CfgNode

    src, dst = Path(src), Path(dst)
    if len(overrides) % 2:
        raise ValueError(f"overrides come in KEY VALUE pairs, got {list(overrides)}")
    # The saved config is complete, so Detectron2's own merge checks each key and the type of its value.
    cfg = CfgNode(CfgNode.load_yaml_with_base(str(src / CONFIG_FILE), allow_unsafe=True))
    cfg.merge_from_list([str(o) for o in overrides])
    dst.mkdir(parents=True, exist_ok=True)
    (dst / WEIGHTS_FILE).unlink(missing_ok=True)
    try:
        os.link(src / WEIGHTS_FILE, dst / WEIGHTS_FILE)
    except OSError:
        shutil.copyfile(src / WEIGHTS_FILE, dst / WEIGHTS_FILE)
    write_text_atomic(dst / CONFIG_FILE, cfg.dump())
    return dst


_PER_CLASS = {"score_thresholds": (float, 0.0, 1.0, "in [0, 1]"),
              "min_areas": (int, 0, math.inf, ">= 0 (pixels)"),
              "presence_thresholds": (float, 0.0, 1.0, "in [0, 1]"),
              "pixel_thresholds": (float, 0.0, 1.0, "in [0, 1]")}
"""Per-class fields: the type of a value, its bounds and how the bounds read in an error."""
_REQUIRED = ("score_thresholds", "min_areas")
"""The per-class fields every ``thresholds.json`` has; the others are absent in runs tuned before they existed."""


def check_per_class(name: str, values) -> tuple:
    """``values`` of the per-class field ``name`` (``score_thresholds``, ``min_areas``, ``presence_thresholds``,
    ``pixel_thresholds``), checked and converted: one number per class in the field's range. ValueError otherwise,
    naming the field."""
    kind, low, high, bounds = _PER_CLASS[name]
    wrong = ValueError(f"{name} needs {len(CLASS_IDS)} values {bounds}, one per class {CLASS_IDS}; got {values!r}")
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != len(CLASS_IDS):
        raise wrong
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and low <= v <= high for v in values):
        raise wrong
    if kind is int and not all(float(v).is_integer() for v in values):
        raise wrong
    return tuple(kind(v) for v in values)


@dataclass(frozen=True)
class Thresholds:
    """The per-class decisions tuning saves in ``thresholds.json`` and prediction applies over the config.

    Attributes:
        score_thresholds: per class 1..4, the score an instance needs to count (``SEVERSTAL.SCORE_THRESHOLDS``).
        min_areas: per class 1..4, the pixels a class mask needs, else it is emptied (``SEVERSTAL.MIN_AREAS``).
        presence_thresholds: per class 1..4, the presence probability a class mask needs
            (``SEVERSTAL.PRESENCE_THRESHOLDS``); None in runs tuned before the presence gate: the config's stand.
        pixel_thresholds: per class 1..4, the probability a pixel of the per-pixel head needs to be of the class
            (``SEVERSTAL.PIXEL_THRESHOLDS``, models with ``SEVERSTAL.SEMANTIC_HEAD``); None: the config's stand.
        dice_per_class: class id (a string, as in JSON) -> the Dice tuning reached; for the reader, never applied.

    Every value is checked when the object is made, so a ``thresholds.json`` that is read or written is valid.
    """

    score_thresholds: tuple[float, ...]
    min_areas: tuple[int, ...]
    presence_thresholds: tuple[float, ...] | None = None
    pixel_thresholds: tuple[float, ...] | None = None
    dice_per_class: Mapping[str, float] | None = None

    def __post_init__(self):
        for name in _PER_CLASS:
            if name in _REQUIRED or getattr(self, name) is not None:
                object.__setattr__(self, name, check_per_class(name, getattr(self, name)))
        if self.dice_per_class is not None:
            dice = self.dice_per_class
            if not isinstance(dice, Mapping) or not {str(k) for k in dice} <= {str(c) for c in CLASS_IDS} or not all(
                    isinstance(v, numbers.Real) and not isinstance(v, bool) for v in dice.values()):
                raise ValueError(f"dice_per_class maps class ids {CLASS_IDS} to numbers; got {dice!r}")
            object.__setattr__(self, "dice_per_class", {str(k): float(v) for k, v in dice.items()})

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "thresholds") -> Thresholds:
        """The thresholds of a JSON object; ValueError naming ``where`` and the field that is wrong."""
        allowed = [f.name for f in fields(cls)]
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: needs a JSON object with {allowed}; got {data!r}")
        unknown = sorted(set(data) - set(allowed))
        missing = [name for name in _REQUIRED if name not in data]
        if unknown or missing:
            raise ValueError(f"{where}: " + (f"unknown fields {unknown}; allowed: {allowed}" if unknown
                                             else f"{missing[0]} is missing"))
        try:
            return cls(**data)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    @classmethod
    def from_cfg(cls, cfg) -> Thresholds:
        """The thresholds a Severstal config holds (``cfg.SEVERSTAL``); pixel thresholds only with the per-pixel
        head, the one model they act on."""
        s = cfg.SEVERSTAL
        return cls(tuple(s.SCORE_THRESHOLDS), tuple(s.MIN_AREAS), tuple(s.PRESENCE_THRESHOLDS),
                   tuple(s.PIXEL_THRESHOLDS) if s.SEMANTIC_HEAD else None)

    @classmethod
    def read(cls, folder: str | Path) -> Thresholds | None:
        """The ``thresholds.json`` of a run or export folder; None when the run was not tuned.

        Raises:
            ValueError: the file is not JSON or a field is wrong; the message names the file and the field.
        """
        path = Path(folder) / THRESHOLDS_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err})") from None
        return cls.from_dict(data, where=str(path))

    def write(self, folder: str | Path) -> Path:
        """Write ``folder/thresholds.json`` atomically; returns its path."""
        return write_text_atomic(Path(folder) / THRESHOLDS_FILE, json.dumps(self.to_dict(), indent=1))

    def per_class(self) -> dict[str, list]:
        """The decisions prediction applies, as JSON lists: the score and area thresholds, and the presence and
        pixel thresholds when set."""
        return {name: list(getattr(self, name)) for name in _PER_CLASS if getattr(self, name) is not None}

    def to_dict(self) -> dict:
        """What ``thresholds.json`` holds: :meth:`per_class`, then ``dice_per_class`` when tuning gave it."""
        tuned = {"dice_per_class": dict(self.dice_per_class)} if self.dice_per_class is not None else {}
        return {**self.per_class(), **tuned}

    def apply(self, cfg) -> None:
        """Set these thresholds in a Severstal config, in place (the presence and pixel thresholds when set)."""
        for name, values in self.per_class().items():
            cfg.SEVERSTAL[name.upper()] = values

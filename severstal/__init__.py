"""Severstal steel-defect segmentation with Detectron2 Mask R-CNN, served with TorchServe.

The package is laid out by stage, each importing only the stages below it::

    files (names, atomic writes)  ->  data  ->  model  ->  serve  ->  cli, commands, demo, figures, bench
                                                       ->  viz    ->

``viz`` is the only stage that draws: the model returns data, and ``viz`` (beside ``serve``) draws it for the
commands on top.

``import severstal`` stays light (no torch, no Detectron2, no pandas): the names below are loaded on first use.

    >>> import severstal
    >>> severstal.mask_to_rle(severstal.rle_to_mask("1 3"))
    '1 3'
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

CLASS_IDS = (1, 2, 3, 4)
"""Kaggle's defect class ids; Detectron2's ``category_id`` is ``class_id - 1``."""

IMAGE_HEIGHT = 256
IMAGE_WIDTH = 1600

_PUBLIC = {
    "rle_to_mask": "severstal.data.rle",
    "mask_to_rle": "severstal.data.rle",
    "read_train_csv": "severstal.data.annotations",
    "dice": "severstal.data.dice",
    "mean_dice": "severstal.data.dice",
    "Predictor": "severstal.model.predict",
}
"""What users call most, and the module that owns each."""

__all__ = ["CLASS_IDS", "IMAGE_HEIGHT", "IMAGE_WIDTH", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'severstal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))

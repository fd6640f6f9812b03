"""Severstal steel-defect segmentation with Detectron2 Mask R-CNN, served with TorchServe.

The package keeps its import light (no torch, no Detectron2) so that ``python -m severstal.<tool>``
works before the heavy dependencies are installed. Import the submodules you need.
"""

__version__ = "0.1.0"

CLASS_IDS = (1, 2, 3, 4)
"""Kaggle's defect class ids; Detectron2's ``category_id`` is ``class_id - 1``."""

IMAGE_HEIGHT = 256
IMAGE_WIDTH = 1600

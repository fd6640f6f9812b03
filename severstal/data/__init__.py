"""Data: Kaggle's tables and masks to Detectron2's instances, and the competition's metric.

``rle`` (the one owner of the run-length encoding) -> ``annotations`` (train.csv in both formats,
submissions) -> ``instances`` (connected components as COCO RLE) -> ``coco`` / ``datasets`` (COCO files,
Detectron2 dicts and registration), beside ``images`` (decoding), ``dice`` (the metric) and ``synth``
(synthetic Severstal-like data).
"""

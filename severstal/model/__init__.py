"""Model: the Detectron2 Mask R-CNN, from config to training, prediction, export and evaluation.

``run`` (the run folder: the files that go with a model, ``Thresholds``, ``copy_run``; no torch) ->
``config`` (keys and YAMLs) -> ``backends`` (what runs the network: PyTorch, ONNX Runtime, TensorRT) ->
``predict`` (the shared pre- and post-processing, records, submissions) -> ``export`` (ONNX, TensorRT) and
``evaluation`` (Dice, COCO AP, threshold tuning) -> ``train``.
"""

"""Model: the Detectron2 Mask R-CNN, from config to training, prediction, export and evaluation.

``config`` (keys and YAMLs) -> ``backends`` (what runs the network: PyTorch, ONNX Runtime, TensorRT) ->
``predict`` (the shared pre- and post-processing, records, submissions) -> ``export`` (ONNX, TensorRT) and
``evaluation`` (Dice, COCO AP, threshold tuning) -> ``train``.
"""

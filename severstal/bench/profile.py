"""Benchmark ``profile``: where the time of one image goes, stage by stage, with the PyTorch model.

The stages are those of every backend (an exported graph runs the same backbone, RPN and ROI heads, and
the pre- and post-processing are shared): decoding, resizing, backbone (ResNet + FPN), RPN (anchors,
objectness, proposals), ROI box head (RoIAlign, box head, NMS), ROI mask head (RoIAlign, mask head),
mask pasting (28x28 probabilities -> full-size masks, ``Predictor.postprocess``) and the record
(thresholds, class unions, Kaggle RLE, ``make_record``).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from severstal.data.images import decode_image
from severstal.model.backends import raw_output
from severstal.model.predict import Predictor, make_record

STAGES = ("decode", "resize", "backbone", "rpn", "roi_box_head", "roi_mask_head", "mask_pasting", "record_rle")
"""The stages of one prediction, in order."""


def profile_predict(weights: str | Path, image: str | Path, repeats: int = 5, precision: str = "fp32",
                    threads: int | None = None) -> dict:
    """Time each stage (:data:`STAGES`) of predicting one image with the PyTorch model, ``repeats`` times.

    Args:
        weights: a ``.pth`` weights file or its run folder.
        image: a JPEG/PNG file.
        repeats: timed runs after one untimed warm-up; each stage's p50 is reported.
        precision: "fp32" or "bf16" (the backbone in bfloat16, as ``TorchBackend``).
        threads: PyTorch threads (default: the current setting).

    Returns:
        ``{"benchmark": "profile", "weights", "image", "precision", "threads", "repeats", "detections",
        "pasted", "total_ms", "load_average", "stages": [{"stage", "p50_ms", "share"}]}``; ``detections``
        are the network's, ``pasted`` those above their class threshold whose masks are pasted, ``share``
        the stage's part of ``total_ms`` (the sum of the p50s).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    body = Path(image).read_bytes()
    previous = torch.get_num_threads()
    threads = threads or previous
    load_before = os.getloadavg()
    torch.set_num_threads(threads)
    try:
        predictor = Predictor.from_weights(weights, device="cpu", backend="torch", precision=precision)
        backend, model = predictor.backend, predictor.backend.model
        thresholds, min_areas = predictor.thresholds
        times: dict[str, list[float]] = {stage: [] for stage in STAGES}
        laps: list[float] = []

        def lap():
            laps.append(time.perf_counter())

        for index in range(repeats + 1):
            laps.clear()
            lap()
            frame = decode_image(body)
            lap()
            tensor = predictor.preprocess(frame)
            lap()
            with backend.autocast():
                batch = model.preprocess_image([{"image": tensor}])
                features = backend.features(batch)
                lap()
                proposals, _ = model.proposal_generator(batch, features, None)
                lap()
                instances = backend.detect_boxes(features, proposals, min_score=min(thresholds))
                lap()
                instances = model.roi_heads.forward_with_given_boxes(features, instances)
                lap()
            raw = raw_output(instances[0])
            detections = predictor.postprocess(raw, tuple(tensor.shape[1:]), frame.shape[:2], min_scores=thresholds)
            lap()
            make_record(detections, thresholds, min_areas)
            lap()
            if index:  # the first run warms up
                for stage, begin, end in zip(STAGES, laps, laps[1:]):
                    times[stage].append(end - begin)
    finally:
        torch.set_num_threads(previous)
    p50 = {stage: 1000 * statistics.median(values) for stage, values in times.items()}
    total = sum(p50.values())
    return {"benchmark": "profile", "weights": str(weights), "image": str(image), "precision": backend.precision,
            "threads": threads, "repeats": repeats, "detections": len(raw.scores), "pasted": len(detections.scores),
            "total_ms": total, "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
            "stages": [{"stage": s, "p50_ms": p50[s], "share": p50[s] / total} for s in STAGES]}

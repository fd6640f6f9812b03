"""TorchServe handler for the Severstal Mask R-CNN: a thin layer over ``severstal.serve.worker``.

Packed into the ``.mar`` by ``severstal archive``; it imports the installed ``severstal`` package, which holds
all the logic (decoding, prediction, answers, per-request errors) and its tests.
"""

from __future__ import annotations

import time

import torch
from ts.torch_handler.base_handler import BaseHandler

from severstal.serve import worker


class SeverstalHandler(BaseHandler):
    """Answers each request of a batch with the REST contract's JSON, or with its own 4xx error."""

    def initialize(self, context):
        """Load the archive's weights on the GPU TorchServe assigned (``gpu_id``), else the CPU."""
        self.manifest = context.manifest
        self.serving_model = worker.ServingModel.from_context(context)
        self.device = torch.device(self.serving_model.device)
        self.initialized = True

    def preprocess(self, data):
        """Request dicts -> an image array, or a BadRequest (unreadable, or beyond the model's limits), per request."""
        return worker.decode_batch(data, self.serving_model.limits)

    def inference(self, data, *args, **kwargs):
        """Predict the batch in one call (one by one if that fails) and emit the inference-time metric."""
        start = time.perf_counter()
        with torch.inference_mode():
            results = self.serving_model.predict(data)
        worker.record_metrics(self.context.metrics, time.perf_counter() - start, len(data))
        return results

    def postprocess(self, data):
        """One JSON-able dict per request; a bad request gets its 4xx status."""
        return worker.respond(data, self.context)

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
    """Answers each request of a batch with the REST contract's JSON, or with its own 4xx error.

    Requests of ``/predictions/NAME`` and of the Open Inference Protocol's ``/v2/models/NAME/infer`` come here
    alike; each is answered in its own protocol (``severstal.serve.oip``).
    """

    def initialize(self, context):
        """Load the archive's weights on the GPU TorchServe assigned (``gpu_id``), else the CPU."""
        self.manifest = context.manifest
        self.serving_model = worker.ServingModel.from_context(context)
        self.device = torch.device(self.serving_model.device)
        self.initialized = True

    def preprocess(self, data):
        """Request dicts -> an Upload per request: its route, and an image or a BadRequest (unreadable, or beyond
        the model's limits)."""
        headers = [self.context.get_all_request_header(i) for i in range(len(data))]
        return worker.read_batch(data, self.serving_model.limits, headers)

    def inference(self, data, *args, **kwargs):
        """Predict the batch in one call (one by one if that fails) and emit the inference-time metric."""
        start = time.perf_counter()
        with torch.inference_mode():
            results = self.serving_model.predict([upload.item for upload in data])
        worker.record_metrics(self.context.metrics, time.perf_counter() - start, len(data))
        return data, results

    def postprocess(self, data):
        """One JSON-able dict per request, in its protocol; a bad request gets its 4xx status."""
        uploads, results = data
        return worker.respond(uploads, results, self.context, self.serving_model.runs)

"""The TorchServe handler without a server: a real ``ts.context.Context`` built by hand, as a worker builds it."""

from __future__ import annotations

import importlib.util
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import severstal.serve
from severstal.data.rle import rle_to_mask
from severstal.serve import archive as serve_archive
from severstal.serve import server as serve_server
from severstal.serve import worker as serve_worker

ANSWER_KEYS = {"height", "width", "defects", "classes"}
DEFECT_KEYS = {"class_id", "score", "bbox", "area", "rle"}


# Inputs ------------------------------------------------------------------------------------------------


def patched_png(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width`` x ``height`` pixels (CRC fixed): a decompression bomb."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8  # after the PNG signature: length (4), "IHDR" (4), width, height, ...
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    body = bytes(data[ihdr + 4 : ihdr + 4 + 4 + 13])
    data[ihdr + 4 + 4 + 13 : ihdr + 4 + 4 + 13 + 4] = struct.pack(">I", zlib.crc32(body))
    return bytes(data)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def jpegs(real_data) -> list[bytes]:
    """Two real Severstal JPEGs (1600 x 256)."""
    return [p.read_bytes() for p in sorted((real_data / "train_images").glob("*.jpg"))[:2]]


@pytest.fixture(scope="module")
def bad_inputs(jpegs) -> dict[str, tuple[dict, int, str]]:
    """name -> (request dict as TorchServe hands it over, expected status, words of the message)."""
    return {
        "empty": ({"body": b""}, 400, "empty request body"),
        "no field": ({"file": jpegs[0]}, 400, "multipart field 'data'"),
        "text": ({"body": "hello, not an image"}, 415, "text"),
        "json": ({"body": {"image": "x"}}, 415, "JSON"),
        "not an image": ({"body": b"GIF89a-but-not-really" * 10}, 400, "not an image"),
        "truncated jpeg": ({"body": jpegs[0][:4000]}, 400, "truncated"),
        "bomb over MAX_PIXELS": ({"body": patched_png(8000, 8000)}, 400, "decompression bomb"),
        "bomb over Pillow's limit": ({"data": bytearray(patched_png(20000, 20000))}, 400, "decompression bomb"),
    }


# A context as TorchServe's worker builds it -----------------------------------------------------------


def make_context(model_dir: Path, batch_size: int = 4, handler_block: dict | None = None):
    """``ts.context.Context`` for ``model_dir`` (weights + config.yaml), CPU (gpu_id None), no server."""
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    metrics = MetricsCacheYamlImpl(str(Path(importlib.util.find_spec("ts").origin).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = "severstal"
    manifest = {"model": {"modelName": "severstal", "serializedFile": "model_final.pth", "handler": "handler.py"}}
    yaml_config = {"batchSize": batch_size, "handler": handler_block or {"max_detections": 20, "backend": "torch"}}
    return Context("severstal", str(model_dir), manifest, batch_size, None, "0.12.0", True, metrics, yaml_config)


def start_batch(context, requests: list[dict], headers: list[dict] | None = None) -> None:
    """What ``ts.service.Service.predict`` does before calling the handler (with each request's headers)."""
    from ts.context import RequestProcessor

    ids = {i: f"request-{i}" for i in range(len(requests))}
    context.request_ids = ids
    context.metrics.request_ids = ids
    context.request_processor = [RequestProcessor(dict(h)) for h in (headers or [{}] * len(requests))]


@pytest.fixture(scope="module")
def handler(scratch_run):
    """The project's handler class, loaded from torchserve/handler.py and initialised on the scratch run."""
    spec = importlib.util.spec_from_file_location("severstal_ts_handler", severstal.serve.HANDLER_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    instance = module.SeverstalHandler()
    instance.initialize(make_context(scratch_run))
    return instance


def handle(handler, context, requests: list[dict], headers: list[dict] | None = None) -> tuple[list[dict], list[int]]:
    """Run a batch through ``handler.handle`` like a worker; return the answers and each HTTP status."""
    start_batch(context, requests, headers)
    answers = handler.handle(requests, context)
    statuses = [context.get_response_status(i)[0] or 200 for i in range(len(requests))]
    json.dumps(answers)  # TorchServe serialises each answer with json.dumps
    return answers, statuses


def check_answer(answer: dict, height: int, width: int) -> None:
    """The REST contract, and every RLE decoding to a mask inside its box."""
    assert set(answer) == ANSWER_KEYS
    assert (answer["height"], answer["width"]) == (height, width)
    assert set(answer["classes"]) == {"1", "2", "3", "4"}
    union = {c: np.zeros((height, width), bool) for c in answer["classes"]}
    for defect in answer["defects"]:
        assert set(defect) == DEFECT_KEYS
        assert defect["class_id"] in (1, 2, 3, 4) and 0.0 <= defect["score"] <= 1.0
        mask = rle_to_mask(defect["rle"], shape=(height, width)).astype(bool)
        assert mask.sum() == defect["area"] > 0
        x0, y0, x1, y1 = defect["bbox"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        rows, cols = np.nonzero(mask)
        # Pixels belong to the box (pixel i covers [i, i + 1)); allow one pixel for the paste's rounding.
        assert rows.min() >= np.floor(y0) - 1 and rows.max() <= np.ceil(y1) and cols.min() >= np.floor(x0) - 1
        assert cols.max() <= np.ceil(x1)
        union[str(defect["class_id"])] |= mask
    for c, rle in answer["classes"].items():
        np.testing.assert_array_equal(rle_to_mask(rle, shape=(height, width)).astype(bool), union[c])


# Tests -------------------------------------------------------------------------------------------------


def test_batch_of_two_real_images_gives_two_answers_in_the_contract(handler, scratch_run, jpegs):
    context = make_context(scratch_run)
    answers, statuses = handle(handler, context, [{"body": jpegs[0]}, {"data": bytearray(jpegs[1])}])
    assert statuses == [200, 200]
    assert len(answers) == 2
    for answer in answers:
        check_answer(answer, 256, 1600)
    assert sum(len(a["defects"]) for a in answers) > 0, "the scratch model's low thresholds should give defects"
    # The handler answers exactly what the package's predictor answers for the same images.
    from severstal.data.images import decode_image

    assert answers == handler.serving_model.predictor.predict([decode_image(j) for j in jpegs])
    for i in range(2):
        assert context.get_response_content_type(i) == "application/json"
        assert context.get_response_headers(i)[serve_worker.BATCH_HEADER] == "2"


def test_bad_inputs_fail_alone_and_the_good_ones_in_the_batch_succeed(handler, scratch_run, jpegs, bad_inputs):
    names = list(bad_inputs)
    requests = [{"body": jpegs[0]}] + [bad_inputs[n][0] for n in names] + [{"data": jpegs[1]}]
    answers, statuses = handle(handler, make_context(scratch_run), requests)
    check_answer(answers[0], 256, 1600)
    check_answer(answers[-1], 256, 1600)
    assert statuses[0] == statuses[-1] == 200
    for name, answer, status in zip(names, answers[1:-1], statuses[1:-1]):
        expected_status, words = bad_inputs[name][1:]
        assert status == expected_status, name
        assert answer["code"] == expected_status and answer["type"] == "BadRequest", name
        assert words in answer["message"], (name, answer["message"])


def test_native_and_open_inference_requests_share_a_batch_and_each_is_answered_in_its_protocol(handler, scratch_run,
                                                                                               jpegs):
    from severstal.serve import oip

    binary, binary_headers = oip.encode_infer_request(jpegs[1], request_id="b-1")
    as_json = json.loads(oip.encode_infer_request(jpegs[0], binary=False)[0])  # TorchServe decodes JSON bodies
    bad = json.loads(oip.encode_infer_request(b"not an image", binary=False)[0])
    requests = [{"body": jpegs[0]}, {"body": binary}, {"body": as_json}, {"body": bad}, {"body": jpegs[1]}]
    headers = [{}, {k.lower(): v for k, v in binary_headers.items()}, {}, {}, {}]
    answers, statuses = handle(handler, make_context(scratch_run), requests, headers)
    assert statuses == [200, 200, 200, 400, 200]
    assert answers[1]["id"] == "b-1" and answers[1]["model_name"] == "severstal"
    assert oip.record_from_response(answers[1]) == answers[4]
    assert oip.record_from_response(answers[2]) == answers[0]
    assert set(answers[3]) == {"error"} and "not an image" in answers[3]["error"]
    check_answer(answers[0], 256, 1600)


def test_a_batch_of_only_bad_inputs_answers_without_predicting(handler, scratch_run, bad_inputs):
    requests = [bad_inputs["empty"][0], bad_inputs["text"][0]]
    answers, statuses = handle(handler, make_context(scratch_run), requests)
    assert statuses == [400, 415]
    assert [a["code"] for a in answers] == [400, 415]


def test_images_of_other_sizes_are_answered_at_their_own_size(handler, scratch_run, jpegs):
    real = Image.open(io.BytesIO(jpegs[0]))
    grey_small = encode(real.convert("L").resize((800, 128)))
    colour_square = encode(real.crop((0, 0, 256, 256)).resize((300, 300)), "JPEG")
    answers, statuses = handle(handler, make_context(scratch_run), [{"body": grey_small}, {"body": colour_square}])
    assert statuses == [200, 200]
    check_answer(answers[0], 128, 800)
    check_answer(answers[1], 300, 300)


def test_the_handler_emits_its_inference_metrics(handler, scratch_run, jpegs, caplog):
    context = make_context(scratch_run)
    with caplog.at_level("INFO", logger="ts.metrics.caching_metric"):
        handle(handler, context, [{"body": jpegs[0]}, {"body": b""}, {"body": jpegs[1]}])
    # The worker prints these lines; TorchServe's frontend turns them into Prometheus gauges.
    lines = {r.getMessage().removeprefix("[METRICS]").split(".", 1)[0]: r.getMessage().removeprefix("[METRICS]")
             for r in caplog.records}
    assert f"{serve_worker.BATCH_METRIC}.Count:3|#ModelName:severstal,Level:Model" in lines[serve_worker.BATCH_METRIC]
    timing = lines[serve_worker.INFERENCE_METRIC]
    assert timing.startswith(f"{serve_worker.INFERENCE_METRIC}.Milliseconds:")
    assert float(timing.split(":", 1)[1].split("|")[0]) > 0


def test_the_handler_block_overrides_what_was_saved_with_the_weights(scratch_run, jpegs):
    from severstal.data.images import decode_image

    image = decode_image(jpegs[0])
    [saved] = serve_worker.ServingModel.load(scratch_run).predict([image])
    assert saved["defects"], "the saved thresholds must give defects, or emptying them proves nothing"
    block = {"score_thresholds": [1.0] * 4, "max_detections": 5}
    model = serve_worker.ServingModel.load(scratch_run, handler_block=block)
    assert model.device == "cpu"
    assert list(model.predictor.cfg.SEVERSTAL.SCORE_THRESHOLDS) == [1.0] * 4
    assert model.predictor.cfg.TEST.DETECTIONS_PER_IMAGE == 5
    [record] = model.predict([image])
    assert record["defects"] == [] and set(record["classes"].values()) == {""}


@pytest.mark.parametrize("block, words", [
    ({"thresholds": [0.5] * 4}, "unknown ['thresholds']; allowed"),
    ({"backend": "tensorflow"}, "unknown backend 'tensorflow'; allowed: ['torch'"),
    ({"score_thresholds": [0.5, 0.5]}, "score_thresholds needs 4 values"),
    ({"min_areas": [0, 0, -1, 0]}, "min_areas needs 4 values >= 0"),
    ({"max_detections": 0}, "max_detections must be a positive integer"),
    ({"fp16": "yes"}, "fp16 must be true or false"),
])
def test_handler_settings_are_validated_early(block, words):
    with pytest.raises(ValueError) as err:
        serve_worker.HandlerSettings.from_mapping(block)
    assert words in str(err.value)


def test_the_shipped_model_config_is_valid():
    import yaml

    config = yaml.safe_load(severstal.serve.MODEL_CONFIG_FILE.read_text())
    settings = serve_worker.HandlerSettings.from_mapping(config["handler"])
    assert settings.backend in (None, "torch") and settings.fp16 is False  # None: follow the archived model file
    # Served answers equal the bare model's: nothing overrides what was saved with the weights by default.
    assert settings.score_thresholds is None and settings.min_areas is None and settings.max_detections is None
    assert config["batchSize"] > 1 and config["maxBatchDelay"] > 0
    # Latency first: a lone request waits the whole maxBatchDelay for companions that are not coming.
    assert config["maxBatchDelay"] <= 10, "a lone request would wait for a batch that is not coming"
    assert config["minWorkers"] <= config["maxWorkers"] and config["responseTimeout"] > 0
    assert settings.threads is None  # each worker keeps PyTorch's default threads


def test_device_follows_gpu_id_only_when_cuda_is_there(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert serve_worker.select_device(None) == "cpu" and serve_worker.select_device(0) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert serve_worker.select_device(1) == "cuda:1" and serve_worker.select_device(None) == "cpu"


def test_shipped_server_properties_are_safe_defaults():
    props = serve_server.read_properties(severstal.serve.PROPERTIES_FILE)
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false"
    assert props["metrics_mode"] == "prometheus"
    assert "http" not in props["allowed_urls"]
    assert int(props["max_request_size"]) >= 10 * 2**20 and int(props["max_response_size"]) >= 10 * 2**20


def test_server_properties_bind_management_and_grpc_to_loopback_and_limit_urls_to_the_store(tmp_path):
    import re

    store = tmp_path / "model store"
    props = serve_server.server_properties(store, "0.0.0.0", 9100, token_auth=True)
    assert props["inference_address"] == "http://0.0.0.0:9100"
    assert props["management_address"] == "http://127.0.0.1:9101"
    assert props["metrics_address"] == "http://0.0.0.0:9102"
    assert (props["grpc_inference_port"], props["grpc_management_port"], props["initial_worker_port"]) == (
        "9103", "9104", "9105")
    assert props["disable_token_authorization"] == "false"
    # allowed_urls survives the properties file's escaping and matches only archives of the store.
    path = tmp_path / "config.properties"
    serve_server.write_properties(props, path)
    allowed = re.compile(serve_server.read_properties(path)["allowed_urls"])
    assert allowed.fullmatch(f"file://{store}/severstal.mar")
    assert not allowed.fullmatch(f"file://{tmp_path}/other/severstal.mar")
    assert not allowed.fullmatch("https://example.com/severstal.mar")


def test_archive_refuses_bad_names_and_runs_without_config(tmp_path, scratch_run):
    with pytest.raises(ValueError, match="model name"):
        serve_archive.archive(scratch_run, tmp_path, name="../evil")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model_final.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        serve_archive.archive(tmp_path / "run", tmp_path)


def test_free_port_block_gives_consecutive_free_ports():
    base = serve_server.free_port_block(6)
    assert all(serve_server._port_free("127.0.0.1", p) for p in range(base, base + 6))


def test_token_authorization_is_on_for_anything_reachable_from_outside(tmp_path):
    assert serve_server.resolve_token_auth("0.0.0.0", None) is True
    assert serve_server.resolve_token_auth("192.168.1.5", None) is True
    assert serve_server.resolve_token_auth("127.0.0.1", None) is False
    assert serve_server.resolve_token_auth("127.0.0.1", True) is True
    keys = {"management": {"key": "m-key"}, "inference": {"key": "i-key"}, "API": {"key": "a-key"}}
    (tmp_path / serve_server.KEY_FILE).write_text(json.dumps(keys))
    server = serve_server.Server(process=None, run_dir=tmp_path, host="0.0.0.0", port=9100, token_auth=True)
    assert server.headers() == {"Authorization": "Bearer i-key"}
    assert server.headers("management") == {"Authorization": "Bearer m-key"}
    assert server.predictions_url() == "http://127.0.0.1:9100/predictions/severstal"
    assert server.management_url == "http://127.0.0.1:9101" and server.metrics_url == "http://127.0.0.1:9102/metrics"


# Isolation: limits of the model and per-image fallback ------------------------------------------------


def test_image_limits_follow_the_models_resize(scratch_run):
    from detectron2.data.transforms import ResizeShortestEdge

    from severstal.model.config import get_severstal_cfg

    cfg = get_severstal_cfg(scratch_run / "config.yaml")
    limits = serve_worker.ImageLimits.from_cfg(cfg)
    # small: shorter side to 128, longer to at most 800; the ROI heads pool from p2..p5 (stride 32).
    assert (limits.short_edge, limits.max_size, limits.min_side) == (128, 800, 32)
    assert limits.max_aspect_ratio == 25.0
    for height, width in [(256, 1600), (2, 20000), (20000, 2), (1, 1), (6000, 6000), (64, 1600), (63, 1600), (7, 99)]:
        assert limits.resized(height, width) == ResizeShortestEdge.get_output_shape(height, width, 128, 800)


@pytest.mark.parametrize("height, width, accepted", [
    (256, 1600, True), (1, 1, True), (6000, 6000, True), (128, 800, True), (64, 1600, True),  # 800x32
    (2, 20000, False), (20000, 2, False), (62, 1600, False), (1600, 62, False), (1, 100, False),
])
def test_image_limits_refuse_what_the_model_cannot_take_and_say_what_is_accepted(scratch_run, height, width,
                                                                                  accepted):
    from severstal.model.config import get_severstal_cfg

    limits = serve_worker.ImageLimits.from_cfg(get_severstal_cfg(scratch_run / "config.yaml"))
    if accepted:
        limits.check(height, width)
        return
    with pytest.raises(serve_worker.BadRequest) as err:
        limits.check(height, width)
    message = str(err.value)
    assert err.value.status == 400
    assert f"the image is {width}x{height} pixels" in message
    assert "under 32 px on its shorter side" in message
    assert "accepted:" in message and "at most 25 times the shorter" in message


def test_a_thin_image_fails_alone_in_the_handler(handler, scratch_run, jpegs):
    thin = encode(Image.new("L", (20000, 2), 90))
    tall = encode(Image.new("RGB", (2, 20000), (90, 90, 90)))
    answers, statuses = handle(handler, make_context(scratch_run),
                               [{"body": jpegs[0]}, {"body": thin}, {"data": tall}, {"body": jpegs[1]}])
    assert statuses == [200, 400, 400, 200]
    check_answer(answers[0], 256, 1600)
    check_answer(answers[3], 256, 1600)
    assert "20000x2 pixels" in answers[1]["message"] and "2x20000 pixels" in answers[2]["message"]


class FlakyPredictor:
    """Stands in for a Predictor: fails on every call that holds an image of ``poison`` height."""

    def __init__(self, cfg, poison: int, error: Exception):
        self.cfg, self.poison, self.error, self.calls = cfg, poison, error, []

    def predict(self, images):
        self.calls.append(len(images))
        if any(image.shape[0] == self.poison for image in images):
            raise self.error
        return [{"height": image.shape[0]} for image in images]


@pytest.mark.parametrize("error, status", [(RuntimeError("shape mismatch"), 500),
                                           (RuntimeError("CPU out of memory"), 507), (MemoryError(), 507)])
def test_when_the_model_fails_on_a_batch_only_the_failing_image_gets_an_error(scratch_run, caplog, error, status):
    from severstal.model.config import get_severstal_cfg

    flaky = FlakyPredictor(get_severstal_cfg(scratch_run / "config.yaml"), poison=77, error=error)
    model = serve_worker.ServingModel(flaky, serve_worker.HandlerSettings())
    bad = serve_worker.BadRequest("empty request body")
    items = [np.zeros((256, 1600, 3), np.uint8), np.zeros((77, 300, 3), np.uint8), bad,
             np.zeros((128, 800, 3), np.uint8)]
    with caplog.at_level("ERROR", logger="severstal.serve.worker"):
        results = model.predict(items)
    assert flaky.calls == [3, 1, 1, 1]  # the batch, then each good image alone
    assert results[0] == {"height": 256} and results[3] == {"height": 128} and results[2] is bad
    failure = results[1]
    assert isinstance(failure, serve_worker.ModelFailure) and failure.status == status
    assert "300x77 image" in str(failure) and "the other requests of its batch were answered" in str(failure)
    assert failure.answer()["type"] == "ModelFailure"
    assert "request 1 of 4, a 300x77 image" in caplog.text


def test_a_lone_failing_image_is_not_predicted_twice(scratch_run):
    from severstal.model.config import get_severstal_cfg

    flaky = FlakyPredictor(get_severstal_cfg(scratch_run / "config.yaml"), poison=77, error=RuntimeError("boom"))
    model = serve_worker.ServingModel(flaky, serve_worker.HandlerSettings())
    [failure] = model.predict([np.zeros((77, 300, 3), np.uint8)])
    assert flaky.calls == [1] and failure.status == 500


def test_a_decoder_failure_of_any_kind_fails_only_its_request(monkeypatch, jpegs):
    def broken(data, source="image"):
        if data == b"poison":
            raise KeyError("unexpected")
        return np.zeros((256, 1600, 3), np.uint8)

    monkeypatch.setattr(serve_worker, "decode_image", broken)
    decoded = serve_worker.decode_batch([{"body": jpegs[0]}, {"body": b"poison"}])
    assert decoded[0].shape == (256, 1600, 3)
    assert isinstance(decoded[1], serve_worker.BadRequest) and decoded[1].status == 400
    assert "could not be decoded as an image (KeyError" in str(decoded[1])


def test_threads_setting_is_validated():
    assert serve_worker.HandlerSettings.from_mapping({"threads": 2}).threads == 2
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="threads must be a positive integer or null"):
            serve_worker.HandlerSettings.from_mapping({"threads": bad})


# The client's retries -----------------------------------------------------------------------------------


@pytest.fixture
def scripted_server():
    """A local HTTP server answering POSTs with the statuses of ``server.script`` in turn (then 200)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the name http.server calls)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status = self.server.script.pop(0) if self.server.script else 200
            body = json.dumps({"height": 1, "width": 1, "defects": [], "classes": {}} if status == 200
                              else {"code": status, "message": self.server.message or f"scripted {status}"}).encode()
            if status != 200 and self.server.message == "plain":  # Ray Serve's proxy for a replica that died
                body = b"Internal Server Error"
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if body.startswith(b"{") else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.script, httpd.message = [], None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_post_image_retries_503_and_507_and_reports_each_retry(scripted_server):
    from severstal.serve.client import post_image

    scripted_server.script = [503, 507, 503]
    url = f"http://127.0.0.1:{scripted_server.server_address[1]}/predictions/severstal"
    seen = []
    answer = post_image(url, b"jpeg", retries=3, backoff=0.01, on_retry=lambda reason, attempt: seen.append(reason))
    assert answer["defects"] == [] and seen == ["503", "507", "503"]


def test_post_image_gives_up_after_its_retries_and_says_so(scripted_server, caplog):
    from severstal.serve.client import PredictionError, post_image

    scripted_server.script = [503] * 5
    url = f"http://127.0.0.1:{scripted_server.server_address[1]}/predictions/severstal"
    with caplog.at_level("WARNING", logger="severstal.serve.client"), pytest.raises(PredictionError) as err:
        post_image(url, b"jpeg", retries=2, backoff=0.01)
    assert err.value.status == 503 and "answered 503 after 3 tries: scripted 503" in str(err.value)
    assert "giving up after 3 tries" in caplog.text and "retry 2 of 2" in caplog.text


def test_post_image_retries_the_batch_of_a_worker_that_died(scripted_server):
    from severstal.serve.client import post_image

    scripted_server.script = [500, 507]
    scripted_server.message = "Worker died."
    url = f"http://127.0.0.1:{scripted_server.server_address[1]}/predictions/severstal"
    seen = []
    answer = post_image(url, b"jpeg", backoff=0.01, on_retry=lambda reason, attempt: seen.append(reason))
    assert answer["defects"] == [] and seen == ["500 worker died", "507 worker died"]


def test_post_image_retries_the_plain_500_of_a_ray_replica_that_died(scripted_server):
    from severstal.serve.client import post_image

    scripted_server.script = [500]
    scripted_server.message = "plain"
    url = f"http://127.0.0.1:{scripted_server.server_address[1]}/predictions/severstal"
    seen = []
    assert post_image(url, b"jpeg", backoff=0.01, on_retry=lambda reason, attempt: seen.append(reason))["defects"] == []
    assert seen == ["500 worker died"]


def test_post_image_on_an_infer_url_sends_the_protocol_and_returns_the_native_answer(scripted_server):
    """The client's Open Inference Protocol side against a scripted server (real servers: tests/test_servers.py)."""
    from severstal.serve.client import PredictionError, model_url, url_protocol

    base = f"http://127.0.0.1:{scripted_server.server_address[1]}"
    assert model_url(base) == f"{base}/predictions/severstal"
    assert model_url(base, "m", "oip") == f"{base}/v2/models/m/infer"
    assert url_protocol(model_url(base, "m", "oip")) == url_protocol(f"{base}/v2/models/m/versions/2/infer") == "oip"
    assert url_protocol(f"{base}/v2/models/m") == url_protocol(f"{base}/predictions/m") == "native"
    with pytest.raises(ValueError, match="allowed: \\['native', 'oip'\\]"):
        model_url(base, protocol="grpc")
    scripted_server.script = [400]
    with pytest.raises(PredictionError, match="answered 400: scripted 400"):
        from severstal.serve.client import post_image

        post_image(model_url(base, protocol="oip"), b"jpeg")


@pytest.mark.parametrize("status", [400, 413, 500])
def test_post_image_never_retries_the_clients_own_errors_or_a_500(scripted_server, status):
    from severstal.serve.client import PredictionError, post_image

    scripted_server.script = [status, 200]
    url = f"http://127.0.0.1:{scripted_server.server_address[1]}/predictions/severstal"
    with pytest.raises(PredictionError, match=f"answered {status}: scripted {status}"):
        post_image(url, b"jpeg", backoff=0.01)
    assert scripted_server.script == [200]


def test_post_image_retries_a_refused_connection_then_gives_up():
    from severstal.serve.client import PredictionError, post_image

    port = serve_server.free_port_block(1)
    seen = []
    with pytest.raises(PredictionError, match="no answer after 3 tries") as err:
        post_image(f"http://127.0.0.1:{port}/predictions/severstal", b"jpeg", retries=2, backoff=0.01,
                   on_retry=lambda reason, attempt: seen.append(reason))
    assert err.value.status is None and seen == ["ConnectionError", "ConnectionError"]


def test_run_until_stopped_stops_on_sigterm_or_when_the_server_ends_by_itself():
    import contextlib
    import os
    import signal

    events = []

    @contextlib.contextmanager
    def fake_server():
        events.append("start")
        yield "server"
        events.append("stop")

    def on_ready(server):
        events.append(f"ready {server}")
        os.kill(os.getpid(), signal.SIGTERM)  # what `kill PID` or a container runtime sends

    previous = signal.getsignal(signal.SIGTERM)
    assert serve_server.run_until_stopped(fake_server(), "fake", on_ready) == 0
    assert events == ["start", "ready server", "stop"]
    assert signal.getsignal(signal.SIGTERM) is previous
    assert serve_server.run_until_stopped(fake_server(), "fake", exited=lambda server: 3) == 3
    assert events[-2:] == ["start", "stop"]

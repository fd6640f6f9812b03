"""The same battery on both servers: TorchServe and Ray Serve, each started on the same model store.

Every test runs against ``severstal serve`` as a library (``running_server`` and ``running_ray_server``), on
loopback with free ports: both routes (native and the Open Inference Protocol, also through ``tritonclient``,
a client no one here wrote), every upload a client can send, refused uploads batched with good ones, a worker
or replica killed under 8 clients, a short soak and ``bench serve``. TorchServe's own parts (its management
API, Prometheus metrics, its processes) are in tests/test_torchserve_e2e.py. About 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import test_torchserve_e2e as torchserve_e2e
from PIL import Image
from test_serving import check_answer, encode, patched_png

from severstal.serve import client as serve_client
from severstal.serve import oip
from severstal.serve import server as serve_server
from severstal.serve import worker as serve_worker

pytestmark = pytest.mark.slow

# The model and the image of tests/test_torchserve_e2e.py: one copy of each fixture.
small_run = torchserve_e2e.small_run
model_store = torchserve_e2e.model_store
jpeg = torchserve_e2e.jpeg

ENGINES = ("torchserve", "ray")


@pytest.fixture(scope="module", params=ENGINES)
def server(request, model_store, tmp_path_factory):
    """A running server of each engine on the same model store (one at a time)."""
    run_dir = tmp_path_factory.mktemp(f"{request.param}_run")
    if request.param == "torchserve":
        with serve_server.running_server(model_store, port=0, run_dir=run_dir, startup_timeout=120) as running:
            yield running
    else:
        from severstal.serve.rayserve import running_ray_server

        with running_ray_server(model_store, port=0, run_dir=run_dir, startup_timeout=300) as running:
            yield running


def test_tritonclient_gets_the_class_masks_of_predictions_and_the_protocols_errors(server, real_data):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(server.inference_url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    for path in sorted((real_data / "train_images").glob("*.jpg"))[:3]:
        body = path.read_bytes()
        native = requests.post(server.predictions_url(), data=body, timeout=120).json()
        image = triton.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([body], dtype=object))
        result = client.infer("severstal", [image], request_id=path.name)
        assert list(result.as_numpy("classes")) == [native["classes"][c] for c in oip.CLASS_IDS], path.name
        assert result.as_numpy("image_size").tolist() == [256, 1600]
        assert result.as_numpy("boxes").shape == (len(native["defects"]), 4)
        assert result.as_numpy("class_ids").tolist() == [d["class_id"] for d in native["defects"]]
        assert result.get_response()["id"] == path.name
        assert oip.record_from_response(result.get_response()) == native
    as_json = triton.InferInput("image", [1], "BYTES")  # base64 in JSON instead of the binary extension
    import base64

    as_json.set_data_from_numpy(np.array([base64.b64encode(body)], dtype=object), binary_data=False)
    assert list(client.infer("severstal", [as_json]).as_numpy("classes")) == [native["classes"][c] for c in "1234"]
    bad = triton.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=object))
    with pytest.raises(InferenceServerException) as refused:
        client.infer("severstal", [bad])
    assert refused.value.status() == "400" and "not an image" in refused.value.message()
    if server.engine == "ray":
        meta = client.get_model_metadata("severstal")
        assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [1]}]
        assert [o["name"] for o in meta["outputs"]] == list(oip.OUTPUTS)
        assert client.is_model_ready("severstal")
    else:  # TorchServe 0.12's REST has no model metadata or readiness route (its gRPC has): docs/serving.md
        with pytest.raises(InferenceServerException):
            client.get_model_metadata("severstal")


def test_a_real_image_as_raw_body_as_multipart_data_and_on_the_open_inference_protocol(server, jpeg):
    raw = requests.post(server.predictions_url(), data=jpeg, timeout=60)
    multipart = requests.post(server.predictions_url(), files={"data": ("image.jpg", jpeg, "image/jpeg")}, timeout=60)
    for response in (raw, multipart):
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        check_answer(response.json(), 256, 1600)
    assert raw.json() == multipart.json() == serve_client.post_image(server.predictions_url(), jpeg)
    assert raw.headers[serve_worker.BACKEND_HEADER] == multipart.headers[serve_worker.BACKEND_HEADER]  # both servers
    infer_url = serve_client.model_url(server.inference_url, protocol="oip")
    assert serve_client.post_image(infer_url, jpeg) == raw.json()


def test_post_image_raises_the_servers_message(server):
    with pytest.raises(RuntimeError, match="answered 400: empty request body"):
        serve_client.post_image(server.predictions_url(), b"")


def test_an_image_of_another_size_is_answered_at_its_size(server, jpeg):
    grey = encode(Image.open(io.BytesIO(jpeg)).convert("L").resize((800, 128)))
    response = requests.post(server.predictions_url(), data=grey, timeout=60)
    assert response.status_code == 200
    check_answer(response.json(), 128, 800)


def test_concurrent_requests_are_batched(server, jpeg):
    n = 8
    all_sizes = []
    for _ in range(4):  # on a loaded machine one burst may arrive spread out; a batch must form within a few
        barrier = threading.Barrier(n)

        def post(_, barrier=barrier):
            barrier.wait()
            return requests.post(server.predictions_url(), data=jpeg, timeout=120)

        with ThreadPoolExecutor(n) as pool:
            responses = list(pool.map(post, range(n)))
        assert [r.status_code for r in responses] == [200] * n
        all_sizes.append([int(r.headers[serve_worker.BATCH_HEADER]) for r in responses])
        if max(all_sizes[-1]) > 1:
            break
    assert max(all_sizes[-1]) > 1, all_sizes


def test_bench_serve_against_the_server(server, real_data, small_run):
    from severstal.bench.serve import bench_serve

    r = bench_serve(server.predictions_url(), real_data / "train_images", concurrency=2, requests=5,
                    weights=small_run, warmup=3)
    assert r["errors"] == 0 and r["requests"] == 5 and r["warmup"] == 3
    served = {"torchserve": "TorchServe", "ray": "Ray Serve"}[server.engine]  # named from GET /v2
    assert [row["method"] for row in r["rows"]] == [served, "bare Predictor.predict"]
    for row in r["rows"]:
        assert 0 < row["p50"] <= row["p95"] <= row["p99"] and row["images_per_s"] > 0
    assert r["overhead"] > 0 and r["throughput_ratio"] > 0
    # The benchmarks switch to the Open Inference Protocol with the URL alone.
    infer_url = serve_client.model_url(server.inference_url, protocol="oip")
    r = bench_serve(infer_url, real_data / "train_images", concurrency=2, requests=3, warmup=1)
    assert r["errors"] == 0 and r["rows"][0]["method"] == served


def image_bytes(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def uploads(jpeg) -> dict[str, tuple[bytes, int, tuple[int, int] | str]]:
    """name -> (body, expected status, (height, width) of the answer or words of the error message)."""
    import numpy as np

    real = Image.open(io.BytesIO(jpeg))
    rng = np.random.default_rng(0)
    grey16 = Image.fromarray((np.asarray(real.convert("L"), dtype=np.uint16) * 256)[:128, :400])
    as_float = Image.fromarray(np.asarray(real.convert("L"), dtype=np.float32)[:128, :400] / 255.0)
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
    return {
        "empty body": (b"", 400, "empty request body"),
        "PDF": (pdf, 400, "not an image"),
        "random bytes": (rng.bytes(50_000), 400, "not an image"),
        "truncated JPEG": (jpeg[: len(jpeg) // 3], 400, "broken image"),
        "decompression bomb": (patched_png(20000, 20000), 400, "decompression bomb"),
        "20000x2": (image_bytes(Image.new("L", (20000, 2), 90), "PNG"), 400, "the image is 20000x2 pixels"),
        "2x20000": (image_bytes(Image.new("RGB", (2, 20000), (90,) * 3), "PNG"), 400, "the image is 2x20000 pixels"),
        "grey PNG": (image_bytes(real.convert("L"), "PNG"), 200, (256, 1600)),
        "RGBA PNG": (image_bytes(real.convert("RGBA"), "PNG"), 200, (256, 1600)),
        "palette PNG": (image_bytes(real.convert("P"), "PNG"), 200, (256, 1600)),
        "16-bit PNG": (image_bytes(grey16, "PNG"), 200, (128, 400)),
        "float TIFF": (image_bytes(as_float, "TIFF"), 200, (128, 400)),
        "BMP": (image_bytes(real.convert("RGB"), "BMP"), 200, (256, 1600)),
        "TIFF": (image_bytes(real.convert("RGB"), "TIFF"), 200, (256, 1600)),
        "WebP": (image_bytes(real.convert("RGB"), "WEBP"), 200, (256, 1600)),
        "GIF": (image_bytes(real.convert("RGB"), "GIF"), 200, (256, 1600)),
        "CMYK JPEG": (image_bytes(real.convert("CMYK"), "JPEG"), 200, (256, 1600)),
        "1x1": (image_bytes(Image.new("L", (1, 1), 90), "PNG"), 200, (1, 1)),
        "6000x6000": (image_bytes(real.convert("L").resize((6000, 6000)), "JPEG", quality=50), 200, (6000, 6000)),
        "1600x64 (the thinnest the small model takes)": (image_bytes(real.crop((0, 0, 1600, 64)), "JPEG"), 200,
                                                         (64, 1600)),
    }


@pytest.mark.parametrize("how", ["raw body", "multipart data"])
def test_every_upload_answers_200_at_its_size_or_4xx_with_a_message_and_no_5xx(server, uploads, how):
    before = server.worker_pids()
    failures = []
    for name, (body, status, expected) in uploads.items():
        if how == "raw body":
            response = requests.post(server.predictions_url(), data=body, timeout=120,
                                     headers={"Content-Type": "application/octet-stream"})
        else:
            response = requests.post(server.predictions_url(), files={"data": ("upload", body)}, timeout=120)
        if response.status_code != status:
            failures.append(f"{name}: {response.status_code} {response.text[:300]}")
        elif status == 200:
            check_answer(response.json(), *expected)
        elif expected not in response.json()["message"]:
            failures.append(f"{name}: message {response.json()['message']!r} lacks {expected!r}")
    assert not failures, failures
    too_large = requests.post(server.predictions_url(), data=b"\0" * (21 * 2**20), timeout=60)
    assert too_large.status_code == 413, too_large.text
    assert server.worker_pids() == before, "an upload restarted the worker"


def test_odd_and_good_uploads_sent_together_every_good_one_is_answered(server, jpeg, uploads):
    """Isolation on a real server: refused uploads share batches with good ones and fail alone."""
    odd = ["20000x2", "2x20000", "empty body", "truncated JPEG", "random bytes"]
    bodies = [jpeg, uploads["20000x2"][0], jpeg, uploads["2x20000"][0], jpeg, uploads["empty body"][0], jpeg,
              uploads["truncated JPEG"][0], jpeg, uploads["random bytes"][0]]
    kinds = ["good" if body is jpeg else odd[[uploads[n][0] for n in odd].index(body)] for body in bodies]
    shared = 0
    for _ in range(6):
        # Two first requests keep the worker busy, so the others queue and are taken as batches.
        with ThreadPoolExecutor(len(bodies) + 2) as pool:
            blockers = [pool.submit(requests.post, server.predictions_url(), data=jpeg, timeout=120) for _ in "ab"]
            responses = list(pool.map(lambda b: requests.post(server.predictions_url(), data=b, timeout=120), bodies))
            assert all(blocker.result().status_code == 200 for blocker in blockers)
        for kind, response in zip(kinds, responses):
            assert response.status_code == (200 if kind == "good" else 400), (kind, response.text)
            if kind == "good":
                check_answer(response.json(), 256, 1600)
        # TorchServe batches requests before the handler decodes them, so refused uploads share batches with good
        # ones; Ray Serve decodes each request before @serve.batch, so they are refused alone and the good ones
        # sent with them still form batches.
        batched = [k != "good" if server.engine == "torchserve" else k == "good" for k in kinds]
        shared += sum(int(r.headers[serve_worker.BATCH_HEADER]) > 1 for b, r in zip(batched, responses) if b)
        if shared:
            break
    assert shared > 0, "no batch formed among the uploads: the test did not test isolation"


def test_a_short_soak_answers_everything_and_samples_the_memory_of_every_process(server, real_data):
    from severstal.bench.soak import soak

    infer_url = serve_client.model_url(server.inference_url, protocol="oip")  # the soak on the protocol's route
    r = soak(infer_url, real_data / "train_images", concurrency=3, duration=6, sample_every=0.5)
    assert r["errors"] == 0 and r["error_statuses"] == {} and r["requests"] == r["ok"] > 0
    assert set(r["latency"]) == {"n", "p50", "p95", "p99", "mean", "images_per_s"}
    assert r["latency"]["p50"] <= r["latency"]["p95"] <= r["latency"]["p99"]
    assert len(r["memory"]) >= 3
    for sample in r["memory"]:
        assert sample["frontend_mb"] > 50 and sample["workers_mb"] > 50 and len(sample["worker_pids"]) == 1
        assert sample["total_mb"] >= sample["frontend_mb"] + sample["workers_mb"] - 0.5  # each rounded to 0.1
    assert r["worker_growth"]["from_mb"] > 0 and r["worker_growth"]["percent"] is not None
    assert r["kill"] is None and len(r["load_average"]) == 3


def test_a_killed_worker_or_replica_under_8_clients_loses_no_request_of_the_package_client(server, real_data):
    """TorchServe restarts its worker, Ray Serve its replica; the client retries what failed meanwhile."""
    from severstal.bench.soak import soak

    before = server.worker_pids()
    r = soak(server.predictions_url(), real_data / "train_images", concurrency=8, duration=20, sample_every=0.5,
             kill_worker_at=3)
    kill = r["kill"]
    assert kill is not None and kill["pid"] in before
    assert kill["lost_by_client"] == 0 and r["errors"] == 0, (r["error_statuses"], kill)
    assert kill["answers_back_after_s"] is not None, "no answer after the kill"
    assert kill["new_worker_pids"] and kill["pid"] not in server.worker_pids()

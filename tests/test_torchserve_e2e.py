"""End to end: archive the scratch model, serve it with a real TorchServe on loopback, call it, stop it.

The server gets free ports and its own run folder (TMPDIR, LOG_LOCATION, METRICS_LOCATION, key file), so
it runs beside any other TorchServe. Needs Java (CI has it); about a minute on 2 CPU cores.
"""

from __future__ import annotations

import io
import ipaddress
import threading
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
from PIL import Image
from test_serving import check_answer, encode, patched_png

from severstal.serve import archive as serve_archive
from severstal.serve import client as serve_client
from severstal.serve import server as serve_server
from severstal.serve import worker as serve_worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_run(scratch_run, tmp_path_factory):
    """The scratch run with at most 10 detections per image: small answers keep the test fast on a CPU."""
    from severstal.model.config import CONFIG_FILE, get_severstal_cfg

    folder = tmp_path_factory.mktemp("small_run")
    cfg = get_severstal_cfg(scratch_run / CONFIG_FILE, ["TEST.DETECTIONS_PER_IMAGE", "10"])
    (folder / CONFIG_FILE).write_text(cfg.dump())
    (folder / "model_final.pth").symlink_to(scratch_run / "model_final.pth")
    return folder


@pytest.fixture(scope="module")
def model_store(small_run, tmp_path_factory):
    store = tmp_path_factory.mktemp("model_store")
    mar = serve_archive.archive(small_run, store, name="severstal", version="1.0")
    assert mar == store / "severstal.mar" and mar.stat().st_size > 1_000_000
    return store


@pytest.fixture(scope="module")
def server(model_store, tmp_path_factory):
    with serve_server.running_server(model_store, port=0, run_dir=tmp_path_factory.mktemp("torchserve_run"),
                                startup_timeout=120) as running:
        yield running


@pytest.fixture(scope="module")
def jpeg(real_data) -> bytes:
    return sorted((real_data / "train_images").glob("*.jpg"))[0].read_bytes()


def workers(server) -> set[int]:
    return {p.pid for p in server.processes() if "model_service_worker" in " ".join(p.cmdline())}


def test_the_server_listens_on_loopback_only_and_has_its_model(server):
    assert server.models == ["severstal"]
    assert not server.token_auth
    listening = {c.laddr for p in server.processes() for c in p.net_connections("inet") if c.status == "LISTEN"}
    for addr in listening:  # Java reports IPv4 as IPv6-mapped addresses
        ip = ipaddress.ip_address(addr.ip)
        assert (getattr(ip, "ipv4_mapped", None) or ip).is_loopback, addr
    assert {server.port, server.port + 1, server.port + 2} <= {addr.port for addr in listening}
    registering = requests.post(f"{server.management_url}/models", params={"url": "severstal.mar"})
    assert registering.status_code == 405  # model API off


def test_a_real_image_as_raw_body_and_as_multipart_data(server, jpeg):
    raw = requests.post(server.predictions_url(), data=jpeg, timeout=60)
    multipart = requests.post(server.predictions_url(), files={"data": ("image.jpg", jpeg, "image/jpeg")}, timeout=60)
    for response in (raw, multipart):
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        check_answer(response.json(), 256, 1600)
    assert raw.json() == multipart.json() == serve_client.post_image(server.predictions_url(), jpeg)


def test_post_image_raises_the_servers_message(server):
    with pytest.raises(RuntimeError, match="answered 400: empty request body"):
        serve_client.post_image(server.predictions_url(), b"")


def test_bad_inputs_answer_4xx_and_the_worker_stays_up(server, jpeg):
    before = workers(server)
    url = server.predictions_url()
    cases = {
        "empty body": (dict(data=b""), 400),
        "text": (dict(data="not an image", headers={"Content-Type": "text/plain"}), 415),
        "JSON": (dict(json={"image": "x"}), 415),
        "multipart without 'data'": (dict(files={"file": ("a.jpg", jpeg)}), 400),
        "truncated JPEG": (dict(data=jpeg[:4000]), 400),
        "decompression bomb (64 Mpx)": (dict(data=patched_png(8000, 8000)), 400),
        "decompression bomb (400 Mpx)": (dict(data=patched_png(20000, 20000)), 400),
    }
    for name, (kwargs, status) in cases.items():
        response = requests.post(url, timeout=60, **kwargs)
        assert response.status_code == status, (name, response.text)
        body = response.json()
        assert body["code"] == status and body["message"], name
    too_large = requests.post(url, data=b"\0" * (20 * 2**20 + 1), timeout=60)
    assert too_large.status_code == 413
    good = requests.post(url, data=jpeg, timeout=60)
    assert good.status_code == 200
    check_answer(good.json(), 256, 1600)
    assert workers(server) == before, "a bad request must not restart the worker"


def test_an_image_of_another_size_is_answered_at_its_size(server, jpeg):
    grey = encode(Image.open(io.BytesIO(jpeg)).convert("L").resize((800, 128)))
    response = requests.post(server.predictions_url(), data=grey, timeout=60)
    assert response.status_code == 200
    check_answer(response.json(), 128, 800)


def test_concurrent_requests_are_batched(server, jpeg):
    n = 8
    barrier = threading.Barrier(n)

    def post(_):
        barrier.wait()
        return requests.post(server.predictions_url(), data=jpeg, timeout=120)

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(post, range(n)))
    assert [r.status_code for r in responses] == [200] * n
    sizes = [int(r.headers[serve_worker.BATCH_HEADER]) for r in responses]
    assert max(sizes) > 1, sizes


def test_metrics_show_the_handler_metrics(server):
    text = requests.get(server.metrics_url, timeout=10).text
    for name in (serve_worker.INFERENCE_METRIC, serve_worker.BATCH_METRIC):
        assert f'{name}{{ModelName="severstal"' in text, name
    assert "ts_inference_requests_total" in text


def test_bench_serve_against_the_server(server, real_data, small_run):
    from severstal.bench.serve import bench_serve

    r = bench_serve(server.predictions_url(), real_data / "train_images", concurrency=2, requests=5,
                    weights=small_run)
    assert r["errors"] == 0 and r["requests"] == 5
    assert [row["method"] for row in r["rows"]] == ["TorchServe", "bare Predictor.predict"]
    for row in r["rows"]:
        assert 0 < row["p50"] <= row["p95"] <= row["p99"] and row["images_per_s"] > 0
    assert r["overhead"] > 0 and r["throughput_ratio"] > 0


# Every upload a client can send --------------------------------------------------------------------------


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
    before = workers(server)
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
    assert workers(server) == before, "an upload restarted the worker"


def test_content_types_curl_users_send(server, jpeg):
    url = server.predictions_url()
    for content_type in ("image/jpeg", "image/png", "application/octet-stream"):
        response = requests.post(url, data=jpeg, headers={"Content-Type": content_type}, timeout=60)
        assert response.status_code == 200, (content_type, response.text)
    put = requests.put(url, data=jpeg, timeout=60)  # curl -T sends PUT
    assert put.status_code == 200, put.text
    # curl --data-binary without a Content-Type labels the body as a form: TorchServe's frontend answers
    # before the handler (documented in the README's troubleshooting: send a Content-Type).
    form = requests.post(url, data=jpeg, headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
    assert form.status_code != 200


def test_odd_and_good_uploads_sent_together_every_good_one_is_answered(server, jpeg, uploads):
    """Isolation on a real server: refused uploads share batches with good ones and fail alone."""
    odd = ["20000x2", "2x20000", "empty body", "truncated JPEG", "random bytes"]
    bodies = [jpeg, uploads["20000x2"][0], jpeg, uploads["2x20000"][0], jpeg, uploads["empty body"][0], jpeg,
              uploads["truncated JPEG"][0], jpeg, uploads["random bytes"][0]]
    kinds = ["good" if body is jpeg else odd[[uploads[n][0] for n in odd].index(body)] for body in bodies]
    shared = 0
    for _ in range(3):
        # A first request keeps the worker busy, so the others queue and are taken as batches.
        with ThreadPoolExecutor(len(bodies) + 1) as pool:
            blocker = pool.submit(requests.post, server.predictions_url(), data=jpeg, timeout=120)
            responses = list(pool.map(lambda b: requests.post(server.predictions_url(), data=b, timeout=120), bodies))
            assert blocker.result().status_code == 200
        for kind, response in zip(kinds, responses):
            assert response.status_code == (200 if kind == "good" else 400), (kind, response.text)
            if kind == "good":
                check_answer(response.json(), 256, 1600)
        shared += sum(int(r.headers[serve_worker.BATCH_HEADER]) > 1 for k, r in zip(kinds, responses) if k != "good")
    assert shared > 0, "no refused upload was batched with others: the test did not test isolation"


# Under load: a soak and a killed worker ------------------------------------------------------------------


def test_a_short_soak_answers_everything_and_samples_the_memory_of_every_process(server, real_data):
    from severstal.bench.soak import soak

    r = soak(server.predictions_url(), real_data / "train_images", concurrency=3, duration=6, sample_every=0.5)
    assert r["errors"] == 0 and r["error_statuses"] == {} and r["requests"] == r["ok"] > 0
    assert set(r["latency"]) == {"n", "p50", "p95", "p99", "mean", "images_per_s"}
    assert r["latency"]["p50"] <= r["latency"]["p95"] <= r["latency"]["p99"]
    assert len(r["memory"]) >= 3
    for sample in r["memory"]:
        assert sample["frontend_mb"] > 50 and sample["workers_mb"] > 50 and len(sample["worker_pids"]) == 1
        assert sample["total_mb"] >= sample["frontend_mb"] + sample["workers_mb"] - 0.5  # each rounded to 0.1
    assert r["worker_growth"]["from_mb"] > 0 and r["worker_growth"]["percent"] is not None
    assert r["kill"] is None and len(r["load_average"]) == 3


def test_a_killed_worker_loses_no_request_of_the_package_client(server, real_data):
    from severstal.bench.soak import soak

    before = workers(server)
    r = soak(server.predictions_url(), real_data / "train_images", concurrency=4, duration=12, sample_every=0.5,
             kill_worker_at=2)
    kill = r["kill"]
    assert kill is not None and kill["pid"] in before
    assert kill["lost_by_client"] == 0 and r["errors"] == 0, (r["error_statuses"], kill)
    assert kill["answers_back_after_s"] is not None, "no answer after the kill"
    assert kill["new_worker_pids"] and kill["pid"] not in workers(server)


def test_stop_ends_every_process(server):
    procs = server.processes()
    assert len(procs) >= 3  # wrapper, Java frontend, a worker
    server.stop()
    assert server.process.returncode is not None
    for proc in procs:
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, proc

"""End to end: archive the scratch model, serve it with a real TorchServe on loopback, call it, stop it.

The server gets free ports and its own run folder (TMPDIR, LOG_LOCATION, METRICS_LOCATION, key file), so
it runs beside any other TorchServe. Needs Java (CI has it); about a minute on 2 CPU cores.
"""

from __future__ import annotations

import ipaddress

import psutil
import pytest
import requests
from test_serving import check_answer, patched_png

from severstal.serve import archive as serve_archive
from severstal.serve import server as serve_server
from severstal.serve import worker as serve_worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_run(scratch_run, tmp_path_factory):
    """The scratch run with at most 10 detections per image: small answers keep the test fast on a CPU."""
    from severstal.model.run import copy_run

    return copy_run(scratch_run, tmp_path_factory.mktemp("small_run"), ["TEST.DETECTIONS_PER_IMAGE", "10"])


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


def test_bad_inputs_answer_4xx_and_the_worker_stays_up(server, jpeg):
    before = server.worker_pids()
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
    assert server.worker_pids() == before, "a bad request must not restart the worker"


def test_metrics_show_the_handler_metrics(server):
    text = requests.get(server.metrics_url, timeout=10).text
    for name in (serve_worker.INFERENCE_METRIC, serve_worker.BATCH_METRIC):
        assert f'{name}{{ModelName="severstal"' in text, name
    assert "ts_inference_requests_total" in text


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


def test_stop_ends_every_process(server):
    procs = server.processes()
    assert len(procs) >= 3  # wrapper, Java frontend, a worker
    server.stop()
    assert server.process.returncode is not None
    for proc in procs:
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, proc

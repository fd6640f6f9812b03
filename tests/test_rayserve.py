"""The Ray Serve engine's pieces without Ray running: the model store, the application's settings, the CLI.
A real Ray Serve answers the battery of tests/test_servers.py."""

from __future__ import annotations

import shutil

import pytest

from severstal.serve import archive as serve_archive


@pytest.fixture(scope="module")
def store(scratch_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray_store")
    serve_archive.archive(scratch_run, folder, name="severstal", version="2.5")
    return folder


def test_an_archive_is_read_as_torchserve_reads_it(store):
    from severstal.serve.rayserve import read_store

    model = read_store(store)
    assert (model.name, model.version, model.serialized_file) == ("severstal", "2.5", "model_final.pth")
    assert {"model_final.pth", "config.yaml", "model-config.yaml"} <= set(model.files)
    assert "handler.py" not in model.files  # the replica uses the package, not the archived handler
    assert (model.batch_size, model.batch_wait_s, model.workers) == (4, 0.001, 1)  # the shipped model-config.yaml


def test_the_store_must_hold_the_model_asked_for(store, tmp_path):
    from severstal.serve.rayserve import read_store

    with pytest.raises(FileNotFoundError, match="no .mar archives"):
        read_store(tmp_path)
    shutil.copy(store / "severstal.mar", tmp_path / "other.mar")
    (tmp_path / "broken.mar").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a .mar archive"):
        read_store(tmp_path)
    (tmp_path / "broken.mar").unlink()
    assert read_store(tmp_path, "severstal").name == "severstal"
    with pytest.raises(ValueError, match="holds \\['severstal'\\]: name one with --model"):
        read_store(tmp_path, "nope")


@pytest.mark.parametrize("kwargs, words", [({"replicas": 0}, "replicas must be >= 1"),
                                           ({"replicas": 3, "max_replicas": 2}, "max_replicas >= replicas"),
                                           ({"cpus": 0}, "cpus per replica must be > 0")])
def test_replica_settings_are_validated(store, kwargs, words):
    from severstal.serve.rayserve import build_app, read_store

    with pytest.raises(ValueError, match=words):
        build_app(read_store(store), **kwargs)


def test_fixed_replicas_batching_and_resources_reach_the_deployment(store):
    from severstal.serve.rayserve import build_app, read_store
    from severstal.serve.server import WORKER_ENV

    deployment = build_app(read_store(store), replicas=2, cpus=0.5, gpus=0.25)._bound_deployment
    config = deployment._deployment_config
    assert config.num_replicas == 2 and config.autoscaling_config is None
    options = deployment.ray_actor_options
    assert (options["num_cpus"], options["num_gpus"]) == (0.5, 0.25)
    assert options["runtime_env"]["env_vars"] == WORKER_ENV
    assert deployment.init_args[1:] == (None, True, 20 * 2**20)  # no token, a GPU, TorchServe's max_request_size


def test_the_cli_serves_with_ray_on_the_same_options():
    from severstal.cli import build_parser

    args = build_parser().parse_args(["serve", "--model-store", "store", "--engine", "ray", "--replicas", "2",
                                      "--max-replicas", "4", "--replica-cpus", "1.5", "--address", "auto"])
    assert (args.engine, args.replicas, args.max_replicas, args.replica_cpus) == ("ray", 2, 4, 1.5)
    assert args.address == "auto"
    assert args.host == "127.0.0.1" and args.token_auth is None  # loopback and no key unless told otherwise
    assert build_parser().parse_args(["serve", "--model-store", "s"]).engine == "torchserve"


@pytest.mark.slow
def test_two_replicas_on_a_two_node_local_ray_serve_the_same_answers(store, real_data, tmp_path):
    """Two nodes of one CPU each on this machine (``ray.cluster_utils.Cluster``, as Ray's own tests do), one
    replica of one CPU on each: 8 clients keep both busy and every image gets the same answer from either. With
    token authorization on, a request without the key from ``key_file.json`` answers 401."""
    from concurrent.futures import ThreadPoolExecutor

    import ray
    import requests
    from ray import serve
    from ray.cluster_utils import Cluster

    from severstal.serve.rayserve import REPLICA_HEADER, running_ray_server

    bodies = [p.read_bytes() for p in sorted((real_data / "train_images").glob("*.jpg"))[:3]]
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        with running_ray_server(store, port=0, replicas=2, cpus=1, address=cluster.address, run_dir=tmp_path,
                                token_auth=True, startup_timeout=300) as server:
            assert len(server.worker_pids()) == 2
            assert (tmp_path / "key_file.json").stat().st_mode & 0o777 == 0o600
            refused = requests.post(server.predictions_url(), data=bodies[0], timeout=60)
            assert refused.status_code == 401, refused.text  # the bearer key is asked for, as on TorchServe

            def post(index: int):
                response = requests.post(server.predictions_url(), data=bodies[index % 3], timeout=120,
                                         headers=server.headers())
                assert response.status_code == 200, response.text
                return index % 3, response.headers[REPLICA_HEADER], response.json()

            with ThreadPoolExecutor(8) as pool:  # more than one replica holds (a batch): both nodes work
                answers = list(pool.map(post, range(32)))
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    nodes = {replica.split("/")[0] for _, replica, _ in answers}
    assert len(nodes) == 2, "both nodes should have answered"
    for image in range(3):
        same_image = [answer for index, _, answer in answers if index == image]
        assert all(answer == same_image[0] for answer in same_image), f"image {image}: replicas disagree"


def call(replica, method: str, path: str, headers: dict | None = None, body: bytes = b""):
    """Run the replica's ``__call__`` on a Starlette request built by hand; (status, JSON body)."""
    import asyncio
    import json

    from starlette.requests import Request

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "scheme": "http", "server": ("127.0.0.1", 8000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    response = asyncio.run(replica(Request(scope, receive)))
    return response.status_code, json.loads(response.body)


@pytest.fixture
def replica(store):
    """A replica without Ray and without a model: the routes that need no prediction."""
    from severstal.serve.rayserve import SeverstalReplica, read_store

    instance = SeverstalReplica.__new__(SeverstalReplica)  # no __init__: no model loaded
    instance.model, instance.token, instance.max_request_size = read_store(store), "k", 100
    instance.answer_headers = {}
    return instance


def test_every_route_needs_the_bearer_key_when_there_is_one(replica):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}):
        status, body = call(replica, "GET", "/ping", headers)
        assert status == 401 and "key_file.json" in body["message"], headers
    assert call(replica, "GET", "/ping", {"Authorization": "Bearer k"}) == (200, {"status": "Healthy"})
    replica.token = None
    assert call(replica, "GET", "/v2/health/live") == (200, {"live": True})


def test_the_open_inference_protocols_routes_and_the_native_404s(replica):
    from severstal.serve import oip

    replica.token = None
    assert call(replica, "GET", "/v2/models/severstal") == (200, oip.model_metadata("severstal", ["2.5"]))
    assert call(replica, "GET", "/v2/models/severstal/versions/2.5/ready") == (200, {"name": "severstal",
                                                                                     "ready": True})
    assert call(replica, "GET", "/v2/models/severstal/versions/9/ready")[0] == 404
    status, body = call(replica, "GET", "/v2/models/other")
    assert status == 404 and "this server has 'severstal'" in body["error"]
    status, body = call(replica, "POST", "/predictions/other", body=b"x")
    assert status == 404 and body["message"] == "Model not found: other"
    status, body = call(replica, "GET", "/predictions/severstal")
    assert status == 404 and "POST /predictions/severstal" in body["message"]


def test_a_body_over_the_limit_answers_413_in_each_protocol(replica):
    replica.token = None
    status, body = call(replica, "POST", "/predictions/severstal", {"Content-Length": "101"}, b"x" * 101)
    assert status == 413 and "over the limit of 100" in body["message"]
    status, body = call(replica, "POST", "/v2/models/severstal/infer", {"Content-Length": "101"}, b"x" * 101)
    assert status == 413 and set(body) == {"error"}

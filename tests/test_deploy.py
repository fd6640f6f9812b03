"""deploy/rayservice.yaml checked against schemas, not run: Ray Serve's own config schema for ``serveConfigV2``
(what KubeRay hands to Ray), kubernetes-validate for every Kubernetes object in it (the pod templates of the
head and workers, the NetworkPolicy), and the application builder it names, built on a real model store."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "rayservice.yaml"
KUBERNETES = "1.37.0"
"""The Kubernetes version the objects are validated against (kubernetes-validate's newest schemas)."""


@pytest.fixture(scope="module")
def documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


@pytest.fixture(scope="module")
def rayservice(documents) -> dict:
    [service] = [d for d in documents if d["kind"] == "RayService"]
    return service


def validate(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_the_rayservice_is_a_kuberay_v1_resource_with_a_head_and_workers(rayservice):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["metadata"]["name"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"  # the pinned Ray
    assert set(cluster) == {"rayVersion", "headGroupSpec", "workerGroupSpecs"}
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_serve_config_passes_ray_serves_schema_and_names_the_projects_builder(rayservice):
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    [application] = config.applications
    assert application.import_path == "severstal.serve.rayserve:app"
    assert application.args["model_store"] == "/models"


def test_every_pod_template_and_kubernetes_object_passes_kubernetes_validate(documents, rayservice):
    cluster = rayservice["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for index, template in enumerate(templates):
        validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"group-{index}"},
                  "template": template})
    others = [d for d in documents if d["kind"] != "RayService"]
    assert [d["kind"] for d in others] == ["NetworkPolicy"]
    for obj in others:
        validate(obj)


def test_kubernetes_validate_catches_a_mistake_in_a_pod_template(rayservice):
    from kubernetes_validate import ValidationError

    template = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    broken = {"spec": {"containers": [{**template["spec"]["containers"][0], "ports": [{"containerPort": "http"}]}]}}
    with pytest.raises(ValidationError):
        validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "broken"}, "template": broken})


def test_the_head_takes_the_bearer_key_from_a_secret(rayservice):
    from severstal.serve.rayserve import TOKEN_ENV

    [head] = rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    [env] = [e for e in head["env"] if e["name"] == TOKEN_ENV]
    assert "secretKeyRef" in env["valueFrom"]


def test_the_builder_makes_the_application_from_a_model_store(tmp_path, scratch_run, monkeypatch):
    from severstal.serve.archive import archive
    from severstal.serve.rayserve import app

    archive(scratch_run, tmp_path, name="severstal")
    monkeypatch.setenv("SEVERSTAL_SERVE_TOKEN", "k")
    application = app({"model_store": str(tmp_path), "replicas": 2, "max_replicas": 4, "cpus": 2, "gpus": 0})
    deployment = application._bound_deployment
    assert deployment.name == "severstal"
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
    stored, token = deployment.init_args[:2]
    assert stored.name == "severstal" and token == "k"
    with pytest.raises(ValueError, match="unknown \\['replica'\\]"):
        app({"model_store": str(tmp_path), "replica": 2})

"""The wheel serves: built from the sources, installed into a fresh virtual environment (reusing the heavy
dependencies already installed here), it archives and serves a real image from a folder outside the checkout."""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the sources (the checkout gets no build/ or egg-info)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "severstal", src / "severstal", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True)
    return next(out.glob("severstal-*.whl"))


@pytest.fixture(scope="module")
def fresh_env(wheel, tmp_path_factory) -> Path:
    """A new venv holding only the wheel, then given this environment's packages (torch, Detectron2, TorchServe)."""
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Appended after the venv's own site-packages, whose severstal (the wheel's) therefore comes first.
    (Path(site) / "reuse_heavy_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


def test_the_wheel_carries_the_torchserve_files_and_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"severstal/serve/torchserve/handler.py", "severstal/serve/torchserve/model-config.yaml",
            "severstal/serve/torchserve/config.properties", "severstal/model/configs/small.yaml"} <= names
    assert not any(name.startswith(("tools/", "tests/")) for name in names)


@pytest.mark.slow
def test_the_installed_wheel_archives_and_serves_outside_the_checkout(fresh_env, scratch_run, real_data, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(fresh_env / "bin" / "python"), "-c", "import severstal; print(severstal.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    assert Path(where).resolve().is_relative_to(fresh_env.resolve())

    severstal = str(fresh_env / "bin" / "severstal")
    subprocess.run([severstal, "archive", "--weights", str(scratch_run), "--out", "store"], cwd=work, env=env,
                   check=True, capture_output=True)
    assert (work / "store" / "severstal.mar").is_file()
    server = subprocess.Popen([severstal, "serve", "--model-store", "store", "--port", "0", "--run-dir", "run"],
                              cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        url, deadline = None, time.monotonic() + 240
        while url is None and time.monotonic() < deadline and server.poll() is None:
            line = server.stdout.readline()
            if line.startswith("POST an image to "):
                url = line.removeprefix("POST an image to ").split()[0]  # the native route, then the protocol's
        assert url, f"no READY server; exit code {server.poll()}"
        image = next((real_data / "train_images").glob("*.jpg"))
        response = requests.post(url, data=image.read_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=120)
        assert response.status_code == 200, response.text
        assert {"height": 256, "width": 1600}.items() <= json.loads(response.text).items()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert server.returncode == 0

"""An archive of a training run carries its faster exports, and a CPU worker serves the fastest and says which."""

from __future__ import annotations

import shutil
import zipfile

import pytest

from severstal.data.images import read_image
from severstal.serve.archive import archive, export_for_serving
from severstal.serve.worker import ServingModel


@pytest.fixture(scope="module")
def run_copy(low_floor_run, tmp_path_factory):
    """A copy of the low-floor run (its ``export/`` folder is written into the run)."""
    folder = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(low_floor_run, folder)
    return folder


def test_a_run_archive_packs_its_exports_and_the_cpu_worker_runs_the_fastest(run_copy, real_data, tmp_path):
    made, int8 = export_for_serving(run_copy, calibration=real_data / "train_images")
    names = [p.name for p in made]
    assert names[0] == "model.onnx" and set(names) <= {"model.onnx", "model-int8.onnx"}
    assert int8["kept"] == ("model-int8.onnx" in names)
    mtimes = [p.stat().st_mtime for p in made]
    assert export_for_serving(run_copy, calibration=real_data / "train_images")[0] == made  # newer than the weights
    assert [p.stat().st_mtime for p in made] == mtimes
    mar = archive(run_copy / "model_final.pth", tmp_path / "store", also=made)
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(mar) as packed:
        packed.extractall(unpacked)
        assert {"model_final.pth", "config.yaml", *names} <= set(packed.namelist())
    fastest = ServingModel.load(unpacked, "model_final.pth")
    assert fastest.runs == ("onnxruntime int8" if "model-int8.onnx" in names else "onnxruntime fp32")
    on_request = ServingModel.load(unpacked, "model_final.pth", handler_block={"backend": "torch"})
    assert on_request.runs == "torch fp32"
    image = read_image(sorted((real_data / "train_images").glob("*.jpg"))[0])
    assert fastest.predict([image])[0]["height"] == 256


def test_weights_trained_again_are_exported_again(run_copy, real_data):
    import os

    made, _ = export_for_serving(run_copy, calibration=real_data / "train_images")
    weights_time = (run_copy / "model_final.pth").stat().st_mtime
    for path in made:  # as if the weights were trained again after these exports
        os.utime(path, (weights_time - 60, weights_time - 60))
    again, _ = export_for_serving(run_copy, calibration=real_data / "train_images")
    assert [p.name for p in again] == [p.name for p in made]
    assert all(p.stat().st_mtime >= weights_time for p in again)

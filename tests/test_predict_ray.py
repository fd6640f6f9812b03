"""Ray prediction: on a local 2-CPU Ray, the same submission as one process, unreadable files included."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("ray", reason="Ray is installed by make install (the dev extra): pip install 'severstal[ray]'")

from severstal.data.annotations import read_submission  # noqa: E402
from severstal.model.predict import predict_folder  # noqa: E402
from severstal.model.predict_ray import connect, list_image_uris, plan_pool, predict_ray  # noqa: E402

BAD = ("0000broken.jpg", "empty.jpg", "notes.png")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs shared by this module's tests (predict_ray uses it and leaves it running)."""
    import ray

    started = connect(num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def images(real_data, tmp_path_factory):
    """12 real images (symlinks) and three unreadable files: truncated, empty, not an image."""
    folder = tmp_path_factory.mktemp("ray_images")
    sources = sorted((real_data / "train_images").glob("*.jpg"))[:12]
    for path in sources:
        (folder / path.name).symlink_to(path)
    (folder / BAD[0]).write_bytes(sources[0].read_bytes()[:2000])
    (folder / BAD[1]).write_bytes(b"")
    (folder / BAD[2]).write_text("not an image")
    return folder


@pytest.fixture
def one_thread():
    """PyTorch on one thread, as each actor of a 2-CPU pool: the same arithmetic, so the same bits."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ray_writes_the_same_submission_as_one_process(local_ray, images, scratch_run, tmp_path, one_thread):
    import pandas as pd

    # Batch size 1 on both sides: floating-point sums may differ with the batch's size and make one pixel
    # on a mask's edge flip; the same images in the same batches give the same rows bit for bit.
    single = predict_folder(scratch_run, images, tmp_path / "single.csv", batch_size=1)
    ray_summary = predict_ray(scratch_run, str(images), tmp_path / "ray.csv", batch_size=1, actors=2,
                              cpus_per_actor=0.5, parquet=str(tmp_path / "records"), progress=False)
    assert single["masks"] > 0, "the scratch model should give masks to compare"
    assert (tmp_path / "ray.csv").read_text() == (tmp_path / "single.csv").read_text()
    assert ray_summary["unreadable"] == single["unreadable"]
    assert [u["image"] for u in ray_summary["unreadable"]] == list(BAD)
    assert ray_summary["pool"] == {"actors": 2, "cpus_per_actor": 0.5, "gpus_per_actor": 0.0, "threads": 1,
                                   "device": "cpu"}

    records = pd.read_parquet(tmp_path / "records").sort_values("image_id").reset_index(drop=True)
    assert records["image_id"].tolist() == read_submission(tmp_path / "single.csv").image_ids
    broken = records[records["image_id"].isin(BAD)]
    assert broken["error"].notna().all() and broken["height"].isna().all()
    good = records[~records["image_id"].isin(BAD)]
    assert good["error"].isna().all() and (good["height"] == 256).all() and (good["width"] == 1600).all()
    defects = [d for row in good["defects"] for d in row]
    assert defects and all(len(d["bbox"]) == 4 and d["area"] > 0 and d["rle"] for d in defects)


def test_a_glob_and_the_old_format(local_ray, images, scratch_run, tmp_path):
    summary = predict_ray(scratch_run, str(images / "0*.jpg"), tmp_path / "glob.csv", fmt="old", batch_size=3,
                          actors=1, cpus_per_actor=1, progress=False)
    expected = sorted(p.name for p in images.glob("0*.jpg"))
    assert read_submission(tmp_path / "glob.csv").image_ids == expected
    assert summary["images"] == len(expected) and [u["image"] for u in summary["unreadable"]] == [BAD[0]]


def test_listing_folders_globs_and_name_clashes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("a/x.jpg", "a/y.PNG", "a/notes.txt", "b/x.jpg"):
        (tmp_path / name).write_bytes(b"")
    _, paths = list_image_uris(str(tmp_path / "a"))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["x.jpg", "y.PNG"]
    _, paths = list_image_uris(f"file://{tmp_path}/a/")
    assert [p.rsplit("/", 1)[1] for p in paths] == ["x.jpg", "y.PNG"]
    with pytest.raises(ValueError, match="x.jpg"):
        list_image_uris(str(tmp_path / "*" / "*.jpg"))
    with pytest.raises(FileNotFoundError, match="no images"):
        list_image_uris(str(tmp_path / "absent"))


def test_the_pool_leaves_cpus_for_reading():
    assert plan_pool({"CPU": 2.0}) == {"actors": 1, "cpus_per_actor": 1.5, "gpus_per_actor": 0.0, "threads": 2,
                                       "device": "cpu"}
    assert plan_pool({"CPU": 2.0}, actors=2)["cpus_per_actor"] == 0.75
    assert plan_pool({"CPU": 64.0, "GPU": 8.0}) == {"actors": 8, "cpus_per_actor": 1.0, "gpus_per_actor": 1.0,
                                                    "threads": 1, "device": "cuda"}
    assert plan_pool({"CPU": 64.0, "GPU": 8.0}, gpus_per_actor=0)["device"] == "cpu"
    with pytest.raises(ValueError, match="leave no CPU to read"):
        plan_pool({"CPU": 2.0}, actors=2, cpus_per_actor=1)
    with pytest.raises(ValueError, match="the cluster has 0 GPUs"):
        plan_pool({"CPU": 2.0}, gpus_per_actor=1)
    with pytest.raises(ValueError, match="actors >= 1"):
        plan_pool({"CPU": 2.0}, actors=0)


def test_ray_stays_out_of_import_severstal_and_the_other_commands():
    code = ("import sys, severstal, severstal.cli, severstal.model.predict, severstal.model.train; "
            "from severstal.cli import main; main(['predict', '--help'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    code = ("import sys, severstal.cli, severstal.model.predict, severstal.model.train; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False" and "--ray" in done.stdout


@pytest.mark.slow
def test_the_cli_starts_its_own_ray_and_exits_3_on_unreadable_files(images, scratch_run, tmp_path):
    out = tmp_path / "submission.csv"
    done = subprocess.run([sys.executable, "-m", "severstal.cli", "predict", "--weights", str(scratch_run),
                           "--images", str(images), "--out", str(out), "--ray", "--actors", "2",
                           "--cpus-per-actor", "0.5"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "ray: 2 actors x (0.5 CPU, 0 GPU, 1 threads)" in done.stdout
    for name in BAD:
        assert f"unreadable: {images / name}" in done.stderr
    assert read_submission(out).image_ids == sorted(p.name for p in images.iterdir())


@pytest.mark.slow
def test_the_benchmark_compares_ray_with_one_process_on_the_same_images(local_ray, real_data, scratch_run, capsys):
    from severstal.bench.ray import bench_ray

    r = bench_ray(scratch_run, real_data / "train_images", batch_size=2, limit=3, actors=1, cpus_per_actor=1,
                  repeats=1)
    assert [row["method"] for row in r["rows"]] == ["single process", "single process + model load", "ray, whole run",
                                                    "ray, fixed cost (1 image)", "ray, steady (run - fixed)"]
    assert r["images"] == 3 and r["identical"] and r["ratio"] == r["rows"][4]["vs_single"] > 0
    assert r["rows"][0]["vs_single"] == 1.0 and len(r["load_average"]["before"]) == 3
    assert r["pool"]["actors"] == 1

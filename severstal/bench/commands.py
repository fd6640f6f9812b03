"""The benchmarks as ``severstal bench NAME`` runs them: each one's options, its call and its report.

A report is lines and tables in print order (:func:`render`, one table printer for every benchmark); a benchmark
whose result holds a failure (:attr:`Benchmark.failure`) exits with status 1. This module imports no benchmark until
one runs, so that ``severstal --help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from severstal.bench import WARMUP_REQUESTS


class Table(NamedTuple):
    """Rows and ``(key, format_spec)`` columns, as :func:`severstal.bench.format_table` takes them."""

    rows: Sequence[dict]
    columns: Sequence[tuple[str, str]]


Report = list["str | Table"]
"""What a benchmark prints: lines and tables, in order."""


class Benchmark(NamedTuple):
    """One ``severstal bench NAME``.

    Attributes:
        help: one line for ``severstal bench --help``.
        add_arguments: adds its options (``--json`` is added for every benchmark).
        run: calls the benchmark with the parsed options; returns its result dict.
        report: the result as :data:`Report`.
        failure: why the result is a failure (exit status 1), or None.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]
    report: Callable[[dict], Report]
    failure: Callable[[dict], str | None] = lambda r: None


def render(report: Report) -> str:
    """The text of a report: its lines, and each table laid out by :func:`severstal.bench.format_table`."""
    from severstal.bench import format_table

    return "\n".join(format_table(*part) if isinstance(part, Table) else part for part in report)


LATENCY = [("p50", ".3f"), ("p95", ".3f"), ("p99", ".3f"), ("mean", ".3f")]
"""Latency columns (seconds) of the serving benchmarks."""


def _errors(r: dict) -> str:
    return f"errors: {r['errors']}" + (f" {r['error_statuses']}" if r["errors"] else "")


def _failed_requests(r: dict) -> str | None:
    return f"{r['errors']} requests failed" if r["errors"] else None


def _load(r: dict) -> str:
    load = r["load_average"]
    return f"load average {load['before'][0]:.2f} -> {load['after'][0]:.2f}"


# convert ---------------------------------------------------------------------------------------------------------

def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", type=Path, help="train.csv (default: the real masks in ../shared/data/severstal-real)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each pipeline; the median counts")
    parser.add_argument("--limit", type=int, help="only the first N masks")


def _convert(args: argparse.Namespace) -> dict:
    from severstal.bench.convert import bench_convert, real_train_csv

    return bench_convert(args.csv or real_train_csv(), repeats=args.repeats, limit=args.limit)


def _convert_report(r: dict) -> Report:
    return [f"convert: {r['masks']} masks of {r['csv']} -> {r['instances']} instances (median of {r['repeats']}, "
            "one core)",
            Table(r["rows"], [("method", ""), ("seconds", ".3f"), ("masks_per_s", ",.0f")]),
            f"speed-up: {r['speedup']:.1f}x; identical instances: {'yes' if r['identical'] else 'NO'}",
            f"reading and validating the CSV: {r['read_seconds']:.3f} s; "
            f"read + convert: {r['read_seconds'] + r['rows'][0]['seconds']:.3f} s"]


# serve and soak: load on a running server ------------------------------------------------------------------------

def _server_load_arguments(parser: argparse.ArgumentParser, url_help: str, concurrency: int) -> None:
    parser.add_argument("--url", required=True, help=f"{url_help}, e.g. http://127.0.0.1:8080/predictions/severstal")
    parser.add_argument("--images", type=Path, required=True, help="folder of JPEG/PNG images to post in turn")
    parser.add_argument("--concurrency", type=int, default=concurrency,
                        help=f"clients posting at the same time (default {concurrency})")
    parser.add_argument("--token", help="inference key when the server has token authorization on")


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    _server_load_arguments(parser, "predictions URL", concurrency=4)
    parser.add_argument("--requests", type=int, default=100, help="timed requests in all")
    parser.add_argument("--warmup", type=int, default=WARMUP_REQUESTS,
                        help=f"untimed requests first: the frontend's JIT warms up (default {WARMUP_REQUESTS})")
    parser.add_argument("--weights", type=Path,
                        help="weights or run folder: also time the bare model on the same images")


def _serve(args: argparse.Namespace) -> dict:
    from severstal.bench.serve import bench_serve
    from severstal.serve.client import bearer_headers

    return bench_serve(args.url, args.images, concurrency=args.concurrency, requests=args.requests,
                       weights=args.weights, headers=bearer_headers(args.token), warmup=args.warmup)


def _serve_report(r: dict) -> Report:
    report = [f"serve: {r['requests']} requests of {r['images']} images from {r['concurrency']} clients to {r['url']}, "
              f"after {r['warmup']} untimed",
              Table(r["rows"], [("method", ""), *LATENCY, ("images_per_s", ".2f")])]
    if r["overhead"] is not None:
        report.append(f"serving overhead: p50 {r['overhead']:.2f}x bare (meaningful at --concurrency 1); "
                      f"throughput {r['throughput_ratio']:.2f}x bare")
    return report + [_errors(r), f"load average at the end: {' '.join(map(str, r['load_average']))}"]


def _soak_arguments(parser: argparse.ArgumentParser) -> None:
    _server_load_arguments(parser, "predictions URL of a server on this machine", concurrency=8)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--max-requests", type=int, help="stop after this many requests too")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples (default 5)")
    parser.add_argument("--kill-worker-at", type=float,
                        help="SIGKILL a worker this many seconds in: what the server fails, what the client loses")


def _soak(args: argparse.Namespace) -> dict:
    from severstal.bench.soak import soak
    from severstal.serve.client import bearer_headers

    return soak(args.url, args.images, concurrency=args.concurrency, duration=args.duration,
                max_requests=args.max_requests, headers=bearer_headers(args.token), sample_every=args.sample_every,
                kill_worker_at=args.kill_worker_at)


def _soak_report(r: dict) -> Report:
    report = [f"soak: {r['requests']} requests of {r['images']} images from {r['concurrency']} clients to {r['url']} "
              f"in {r['duration_s']:.0f} s (load average at the end {' '.join(map(str, r['load_average']))})"]
    if r["latency"]:
        report.append(Table([{"answered": r["ok"], **r["latency"], "requests_per_s": r["requests_per_s"]}],
                            [("answered", "d"), *LATENCY, ("requests_per_s", ".2f")]))
    report += [_errors(r) + (f"; retried by the client: {r['retried']}" if r["retried"] else ""),
               "resident memory (MB) of the server's processes:",
               Table(r["memory"], [("t", ".0f"), ("frontend_mb", ".0f"), ("workers_mb", ".0f"), ("total_mb", ".0f")])]
    for label, growth in (("workers", r["worker_growth"]), ("all processes", r["total_growth"])):
        if growth["percent"] is not None:
            report.append(f"{label}: {growth['from_mb']:.0f} -> {growth['to_mb']:.0f} MB ({growth['percent']:+.1f}%), "
                          f"second window of {growth['window_s']:.0f} s against the last")
    if r["kill"]:
        k = r["kill"]
        back = "never" if k["answers_back_after_s"] is None else f"after {k['answers_back_after_s']:.1f} s"
        report.append(f"worker {k['pid']} killed at {k['at_s']:.1f} s: {k['failed_at_server']} answers failed at the "
                      f"server {k['failed_statuses']}, {k['lost_by_client']} requests lost by the client, answers back "
                      f"{back}, new workers {k['new_worker_pids']}")
    return report


# train, predict, profile, ray: the model on this machine -----------------------------------------------------------

def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", default="small,r50", help="comma-separated config names or YAML paths")
    parser.add_argument("--iterations", type=int, default=6, help="timed iterations per config")
    parser.add_argument("--variant", action="append", default=[], metavar='"KEY VALUE ..."',
                        help="also time every config with these overrides (repeatable)")


def _train(args: argparse.Namespace) -> dict:
    from severstal.bench.train import bench_train

    variants = [(), *(v.split() for v in args.variant)]
    return bench_train(args.configs.split(","), iterations=args.iterations, variants=variants)


def _train_report(r: dict) -> Report:
    return [f"train: median of {r['iterations']} iterations, random weights, {r['threads']} threads",
            Table(r["rows"], [("config", ""), ("batch", "d"), ("input", ""), ("s_per_iter", ".2f"),
                              ("s_per_image", ".2f")]),
            "s/image relative to the first: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items())]


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True, help="PyTorch reference: .pth weights or run folder")
    parser.add_argument("--backends", default="all",
                        help="comma-separated BACKEND[:PRECISION]: torch, torch:bf16, onnxruntime, openvino, "
                             "tensorrt, tensorrt:fp16, ... (torch fp32 always runs: it is the reference); default all: "
                             "every backend installed here, and bf16 where the CPU has bf16 instructions")
    parser.add_argument("--images", type=Path, required=True, help="folder of JPEG/PNG images")
    parser.add_argument("--batch-size", type=int, default=1, help="images per call, the same for every backend")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the images")
    parser.add_argument("--limit", type=int, default=16, help="use the first N images (0: all)")
    parser.add_argument("--threads", type=int, help="CPU threads for every backend (default: PyTorch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--onnx", type=Path,
                        help="an existing export of --weights (default: export to a temporary folder)")
    parser.add_argument("--engine", type=Path, help="an existing TensorRT engine (default: built from the ONNX model)")


def _predict(args: argparse.Namespace) -> dict:
    from severstal.bench.predict import bench_predict

    return bench_predict(args.weights, args.images, args.backends, batch_size=args.batch_size, repeats=args.repeats,
                         limit=args.limit or None, threads=args.threads, device=args.device, onnx=args.onnx,
                         engine=args.engine)


def _predict_report(r: dict) -> Report:
    return [f"predict: {r['images']} images x {r['repeats']} passes, batch size {r['batch_size']}, "
            f"{r['threads']} threads, {r['device']}, OMP_WAIT_POLICY={r['omp_wait_policy'] or 'unset'}, "
            f"CPU bf16 instructions: {'yes' if r['cpu_bf16'] else 'no'}, {_load(r)}; p50 in ms per image; "
            "vs_torch = speed-up over PyTorch fp32",
            Table(r["rows"], [("backend", ""), ("precision", ""), ("e2e_p50_ms", ".0f"), ("e2e_images_per_s", ".2f"),
                              ("e2e_vs_torch", ".2f"), ("net_p50_ms", ".0f"), ("net_images_per_s", ".2f"),
                              ("net_vs_torch", ".2f"), ("other_ms", ".0f"), ("dice_vs_torch", ".4f"),
                              ("keeps_answers", ""), ("detections", "d")]),
            "e2e: image bytes -> record with RLE; net: backend.run alone; other: e2e - net (decode, resize, "
            "post-processing, RLE; shared by all backends); dice_vs_torch: class masks against PyTorch fp32's "
            "(keeps_answers: >= 0.99); detections: defects in all records"]


def _profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True, help=".pth weights or run folder")
    parser.add_argument("--image", type=Path, required=True, help="one JPEG/PNG image")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (p50 per stage)")
    parser.add_argument("--precision", default="fp32", help="fp32 or bf16 (the backbone in bfloat16)")
    parser.add_argument("--threads", type=int, help="PyTorch threads (default: PyTorch's)")


def _profile(args: argparse.Namespace) -> dict:
    from severstal.bench.profile import profile_predict

    return profile_predict(args.weights, args.image, repeats=args.repeats, precision=args.precision,
                           threads=args.threads)


def _profile_report(r: dict) -> Report:
    return [f"profile: {Path(r['image']).name}, PyTorch {r['precision']}, {r['threads']} threads, p50 of "
            f"{r['repeats']}; {r['detections']} detections, {r['pasted']} pasted; {_load(r)}",
            Table(r["stages"] + [{"stage": "total", "p50_ms": r["total_ms"], "share": 1.0}],
                  [("stage", ""), ("p50_ms", ".1f"), ("share", ".1%")])]


def _ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True, help="weights file or training output folder")
    parser.add_argument("--images", type=Path, required=True, help="folder of JPEG/PNG images")
    parser.add_argument("--limit", type=int, help="use the first N images (default: all)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per call, the same on both sides")
    parser.add_argument("--actors", type=int, help="Ray's model replicas (default: as severstal predict --ray)")
    parser.add_argument("--cpus-per-actor", type=float, help="CPUs per actor (default: as severstal predict --ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side, taking turns; medians count")


def _ray(args: argparse.Namespace) -> dict:
    from severstal.bench.ray import bench_ray

    return bench_ray(args.weights, args.images, batch_size=args.batch_size, limit=args.limit, actors=args.actors,
                     cpus_per_actor=args.cpus_per_actor, num_cpus=args.num_cpus, repeats=args.repeats)


def _ray_report(r: dict) -> Report:
    pool, before, after = r["pool"], r["load_average"]["before"], r["load_average"]["after"]
    return [f"ray: {r['images']} images, batch size {r['batch_size']}, median of {r['repeats']}; single process "
            f"{r['threads']} threads; ray {pool['actors']} actors x ({pool['cpus_per_actor']:g} CPU, "
            f"{pool['threads']} threads); local Ray started in {r['ray_start_s']:.1f} s",
            Table(r["rows"], [("method", ""), ("images", "d"), ("seconds", ".1f"), ("images_per_s", ".2f"),
                              ("vs_single", ".2f")]),
            f"ray steady / single: {r['ratio']:.2f} (overhead {100 * (1 - r['ratio']):.0f}%); identical submissions: "
            f"{'yes' if r['identical'] else 'no'}; load average before {before[0]:.2f} {before[1]:.2f} "
            f"{before[2]:.2f}, after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}"]


# gpu: the GPU path in one table ------------------------------------------------------------------------------------

def _gpu_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu: runs every step's code without a GPU")
    parser.add_argument("--quick", action="store_true", help="small config, 2 iterations, 4 images, a few requests")
    parser.add_argument("--weights", type=Path,
                        help="a trained run to predict, serve and export (default: the model the train step leaves)")
    parser.add_argument("--images", type=Path, help="folder of real images (default: the real sample's train_images)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    parser.add_argument("--no-tests", dest="tests", action="store_false", help="skip pytest -m gpu")


def _gpu(args: argparse.Namespace) -> dict:
    import logging

    from severstal.bench.gpu import CheckSettings, gpu_check

    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.budget <= 0:
        raise ValueError(f"--budget must be > 0 seconds, got {args.budget}")
    logging.basicConfig(level=logging.WARNING, format="severstal bench gpu: %(message)s")
    return gpu_check(CheckSettings(device=args.device, quick=args.quick, weights=args.weights, images=args.images,
                                   budget_s=args.budget, run_tests=args.tests))


def _gpu_report(r: dict) -> Report:
    return [f"gpu check: {r['gpu'] or 'no GPU'}, torch {r['torch']} (CUDA {r['cuda']}), device {r['device']}"
            f"{', quick' if r['quick'] else ''}, {r['seconds']:.0f} s",
            Table(r["rows"], [("step", ""), ("what", ""), ("result", ""), ("status", "")])]


BENCHMARKS = {
    "convert": Benchmark("Kaggle RLE -> COCO instances: run-based vs the pixel pipeline, same masks, one core.",
                         _convert_arguments, _convert, _convert_report,
                         lambda r: None if r["identical"] else
                         f"{r['mismatched_masks']} masks differ between the two pipelines"),
    "serve": Benchmark("Latency and throughput of a running TorchServe, and of the bare model on the same images.",
                       _serve_arguments, _serve, _serve_report, _failed_requests),
    "soak": Benchmark("Many clients for a long time against a server on this machine: latency, errors, memory.",
                      _soak_arguments, _soak, _soak_report, _failed_requests),
    "train": Benchmark("Seconds per training iteration of each config on the same synthetic images.",
                       _train_arguments, _train, _train_report),
    "predict": Benchmark("Every backend and precision (PyTorch, ONNX Runtime, OpenVINO, TensorRT; fp32, bf16, fp16): "
                         "same images, batches, pre- and post-processing; Dice against PyTorch fp32.",
                         _predict_arguments, _predict, _predict_report),
    "profile": Benchmark("Where one image's time goes: decode, resize, backbone, RPN, ROI heads, mask pasting, RLE.",
                         _profile_arguments, _profile, _profile_report),
    "ray": Benchmark("Images/s of prediction on a local Ray against one process: same images, model and batches.",
                     _ray_arguments, _ray, _ray_report),
    "gpu": Benchmark("The GPU path: GPU tests, training with AMP, fp32/fp16 prediction, TorchServe on gpu_id, "
                     "ONNX Runtime CUDA and TensorRT, in one table (make gpu-check).",
                     _gpu_arguments, _gpu, _gpu_report, lambda r: None if r["ok"] else "a step failed (status column)"),
}
"""``severstal bench NAME``: every benchmark, in the order ``severstal bench --help`` lists them."""

"""The ``severstal`` command line: parses arguments, calls the package, prints results.

Every command is a thin layer over an importable function; heavy modules are imported inside the
command so that ``severstal --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

Entry = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], "int | None"]]
COMMANDS: dict[str, Entry] = {}
"""Sub-commands of ``severstal``; add one with :func:`command`."""
BENCHMARKS: dict[str, Entry] = {}
"""Sub-benchmarks of ``severstal bench WHAT``; add one with :func:`benchmark`."""


def _registrar(table: dict[str, Entry]):
    """A decorator factory ``(name, help_text, add_arguments)`` that registers ``func(args)`` in ``table``."""

    def register(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
        def decorator(func):
            table[name] = (help_text, add_arguments, func)
            return func

        return decorator

    return register


command = _registrar(COMMANDS)
benchmark = _registrar(BENCHMARKS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="severstal",
        description="Steel-defect segmentation: Severstal data -> Detectron2 Mask R-CNN -> TorchServe.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, func) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(func=func)
    return parser


def print_json_line(obj) -> None:
    """Print one JSON object on one line (the last line of a ``--json`` command's output)."""
    print(json.dumps(obj, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as err:
        print(f"severstal {args.command}: error: {err}", file=sys.stderr)
        return 2


# Commands -------------------------------------------------------------------------------------------
# Each command below only parses, calls one package function and prints.


def _synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for train.csv and train_images/")
    parser.add_argument("--images", type=int, required=True, help="number of images to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed; another seed gives other image ids")


@command("synth", "Write a synthetic Severstal-like dataset in Kaggle's layout (no download).", _synth_arguments)
def _synth(args: argparse.Namespace) -> None:
    from severstal.data.synth import make_synthetic_dataset

    summary = make_synthetic_dataset(args.out, args.images, seed=args.seed)
    masks = ", ".join(f"class {c}: {n}" for c, n in summary["masks_per_class"].items())
    print(f"{summary['images']} images in {summary['images_dir']} (seed {summary['seed']})")
    print(f"{summary['defect_free']} defect-free, {summary['two_class_images']} with two classes")
    print(f"masks: {masks}")
    print(f"labels: {summary['csv']}")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="folder with train.csv and train_images/")
    parser.add_argument("--config", default="small", help="config name (small, r50) or YAML path")
    parser.add_argument("--output", type=Path, required=True, help="folder for weights, config, metrics")
    parser.add_argument("--scratch", action="store_true", help="start from random weights (no download)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs per machine")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0 for several machines")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")


@command("train", "Train Mask R-CNN on a folder in Kaggle's layout.", _train_arguments)
def _train(args: argparse.Namespace) -> None:
    from severstal.model.train import train

    weights = train(args.data, args.config, args.output, args.opts, resume=args.resume, scratch=args.scratch,
                    num_gpus=args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                    dist_url=args.dist_url)
    print(f"weights: {weights}")


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True, help="weights file or training output folder")
    parser.add_argument("--data", type=Path, help="data folder (default: the one trained on)")
    parser.add_argument("--output", type=Path, help="folder for COCO results and plots (default: <run>/eval)")
    parser.add_argument("--tune", action="store_true", help="tune per-class thresholds and save them")
    parser.add_argument("--tta", action="store_true", help="merge flipped views")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


@command("evaluate", "Mean Dice (per class, vs the all-empty baseline) and COCO AP on the validation split.",
         _evaluate_arguments)
def _evaluate(args: argparse.Namespace) -> None:
    from severstal.model.evaluation import evaluate

    r = evaluate(args.weights, args.data, args.output, tune=args.tune, tta=args.tta)
    print(f"{'':<18}{'model':>8}{'all-empty':>11}")
    print(f"{'mean Dice':<18}{r['mean_dice']:>8.4f}{r['empty_baseline']:>11.4f}")
    for c, v in r["dice_per_class"].items():
        print(f"{'  class ' + c:<18}{v:>8.4f}")
    print(f"{'Dice, non-empty':<18}{r['dice_nonempty']:>8.4f}")
    print(f"{'COCO segm AP':<18}{r['segm_AP']:>8.2f}")
    print(f"{'COCO bbox AP':<18}{r['bbox_AP']:>8.2f}")
    if args.tune:
        print(f"tuned on {r['images']} images: score thresholds {r['score_thresholds']}, min areas {r['min_areas']}"
              f" (mean Dice before tuning {r['mean_dice_untuned']:.4f})")
    if args.json:
        print_json_line(r)


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True, help="weights file or training output folder")
    parser.add_argument("--images", type=Path, required=True, help="folder of images")
    parser.add_argument("--out", type=Path, required=True, help="submission CSV to write")
    parser.add_argument("--format", choices=("new", "old"), default="new",
                        help="new: ImageId,EncodedPixels,ClassId; old: ImageId_ClassId,EncodedPixels")
    parser.add_argument("--tta", action="store_true", help="merge horizontally and vertically flipped views")
    parser.add_argument("--overlays", type=Path, help="folder for PNG overlays of the predicted masks")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--backend", help="torch, onnxruntime or tensorrt (default: from the weights file: "
                                          ".pth torch, .onnx onnxruntime, .engine tensorrt)")


@command("predict", "Predict a folder of images and write a Kaggle submission.", _predict_arguments)
def _predict(args: argparse.Namespace) -> None:
    from severstal.model.predict import predict_folder

    s = predict_folder(args.weights, args.images, args.out, fmt=args.format, tta=args.tta, overlays=args.overlays,
                       batch_size=args.batch_size, backend=args.backend)
    per_class = ", ".join(f"class {c}: {n}" for c, n in s["masks_per_class"].items())
    print(f"{s['images']} images, {s['masks']} non-empty masks ({per_class})")
    print(f"submission: {s['submission']}")


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo"), help="folder for every output of the demo")
    parser.add_argument("--images", type=int, default=300, help="synthetic training images")
    parser.add_argument("--iterations", type=int, default=500, help="training iterations")


@command("demo", "The whole pipeline on synthetic data, offline: synth, train, evaluate, predict, serve.",
         _demo_arguments)
def _demo(args: argparse.Namespace) -> None:
    import logging

    from severstal.demo import DemoSettings, run_demo

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = run_demo(args.out, DemoSettings(train_images=args.images, max_iter=args.iterations))
    e = r["evaluation"]
    print(f"\n{'':<22}{'model':>8}{'all-empty':>11}")
    print(f"{'mean Dice (val)':<22}{e['mean_dice']:>8.4f}{e['empty_baseline']:>11.4f}")
    for c, v in e["dice_per_class"].items():
        print(f"{'  class ' + c:<22}{v:>8.4f}")
    print(f"{'mean Dice (held out)':<22}{r['predict']['holdout_dice']:>8.4f}")
    answer = r["serve"]["first_answer"]
    summary = [(d["class_id"], d["score"], d["area"]) for d in answer["defects"]]
    print(f"\nTorchServe answer for {answer['image']}: {len(summary)} defects (class, score, area) {summary[:5]}")
    print(f"latencies (s): {r['serve']['latencies_s']}")
    print(f"stage seconds: {r['seconds']} (total {sum(r['seconds'].values()):.0f} s)")
    print(f"plots: {', '.join(r['plots'])}")
    print(f"submission: {r['predict']['submission']}; overlays: {Path(args.out) / 'overlays'}")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True,
                        help="onnx: .pth weights or run folder; tensorrt: those, or an exported model.onnx")
    parser.add_argument("--format", choices=("onnx", "tensorrt"), required=True,
                        help="tensorrt exports to ONNX first when given PyTorch weights")
    parser.add_argument("--out", type=Path, required=True, help="folder for the model, config.yaml and thresholds")
    parser.add_argument("--fp16", action="store_true", help="tensorrt: allow half-precision kernels")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (16 or newer)")
    parser.add_argument("--no-simplify", dest="simplify", action="store_false", help="skip onnx-simplifier")


@command("export", "Export a trained model to ONNX (simplified, checked) or a TensorRT engine.", _export_arguments)
def _export(args: argparse.Namespace) -> int:
    import logging

    from severstal.model.backends import BackendUnavailable
    from severstal.model.export import export_onnx, export_tensorrt

    logging.basicConfig(level=logging.INFO, format="severstal export: %(message)s")
    try:
        onnx = args.weights if args.weights.suffix == ".onnx" else None
        if onnx is None:
            onnx = export_onnx(args.weights, args.out, opset=args.opset, simplify=args.simplify)
            print(f"onnx: {onnx} ({onnx.stat().st_size / 1e6:.1f} MB)")
        if args.format == "tensorrt":
            engine = export_tensorrt(onnx, args.out, fp16=args.fp16)
            print(f"tensorrt: {engine} ({engine.stat().st_size / 1e6:.1f} MB)")
    except BackendUnavailable as err:
        print(f"severstal export: error: {err}", file=sys.stderr)
        return 2
    return 0


def _archive_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True,
                        help="weights file or training output folder, or an exported model.onnx (or its folder)")
    parser.add_argument("--out", type=Path, required=True, help="model store folder to write NAME.mar into")
    parser.add_argument("--name", default="severstal", help="model name: the /predictions/NAME path")
    parser.add_argument("--version", default="1.0", help="model version")
    parser.add_argument("--model-config", type=Path, help="default: torchserve/model-config.yaml")


@command("archive", "Pack weights, config, thresholds and the handler into a TorchServe .mar.", _archive_arguments)
def _archive(args: argparse.Namespace) -> None:
    from severstal.serve.archive import archive

    path = archive(args.weights, args.out, name=args.name, version=args.version, model_config=args.model_config)
    print(f"archive: {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-store", type=Path, required=True, help="folder of .mar archives (all are served)")
    parser.add_argument("--host", default="127.0.0.1", help="address of the inference and metrics APIs")
    parser.add_argument("--port", type=int, default=8080,
                        help="inference port; management PORT+1 (loopback only), metrics PORT+2; 0: any free")
    parser.add_argument("--workers", type=int, help="workers per model (default: the archive's minWorkers)")
    parser.add_argument("--run-dir", type=Path, help="folder for logs, temporary files and token keys "
                                                     "(default: a new temporary folder)")
    parser.add_argument("--token-auth", action=argparse.BooleanOptionalAction, default=None,
                        help="require token keys (default: on unless --host is loopback)")


@command("serve", "Serve the model store with TorchServe until Ctrl-C or SIGTERM.", _serve_arguments)
def _serve(args: argparse.Namespace) -> int:
    import logging

    from severstal.serve.server import serve

    logging.basicConfig(level=logging.INFO, format="severstal serve: %(message)s")

    def ready(server) -> None:
        for name in server.models:
            print(f"POST an image to {server.predictions_url(name)}")
        print(f"metrics: {server.metrics_url}; logs: {server.run_dir / 'logs'}")
        if server.token_auth:
            print(f"token keys: {server.key_file} (header 'Authorization: Bearer <inference key>')")
        print("Ctrl-C or SIGTERM stops the server", flush=True)

    return serve(args.model_store, host=args.host, port=args.port, workers=args.workers, run_dir=args.run_dir,
                 token_auth=args.token_auth, on_ready=ready)


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", type=Path, required=True, help="train.csv in either Kaggle format")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.json and val.json")
    parser.add_argument("--images", type=Path, help="image folder: include every image in it, defect-free too")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of images for val.json (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the class-stratified split")
    parser.add_argument("--min-area", type=int, default=0, help="drop instances with fewer pixels")


@command("convert", "Convert a train.csv into COCO instance JSON (one instance per connected component).",
         _convert_arguments)
def _convert(args: argparse.Namespace) -> None:
    from severstal.data.coco import convert_to_coco

    s = convert_to_coco(args.csv, args.out, images=args.images, val_fraction=args.val_fraction, seed=args.seed,
                        min_area=args.min_area)
    per_class = ", ".join(f"class {c}: {n}" for c, n in s["instances_per_class"].items())
    print(f"{s['images']} images ({s['train_images']} train, {s['val_images']} val), {s['masks']} masks")
    print(f"{s['instances']} instances ({per_class})")
    if s["masks_left_out"]:
        print(f"{s['masks_left_out']} masks left out: their images are not in {args.images}")
    print(f"wrote {s['train_json']} and {s['val_json']}")


def _plots_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("graphs"), help="folder for the figures (default graphs)")
    parser.add_argument("--data", type=Path, help="dataset folder (Kaggle layout); default: the real sample in "
                                                  "../shared/data/severstal-real")
    parser.add_argument("--run", type=Path, help="training run folder (e.g. demo/run): curves, Dice, latency")
    parser.add_argument("--images-out", type=Path, help="folder for the README's pictures (e.g. images)")


@command("plots", "Write the figures (class balance, areas, positions, examples, losses, Dice, latency) as PNG.",
         _plots_arguments)
def _plots(args: argparse.Namespace) -> None:
    from severstal.figures import write_graphs

    r = write_graphs(args.out, args.data, args.run, args.images_out)
    for path in r["written"]:
        print(f"wrote {path}")
    for reason in r["skipped"]:
        print(f"skipped {reason}")


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    for name, (help_text, add_arguments, func) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(bench=func)


@command("bench", "Benchmarks; `severstal bench WHAT --help` for each.", _bench_arguments)
def _bench(args: argparse.Namespace) -> int | None:
    return args.bench(args)


def _bench_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", type=Path, help="train.csv (default: the real masks in ../shared/data/severstal-real)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each pipeline; the median counts")
    parser.add_argument("--limit", type=int, help="only the first N masks")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


@benchmark("convert", "Kaggle RLE -> COCO instances: run-based vs the pixel pipeline, same masks, one core.",
           _bench_convert_arguments)
def _bench_convert(args: argparse.Namespace) -> int:
    from severstal.bench import format_table
    from severstal.bench.convert import bench_convert, real_train_csv

    r = bench_convert(args.csv or real_train_csv(), repeats=args.repeats, limit=args.limit)
    print(f"convert: {r['masks']} masks of {r['csv']} -> {r['instances']} instances "
          f"(median of {r['repeats']}, one core)")
    print(format_table(r["rows"], [("method", ""), ("seconds", ".3f"), ("masks_per_s", ",.0f")]))
    print(f"speed-up: {r['speedup']:.1f}x; identical instances: {'yes' if r['identical'] else 'NO'}")
    print(f"reading and validating the CSV: {r['read_seconds']:.3f} s; "
          f"read + convert: {r['read_seconds'] + r['rows'][0]['seconds']:.3f} s")
    if args.json:
        print_json_line(r)
    if not r["identical"]:
        print(f"{r['mismatched_masks']} masks differ between the two pipelines", file=sys.stderr)
        return 1
    return 0


def _bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="predictions URL, e.g. http://127.0.0.1:8080/predictions/severstal")
    parser.add_argument("--images", type=Path, required=True, help="folder of JPEG/PNG images to post")
    parser.add_argument("--concurrency", type=int, default=4, help="clients posting at the same time")
    parser.add_argument("--requests", type=int, default=100, help="timed requests in all")
    parser.add_argument("--weights", type=Path,
                        help="weights or run folder: also time the bare model on the same images")
    parser.add_argument("--token", help="inference key when the server has token authorization on")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


@benchmark("serve", "Latency and throughput of a running TorchServe, and of the bare model on the same images.",
           _bench_serve_arguments)
def _bench_serve(args: argparse.Namespace) -> int:
    from severstal.bench import format_table
    from severstal.bench.serve import bench_serve

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
    r = bench_serve(args.url, args.images, concurrency=args.concurrency, requests=args.requests,
                    weights=args.weights, headers=headers)
    print(f"serve: {r['requests']} requests of {r['images']} images from {r['concurrency']} clients to {r['url']}")
    print(format_table(r["rows"], [("method", ""), ("p50", ".3f"), ("p95", ".3f"), ("p99", ".3f"), ("mean", ".3f"),
                                   ("images_per_s", ".2f")]))
    if r["overhead"] is not None:
        print(f"serving overhead: p50 {r['overhead']:.2f}x bare (meaningful at --concurrency 1); "
              f"throughput {r['throughput_ratio']:.2f}x bare")
    print(f"errors: {r['errors']}" + (f" {r['error_statuses']}" if r["errors"] else ""))
    if args.json:
        print_json_line(r)
    return 1 if r["errors"] else 0


def _bench_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", default="small,r50", help="comma-separated config names or YAML paths")
    parser.add_argument("--iterations", type=int, default=6, help="timed iterations per config")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


@benchmark("train", "Seconds per training iteration of each config on the same synthetic images.",
           _bench_train_arguments)
def _bench_train(args: argparse.Namespace) -> None:
    from severstal.bench import format_table
    from severstal.bench.train import bench_train

    r = bench_train(args.configs.split(","), iterations=args.iterations)
    print(f"train: median of {r['iterations']} iterations, random weights, {r['threads']} threads")
    print(format_table(r["rows"], [("config", ""), ("batch", "d"), ("input", ""), ("s_per_iter", ".2f"),
                                   ("s_per_image", ".2f")]))
    print("s/image relative to the first: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items()))
    if args.json:
        print_json_line(r)


def _bench_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True, help="PyTorch reference: .pth weights or run folder")
    parser.add_argument("--backends", default="torch,onnxruntime",
                        help="comma-separated: torch, onnxruntime, tensorrt (torch always runs: it is the reference)")
    parser.add_argument("--images", type=Path, required=True, help="folder of JPEG/PNG images")
    parser.add_argument("--batch-size", type=int, default=1, help="images per call, the same for every backend")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the images")
    parser.add_argument("--limit", type=int, default=16, help="use the first N images (0: all)")
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch and ONNX Runtime (default: PyTorch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--onnx", type=Path,
                        help="an existing export of --weights (default: export to a temporary folder)")
    parser.add_argument("--engine", type=Path, help="an existing TensorRT engine (default: built from the ONNX model)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


@benchmark("predict", "PyTorch vs ONNX Runtime vs TensorRT: same images, batches, pre- and post-processing.",
           _bench_predict_arguments)
def _bench_predict(args: argparse.Namespace) -> int:
    from severstal.bench import format_table
    from severstal.bench.predict import bench_predict
    from severstal.model.backends import BackendUnavailable

    try:
        r = bench_predict(args.weights, args.images, [b.strip() for b in args.backends.split(",") if b.strip()],
                          batch_size=args.batch_size, repeats=args.repeats, limit=args.limit or None,
                          threads=args.threads, device=args.device, onnx=args.onnx, engine=args.engine)
    except BackendUnavailable as err:
        print(f"severstal bench predict: error: {err}", file=sys.stderr)
        return 2
    print(f"predict: {r['images']} images x {r['repeats']} passes, batch size {r['batch_size']}, "
          f"{r['threads']} threads, {r['device']}, OMP_WAIT_POLICY={r['omp_wait_policy'] or 'unset'}; "
          "p50 in ms per image; vs_torch = speed-up over PyTorch")
    print(format_table(r["rows"], [("backend", ""), ("e2e_p50_ms", ".0f"), ("e2e_images_per_s", ".2f"),
                                   ("e2e_vs_torch", ".2f"), ("net_p50_ms", ".0f"), ("net_images_per_s", ".2f"),
                                   ("net_vs_torch", ".2f"), ("other_ms", ".0f"), ("dice_vs_torch", ".4f")]))
    print("e2e: image bytes -> record with RLE; net: backend.run alone; other: e2e - net (decode, resize, "
          "post-processing, RLE; shared by all backends)")
    if args.json:
        print_json_line(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())

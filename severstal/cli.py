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
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs per machine, one process each (NCCL)")
    parser.add_argument("--num-processes", type=int,
                        help="instead of GPUs: CPU processes per machine (torch.distributed's gloo backend)")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0, help="0 on the machine of --dist-url, 1.. elsewhere")
    parser.add_argument("--dist-url", default="auto", help="tcp://HOST:PORT of machine 0 for several machines")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")


@command("train", "Train Mask R-CNN on a folder in Kaggle's layout.", _train_arguments)
def _train(args: argparse.Namespace) -> None:
    from severstal.model.train import train

    weights = train(args.data, args.config, args.output, args.opts, resume=args.resume, scratch=args.scratch,
                    num_gpus=args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                    dist_url=args.dist_url, num_processes=args.num_processes)
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


def _cv_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True,
                        help="labelled folder: Kaggle's layout, or the real sample's (partial masks, per-image labels)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the folds' runs and cv.json (resumes)")
    parser.add_argument("--config", default="fewlabels", help="config name or YAML (default: fewlabels, the recipe "
                        "for few labels on a CPU; KEY VALUE overrides apply to it)")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the class-stratified folds")
    parser.add_argument("--pretrained", dest="scratch", action="store_false",
                        help="start from the config's MODEL.WEIGHTS (a download) instead of random weights")
    parser.add_argument("--pretrain-synthetic", type=int, default=0, metavar="N",
                        help="first train on N synthetic strips with real defect shapes, once, and start every fold "
                        "from it (0: off)")
    parser.add_argument("--pretrain-iterations", type=int, default=500, metavar="N")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the mean and spread")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")


_CV_ROW = "{:<7}{:>7}{:>11}{:>8}{:>14}" + "{:>8}" * 4 + "{:>7}"


def _cv_row(name: str, r: dict) -> str:
    cells = [f"{r['dice']:.4f}", f"{r['all_empty']:.4f}", f"{r['gain']:+.4f}", f"{r['dice_defect_pairs']:.4f}"]
    cells += [f"{r['dice_per_class'][str(c)]:.3f}" for c in range(1, 5)]
    seconds = r.get("seconds")
    return _CV_ROW.format(name, *cells, f"{seconds:.0f}" if seconds is not None else "")


@command("cv", "k-fold cross-validation on labelled images: train, tune, score each held-out fold vs all-empty.",
         _cv_arguments)
def _cv(args: argparse.Namespace) -> None:
    import logging

    from severstal.model.cv import cross_validate

    logging.basicConfig(level=logging.INFO, format="severstal cv: %(message)s")

    print(_CV_ROW.format("fold", "Dice", "all-empty", "gain", "defect pairs", "c1", "c2", "c3", "c4", "s"))
    report = cross_validate(args.data, args.out, args.config, args.opts, folds=args.folds, seed=args.seed,
                            scratch=args.scratch, pretrain_images=args.pretrain_synthetic,
                            pretrain_iterations=args.pretrain_iterations,
                            on_fold=lambda k, r: print(_cv_row(str(k), r), flush=True))
    mean, spread = report["mean"], report["spread"]
    print(_cv_row("mean", mean))
    print(_CV_ROW.format("+-", *(f"{spread[k]:.4f}" for k in ("dice", "all_empty", "gain", "dice_defect_pairs")),
                         "", "", "", "", ""))
    auc = ", ".join(f"class {c} {v:.2f}" for c, v in mean["presence_auc"].items())
    plan = report["plan"]
    print(f"presence ROC AUC (mean over folds): {auc}")
    print(f"{mean['folds_beating_all_empty']} of {len(report['folds'])} folds beat all-empty; {plan['images']} images "
          f"scored, {len(plan['left_out_incomplete'])} left out (incomplete truth); {args.out / 'cv.json'}")
    if args.json:
        print_json_line({"mean": mean, "spread": spread})


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True, help="weights file or training output folder")
    parser.add_argument("--images", required=True,
                        help="folder of images; with --ray also a glob or a URI (s3://bucket/images/)")
    parser.add_argument("--out", type=Path, required=True, help="submission CSV to write")
    parser.add_argument("--format", choices=("new", "old"), default="new",
                        help="new: ImageId,EncodedPixels,ClassId; old: ImageId_ClassId,EncodedPixels")
    parser.add_argument("--tta", action="store_true", help="merge horizontally and vertically flipped views")
    parser.add_argument("--overlays", type=Path, help="folder for PNG overlays of the predicted masks")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--backend", help="torch, onnxruntime, openvino or tensorrt (default: from the weights "
                                          "file: .pth torch, .onnx onnxruntime, .engine tensorrt)")
    parser.add_argument("--precision", help="fp32, bf16 (torch on a CPU with bf16 instructions) or fp16 (GPU) where "
                                            "the backend has it (default: fp32, or $SEVERSTAL_PRECISION)")
    ray = parser.add_argument_group("Ray (pip install 'severstal[ray]')")
    ray.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="predict on Ray Data with a pool of model actors; no ADDRESS: a local Ray for this run; "
                          "'auto' or HOST:6379: a cluster started with `ray start`")
    ray.add_argument("--actors", type=int, help="model replicas (default: one per GPU, else one per 2 CPUs)")
    ray.add_argument("--cpus-per-actor", type=float,
                     help="CPUs each actor asks (fractions allowed; default: 1 with a GPU, else the CPUs shared out, "
                          "some kept for reading)")
    ray.add_argument("--gpus-per-actor", type=float, help="GPUs each actor asks (default: 1 where the cluster has "
                                                          "GPUs, else 0)")
    ray.add_argument("--parquet", help="also write the full records (boxes, scores, RLE) as Parquet into this folder")


@command("predict", "Predict images into a Kaggle submission (one process, or a Ray cluster with --ray). "
         "Exit status 3: some files were unreadable (named on stderr; their masks are written empty).",
         _predict_arguments)
def _predict(args: argparse.Namespace) -> int:
    from severstal.model.backends import describe_backend
    from severstal.model.predict import EXIT_UNREADABLE, Predictor, predict_folder

    if args.ray is None:
        ray_only = [f"--{k.replace('_', '-')}" for k in ("actors", "cpus_per_actor", "gpus_per_actor", "parquet")
                    if getattr(args, k) is not None]
        if ray_only:
            raise ValueError(f"{', '.join(ray_only)} need(s) --ray")
        predictor = Predictor.from_weights(args.weights, tta=args.tta, backend=args.backend, precision=args.precision)
        print(f"backend: {describe_backend(predictor.backend)}")
        s = predict_folder(args.weights, args.images, args.out, fmt=args.format, overlays=args.overlays,
                           batch_size=args.batch_size, predictor=predictor)
    else:
        if args.overlays:
            raise ValueError("--overlays is not available with --ray")
        from severstal.model.predict_ray import predict_ray

        s = predict_ray(args.weights, args.images, args.out, address=args.ray, fmt=args.format, tta=args.tta,
                        backend=args.backend, precision=args.precision, batch_size=args.batch_size, actors=args.actors,
                        cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                        parquet=args.parquet)
        pool = s["pool"]
        print(f"ray: {pool['actors']} actors x ({pool['cpus_per_actor']:g} CPU, {pool['gpus_per_actor']:g} GPU, "
              f"{pool['threads']} threads), batch size {args.batch_size}; backend: {s['backend']}")
    per_class = ", ".join(f"class {c}: {n}" for c, n in s["masks_per_class"].items())
    print(f"{s['images']} images, {s['masks']} non-empty masks ({per_class})")
    print(f"submission: {s['submission']}")
    if s.get("parquet"):
        print(f"records: {s['parquet']} (Parquet)")
    for item in s["unreadable"]:
        print(f"severstal predict: unreadable: {item['error']}", file=sys.stderr)
    if s["unreadable"]:
        print(f"severstal predict: {len(s['unreadable'])} of {s['images']} images unreadable, written with empty "
              f"masks; exit status {EXIT_UNREADABLE}", file=sys.stderr)
        return EXIT_UNREADABLE
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from severstal.demo import DemoSettings  # no heavy import: the demo module imports its stages when run

    parser.add_argument("--out", type=Path, default=Path("demo"), help="folder for every output of the demo")
    defaults = DemoSettings()
    parser.add_argument("--images", type=int, default=defaults.train_images, help="synthetic training images")
    parser.add_argument("--iterations", type=int, default=defaults.max_iter, help="training iterations")


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
    held = r["predict"]
    print(f"{'mean Dice (held out)':<22}{held['holdout_dice']:>8.4f}{held['holdout_empty_baseline']:>11.4f}")
    answer = r["serve"]["first_answer"]
    summary = [(d["class_id"], d["score"], d["area"]) for d in answer["defects"]]
    int8 = r["int8"]
    kept = f"int8 kept ({int8.get('parity_dice', int8.get('why'))})" if int8["kept"] else "int8 refused"
    print(f"\nserved and predicted with {r['served_model']} ({kept})")
    print(f"TorchServe answer for {answer['image']}: {len(summary)} defects (class, score, area) {summary[:5]}")
    print(f"latencies (s): {r['serve']['latencies_s']}")
    total = sum(r["seconds"].values())
    print(f"stage seconds: {r['seconds']} (total {total:.0f} s; training in {r['training_precision']})")
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
    parser.add_argument("--score-floor", type=float, help="score floor frozen into the graph (default: the run's "
                        "lowest tuned threshold, else the config's MODEL.ROI_HEADS.SCORE_THRESH_TEST)")
    int8 = parser.add_argument_group("int8 (ONNX Runtime static quantization of the backbone and FPN)")
    int8.add_argument("--int8", action="store_true", help="also write model-int8.onnx beside model.onnx if its class "
                      "masks match fp32's (Dice >= 0.99) on images not used for calibration; a CPU then serves it")
    int8.add_argument("--calibration", type=Path, help="folder of real images: the first N calibrate, the next 8 "
                      "check parity")
    int8.add_argument("--calibration-images", type=int, default=16, metavar="N", help="calibration images (default 16)")


@command("export", "Export a trained model to ONNX (simplified, checked) or a TensorRT engine.", _export_arguments)
def _export(args: argparse.Namespace) -> int:
    import logging

    from severstal.model.backends import BackendUnavailable
    from severstal.model.export import export_onnx, export_tensorrt

    logging.basicConfig(level=logging.INFO, format="severstal export: %(message)s")
    if args.int8 and (args.format != "onnx" or args.calibration is None):
        raise ValueError("--int8 needs --format onnx and --calibration DIR (real images to calibrate and check on)")
    try:
        onnx = args.weights if args.weights.suffix == ".onnx" else None
        if onnx is None:
            onnx = export_onnx(args.weights, args.out, opset=args.opset, simplify=args.simplify,
                               score_floor=args.score_floor)
            print(f"onnx: {onnx} ({onnx.stat().st_size / 1e6:.1f} MB)")
        if args.int8:
            from severstal.model.quantize import quantize_export

            path, report = quantize_export(onnx, args.calibration, args.out, args.calibration_images)
            print(f"int8: {path} ({path.stat().st_size / 1e6:.1f} MB): {report['quantized_convs']} convolutions, "
                  f"class-mask Dice {report['parity_dice']:.4f} against fp32 on {report['parity_images']} images "
                  f"not used for calibration")
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
    parser.add_argument("--torch-only", action="store_true", help="pack the PyTorch weights alone (by default a "
                        "training run's ONNX and, where its answers hold, int8 exports go beside them, and a CPU "
                        "worker runs the fastest)")
    parser.add_argument("--calibration", type=Path, help="real images to calibrate int8 on (default: the run's "
                        "training images)")


@command("archive", "Pack weights, config, thresholds and the handler into a TorchServe .mar.", _archive_arguments)
def _archive(args: argparse.Namespace) -> None:
    from severstal.files import model_file_in
    from severstal.serve.archive import archive, export_for_serving

    weights = model_file_in(args.weights) if args.weights.is_dir() else args.weights
    also = [] if args.torch_only or weights.suffix != ".pth" else export_for_serving(weights, args.calibration)[0]
    path = archive(weights, args.out, name=args.name, version=args.version, model_config=args.model_config, also=also)
    print(f"archive: {path} ({path.stat().st_size / 1e6:.1f} MB) with {', '.join(p.name for p in [weights, *also])}")


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-store", type=Path, required=True, help="folder of .mar archives (all are served)")
    parser.add_argument("--engine", choices=("torchserve", "ray"), default="torchserve",
                        help="torchserve (default) or ray: Ray Serve on a local Ray or a cluster (--address)")
    parser.add_argument("--host", default="127.0.0.1", help="address of the inference and metrics APIs")
    parser.add_argument("--port", type=int, default=8080,
                        help="inference port; management PORT+1 (loopback only), metrics PORT+2; 0: any free")
    parser.add_argument("--workers", type=int, help="workers per model (default: the archive's minWorkers)")
    parser.add_argument("--run-dir", type=Path, help="folder for logs, temporary files and token keys "
                                                     "(default: a new temporary folder)")
    parser.add_argument("--token-auth", action=argparse.BooleanOptionalAction, default=None,
                        help="require token keys (default: on unless --host is loopback)")
    ray = parser.add_argument_group("--engine ray")
    ray.add_argument("--model", help="the model to serve when the store holds several archives")
    ray.add_argument("--replicas", type=int, help="replicas (default: the archive's minWorkers); with "
                                                  "--max-replicas the least of the autoscaling range")
    ray.add_argument("--max-replicas", type=int, help="autoscale up to this many replicas on ongoing requests")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica, fractions allowed (default 1)")
    ray.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (default 0)")
    ray.add_argument("--address", help="a Ray cluster: 'auto' or HEAD:6379 (default: a local Ray for this server)")


@command("serve", "Serve the model store with TorchServe (or Ray Serve) until Ctrl-C or SIGTERM.", _serve_arguments)
def _serve(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="severstal serve: %(message)s")

    def ready(server) -> None:
        for name in server.models:
            print(f"POST an image to {server.predictions_url(name)} or {server.inference_url}/v2/models/{name}/infer")
        if args.engine == "torchserve":
            print(f"metrics: {server.metrics_url}; logs: {server.run_dir / 'logs'}")
        if server.token_auth:
            print(f"token keys: {server.key_file} (header 'Authorization: Bearer <inference key>')")
        print("Ctrl-C or SIGTERM stops the server", flush=True)

    if args.engine == "ray":
        from severstal.serve.rayserve import serve_ray

        return serve_ray(args.model_store, on_ready=ready, host=args.host, port=args.port, model=args.model,
                         replicas=args.replicas or args.workers, max_replicas=args.max_replicas,
                         cpus=args.replica_cpus, gpus=args.replica_gpus, address=args.address, run_dir=args.run_dir,
                         token_auth=args.token_auth)
    from severstal.serve.server import serve

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


def _server_load_arguments(parser: argparse.ArgumentParser, url_help: str, concurrency: int) -> None:
    """The options of a benchmark that posts images to a running server: --url, --images, --concurrency,
    --token, --json."""
    parser.add_argument("--url", required=True, help=f"{url_help}, e.g. http://127.0.0.1:8080/predictions/severstal")
    parser.add_argument("--images", type=Path, required=True, help="folder of JPEG/PNG images to post in turn")
    parser.add_argument("--concurrency", type=int, default=concurrency,
                        help=f"clients posting at the same time (default {concurrency})")
    parser.add_argument("--token", help="inference key when the server has token authorization on")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


def _bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    _server_load_arguments(parser, "predictions URL", concurrency=4)
    parser.add_argument("--requests", type=int, default=100, help="timed requests in all")
    parser.add_argument("--weights", type=Path,
                        help="weights or run folder: also time the bare model on the same images")


@benchmark("serve", "Latency and throughput of a running TorchServe, and of the bare model on the same images.",
           _bench_serve_arguments)
def _bench_serve(args: argparse.Namespace) -> int:
    from severstal.bench import format_table
    from severstal.bench.serve import bench_serve
    from severstal.serve.client import bearer_headers

    r = bench_serve(args.url, args.images, concurrency=args.concurrency, requests=args.requests,
                    weights=args.weights, headers=bearer_headers(args.token))
    print(f"serve: {r['requests']} requests of {r['images']} images from {r['concurrency']} clients to {r['url']}")
    print(format_table(r["rows"], [("method", ""), ("p50", ".3f"), ("p95", ".3f"), ("p99", ".3f"), ("mean", ".3f"),
                                   ("images_per_s", ".2f")]))
    if r["overhead"] is not None:
        print(f"serving overhead: p50 {r['overhead']:.2f}x bare (meaningful at --concurrency 1); "
              f"throughput {r['throughput_ratio']:.2f}x bare")
    print(f"errors: {r['errors']}" + (f" {r['error_statuses']}" if r["errors"] else ""))
    print(f"load average at the end: {' '.join(map(str, r['load_average']))}")
    if args.json:
        print_json_line(r)
    return 1 if r["errors"] else 0


def _bench_soak_arguments(parser: argparse.ArgumentParser) -> None:
    _server_load_arguments(parser, "predictions URL of a server on this machine", concurrency=8)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--max-requests", type=int, help="stop after this many requests too")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples (default 5)")
    parser.add_argument("--kill-worker-at", type=float,
                        help="SIGKILL a worker this many seconds in: what the server fails, what the client loses")


@benchmark("soak", "Many clients for a long time against a server on this machine: latency, errors, memory.",
           _bench_soak_arguments)
def _bench_soak(args: argparse.Namespace) -> int:
    from severstal.bench import format_table
    from severstal.bench.soak import soak
    from severstal.serve.client import bearer_headers

    r = soak(args.url, args.images, concurrency=args.concurrency, duration=args.duration,
             max_requests=args.max_requests, headers=bearer_headers(args.token), sample_every=args.sample_every,
             kill_worker_at=args.kill_worker_at)
    print(f"soak: {r['requests']} requests of {r['images']} images from {r['concurrency']} clients to {r['url']} "
          f"in {r['duration_s']:.0f} s (load average at the end {' '.join(map(str, r['load_average']))})")
    if r["latency"]:
        print(format_table([{"answered": r["ok"], **r["latency"], "requests_per_s": r["requests_per_s"]}],
                           [("answered", "d"), ("p50", ".3f"), ("p95", ".3f"), ("p99", ".3f"), ("mean", ".3f"),
                            ("requests_per_s", ".2f")]))
    print(f"errors: {r['errors']}" + (f" {r['error_statuses']}" if r["errors"] else "")
          + (f"; retried by the client: {r['retried']}" if r["retried"] else ""))
    print("resident memory (MB) of the server's processes:")
    print(format_table(r["memory"], [("t", ".0f"), ("frontend_mb", ".0f"), ("workers_mb", ".0f"), ("total_mb", ".0f")]))
    for label, growth in (("workers", r["worker_growth"]), ("all processes", r["total_growth"])):
        if growth["percent"] is not None:
            print(f"{label}: {growth['from_mb']:.0f} -> {growth['to_mb']:.0f} MB ({growth['percent']:+.1f}%), "
                  f"second window of {growth['window_s']:.0f} s against the last")
    if r["kill"]:
        k = r["kill"]
        back = "never" if k["answers_back_after_s"] is None else f"after {k['answers_back_after_s']:.1f} s"
        print(f"worker {k['pid']} killed at {k['at_s']:.1f} s: {k['failed_at_server']} answers failed at the server "
              f"{k['failed_statuses']}, {k['lost_by_client']} requests lost by the client, answers back {back}, "
              f"new workers {k['new_worker_pids']}")
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
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


@benchmark("predict", "Every backend and precision (PyTorch, ONNX Runtime, OpenVINO, TensorRT; fp32, bf16, fp16): "
           "same images, batches, pre- and post-processing; Dice against PyTorch fp32.", _bench_predict_arguments)
def _bench_predict(args: argparse.Namespace) -> int:
    from severstal.bench import format_table
    from severstal.bench.predict import bench_predict
    from severstal.model.backends import BackendUnavailable

    try:
        r = bench_predict(args.weights, args.images, args.backends,
                          batch_size=args.batch_size, repeats=args.repeats, limit=args.limit or None,
                          threads=args.threads, device=args.device, onnx=args.onnx, engine=args.engine)
    except BackendUnavailable as err:
        print(f"severstal bench predict: error: {err}", file=sys.stderr)
        return 2
    load = r["load_average"]
    print(f"predict: {r['images']} images x {r['repeats']} passes, batch size {r['batch_size']}, "
          f"{r['threads']} threads, {r['device']}, OMP_WAIT_POLICY={r['omp_wait_policy'] or 'unset'}, "
          f"CPU bf16 instructions: {'yes' if r['cpu_bf16'] else 'no'}, load average {load['before'][0]:.2f} -> "
          f"{load['after'][0]:.2f}; p50 in ms per image; vs_torch = speed-up over PyTorch fp32")
    print(format_table(r["rows"], [("backend", ""), ("precision", ""), ("e2e_p50_ms", ".0f"),
                                   ("e2e_images_per_s", ".2f"), ("e2e_vs_torch", ".2f"), ("net_p50_ms", ".0f"),
                                   ("net_images_per_s", ".2f"), ("net_vs_torch", ".2f"), ("other_ms", ".0f"),
                                   ("dice_vs_torch", ".4f"), ("keeps_answers", ""), ("detections", "d")]))
    print("e2e: image bytes -> record with RLE; net: backend.run alone; other: e2e - net (decode, resize, "
          "post-processing, RLE; shared by all backends); dice_vs_torch: class masks against PyTorch fp32's "
          "(keeps_answers: >= 0.99); detections: defects in all records")
    if args.json:
        print_json_line(r)
    return 0


def _bench_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True, help=".pth weights or run folder")
    parser.add_argument("--image", type=Path, required=True, help="one JPEG/PNG image")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (p50 per stage)")
    parser.add_argument("--precision", default="fp32", help="fp32 or bf16 (the backbone in bfloat16)")
    parser.add_argument("--threads", type=int, help="PyTorch threads (default: PyTorch's)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


@benchmark("profile", "Where one image's time goes: decode, resize, backbone, RPN, ROI heads, mask pasting, RLE.",
           _bench_profile_arguments)
def _bench_profile(args: argparse.Namespace) -> None:
    from severstal.bench import format_table
    from severstal.bench.profile import profile_predict

    r = profile_predict(args.weights, args.image, repeats=args.repeats, precision=args.precision,
                        threads=args.threads)
    load = r["load_average"]
    print(f"profile: {Path(r['image']).name}, PyTorch {r['precision']}, {r['threads']} threads, p50 of "
          f"{r['repeats']}; {r['detections']} detections, {r['pasted']} pasted; load average "
          f"{load['before'][0]:.2f} -> {load['after'][0]:.2f}")
    print(format_table(r["stages"] + [{"stage": "total", "p50_ms": r["total_ms"], "share": 1.0}],
                       [("stage", ""), ("p50_ms", ".1f"), ("share", ".1%")]))
    if args.json:
        print_json_line(r)


def _bench_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", type=Path, required=True, help="weights file or training output folder")
    parser.add_argument("--images", type=Path, required=True, help="folder of JPEG/PNG images")
    parser.add_argument("--limit", type=int, help="use the first N images (default: all)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per call, the same on both sides")
    parser.add_argument("--actors", type=int, help="Ray's model replicas (default: as severstal predict --ray)")
    parser.add_argument("--cpus-per-actor", type=float, help="CPUs per actor (default: as severstal predict --ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side, taking turns; medians count")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


@benchmark("ray", "Images/s of prediction on a local Ray against one process: same images, model and batches.",
           _bench_ray_arguments)
def _bench_ray(args: argparse.Namespace) -> None:
    from severstal.bench import format_table
    from severstal.bench.ray import bench_ray

    r = bench_ray(args.weights, args.images, batch_size=args.batch_size, limit=args.limit, actors=args.actors,
                  cpus_per_actor=args.cpus_per_actor, num_cpus=args.num_cpus, repeats=args.repeats)
    pool = r["pool"]
    print(f"ray: {r['images']} images, batch size {r['batch_size']}, median of {r['repeats']}; single process "
          f"{r['threads']} threads; "
          f"ray {pool['actors']} actors x ({pool['cpus_per_actor']:g} CPU, {pool['threads']} threads); "
          f"local Ray started in {r['ray_start_s']:.1f} s")
    print(format_table(r["rows"], [("method", ""), ("images", "d"), ("seconds", ".1f"), ("images_per_s", ".2f"),
                                   ("vs_single", ".2f")]))
    before, after = r["load_average"]["before"], r["load_average"]["after"]
    print(f"ray steady / single: {r['ratio']:.2f} (overhead {100 * (1 - r['ratio']):.0f}%); identical submissions: "
          f"{'yes' if r['identical'] else 'no'}; load average before {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}, "
          f"after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}")
    if args.json:
        print_json_line(r)


def _bench_gpu_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu: runs every step's code without a GPU")
    parser.add_argument("--quick", action="store_true", help="small config, 2 iterations, 4 images, a few requests")
    parser.add_argument("--weights", type=Path,
                        help="a trained run to predict, serve and export (default: the model the train step leaves)")
    parser.add_argument("--images", type=Path, help="folder of real images (default: the real sample's train_images)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    parser.add_argument("--no-tests", dest="tests", action="store_false", help="skip pytest -m gpu")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


@benchmark("gpu", "The GPU path: GPU tests, training with AMP, fp32/fp16 prediction, TorchServe on gpu_id, "
           "ONNX Runtime CUDA and TensorRT, in one table (make gpu-check).", _bench_gpu_arguments)
def _bench_gpu(args: argparse.Namespace) -> int:
    import logging

    from severstal.bench import format_table
    from severstal.bench.gpu import CheckSettings, gpu_check

    if args.device != "cpu" and not args.device.startswith("cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.budget <= 0:
        raise ValueError(f"--budget must be > 0 seconds, got {args.budget}")
    logging.basicConfig(level=logging.WARNING, format="severstal bench gpu: %(message)s")
    r = gpu_check(CheckSettings(device=args.device, quick=args.quick, weights=args.weights, images=args.images,
                                budget_s=args.budget, run_tests=args.tests))
    print(f"gpu check: {r['gpu'] or 'no GPU'}, torch {r['torch']} (CUDA {r['cuda']}), device {r['device']}"
          f"{', quick' if r['quick'] else ''}, {r['seconds']:.0f} s")
    print(format_table(r["rows"], [("step", ""), ("what", ""), ("result", ""), ("status", "")]))
    if args.json:
        print_json_line(r)
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

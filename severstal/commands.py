"""The pipeline's commands (``severstal synth`` ... ``severstal figures``): each one's options, its call and what
it prints.

Each ``run_NAME`` calls one package function (imported inside, so that ``severstal --help`` stays fast) and prints
its result; :mod:`severstal.cli` lists them and turns the errors a user can cause into a message. The benchmarks
are in :mod:`severstal.bench.commands`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def print_json_line(obj) -> None:
    """Print one JSON object on one line (the last line of a ``--json`` command's output)."""
    print(json.dumps(obj, sort_keys=True))


def json_option(parser: argparse.ArgumentParser, what: str = "the results") -> None:
    """``--json``: end with one JSON line of ``what``."""
    parser.add_argument("--json", action="store_true", help=f"end with one JSON line of {what}")


def _weights_option(parser: argparse.ArgumentParser, also: str = "") -> None:
    parser.add_argument("--weights", type=Path, required=True, help=f"weights file or training output folder{also}")


def _overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")


def _dice_table(width: int, rows: list[tuple[str, float, float | None]]) -> None:
    """Print rows of (label, model's Dice, all-empty's Dice or None) under a ``model  all-empty`` header."""
    print(f"{'':<{width}}{'model':>8}{'all-empty':>11}")
    for label, model, empty in rows:
        print(f"{label:<{width}}{model:>8.4f}" + (f"{empty:>11.4f}" if empty is not None else ""))


def _size(path: Path) -> str:
    return f"{path} ({path.stat().st_size / 1e6:.1f} MB)"


# Data ------------------------------------------------------------------------------------------------------------

def synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder for train.csv and train_images/")
    parser.add_argument("--images", type=int, required=True, help="number of images to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed; another seed gives other image ids")


def run_synth(args: argparse.Namespace) -> None:
    from severstal.data.synth import make_synthetic_dataset

    s = make_synthetic_dataset(args.out, args.images, seed=args.seed)
    print(f"{s['images']} images in {s['images_dir']} (seed {s['seed']})")
    print(f"{s['defect_free']} defect-free, {s['two_class_images']} with two classes")
    print(f"masks: {', '.join(f'class {c}: {n}' for c, n in s['masks_per_class'].items())}\nlabels: {s['csv']}")


def convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", type=Path, required=True, help="train.csv in either Kaggle format")
    parser.add_argument("--out", type=Path, required=True, help="folder for train.json and val.json")
    parser.add_argument("--images", type=Path, help="image folder: include every image in it, defect-free too")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of images for val.json (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the class-stratified split")
    parser.add_argument("--min-area", type=int, default=0, help="drop instances with fewer pixels")


def run_convert(args: argparse.Namespace) -> None:
    from severstal.data.coco import convert_to_coco

    s = convert_to_coco(args.csv, args.out, images=args.images, val_fraction=args.val_fraction, seed=args.seed,
                        min_area=args.min_area)
    print(f"{s['images']} images ({s['train_images']} train, {s['val_images']} val), {s['masks']} masks")
    print(f"{s['instances']} instances ({', '.join(f'class {c}: {n}' for c, n in s['instances_per_class'].items())})")
    if s["masks_left_out"]:
        print(f"{s['masks_left_out']} masks left out: their images are not in {args.images}")
    print(f"wrote {s['train_json']} and {s['val_json']}")


# Model -----------------------------------------------------------------------------------------------------------

def train_arguments(parser: argparse.ArgumentParser) -> None:
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
    _overrides(parser)


def run_train(args: argparse.Namespace) -> None:
    from severstal.model.train import train

    weights = train(args.data, args.config, args.output, args.opts, resume=args.resume, scratch=args.scratch,
                    num_gpus=args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                    dist_url=args.dist_url, num_processes=args.num_processes)
    print(f"weights: {weights}")


def evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    _weights_option(parser)
    parser.add_argument("--data", type=Path, help="data folder (default: the one trained on)")
    parser.add_argument("--output", type=Path, help="folder for COCO results and figures (default: <run>/eval)")
    parser.add_argument("--tune", action="store_true", help="tune per-class thresholds and save them")
    parser.add_argument("--tta", action="store_true", help="merge flipped views")
    json_option(parser)


def run_evaluate(args: argparse.Namespace) -> None:
    from severstal.model.evaluation import evaluate, evaluation_dir
    from severstal.viz.draw import plot_evaluation

    r = evaluate(args.weights, args.data, args.output, tune=args.tune, tta=args.tta)
    plot_evaluation(r, evaluation_dir(args.weights, args.output))
    _dice_table(18, [("mean Dice", r["mean_dice"], r["empty_baseline"]),
                     *((f"  class {c}", v, None) for c, v in r["dice_per_class"].items()),
                     ("Dice, non-empty", r["dice_nonempty"], None)])
    print(f"{'COCO segm AP':<18}{r['segm_AP']:>8.2f}\n{'COCO bbox AP':<18}{r['bbox_AP']:>8.2f}")
    if args.tune:
        print(f"tuned on {r['images']} images: score thresholds {r['score_thresholds']}, min areas {r['min_areas']}"
              f" (mean Dice before tuning {r['mean_dice_untuned']:.4f})")
    if args.json:
        print_json_line(r)


def cv_arguments(parser: argparse.ArgumentParser) -> None:
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
    json_option(parser, "the mean and spread")
    _overrides(parser)


_CV_ROW = "{:<7}{:>7}{:>11}{:>8}{:>14}" + "{:>8}" * 4 + "{:>7}"


def _cv_row(name: str, r: dict) -> str:
    cells = [f"{r['dice']:.4f}", f"{r['all_empty']:.4f}", f"{r['gain']:+.4f}", f"{r['dice_defect_pairs']:.4f}"]
    cells += [f"{r['dice_per_class'][str(c)]:.3f}" for c in range(1, 5)]
    seconds = r.get("seconds")
    return _CV_ROW.format(name, *cells, f"{seconds:.0f}" if seconds is not None else "")


def run_cv(args: argparse.Namespace) -> None:
    from severstal.model.cv import cross_validate

    logging.basicConfig(level=logging.INFO, format="severstal cv: %(message)s")
    print(_CV_ROW.format("fold", "Dice", "all-empty", "gain", "defect pairs", "c1", "c2", "c3", "c4", "s"))
    report = cross_validate(args.data, args.out, args.config, args.opts, folds=args.folds, seed=args.seed,
                            scratch=args.scratch, pretrain_images=args.pretrain_synthetic,
                            pretrain_iterations=args.pretrain_iterations,
                            on_fold=lambda k, r: print(_cv_row(str(k), r), flush=True))
    mean, spread, plan = report["mean"], report["spread"], report["plan"]
    print(_cv_row("mean", mean))
    print(_CV_ROW.format("+-", *(f"{spread[k]:.4f}" for k in ("dice", "all_empty", "gain", "dice_defect_pairs")),
                         "", "", "", "", ""))
    auc = ", ".join(f"class {c} {v:.2f}" for c, v in mean["presence_auc"].items())
    print(f"presence ROC AUC (mean over folds): {auc}")
    print(f"defect pairs before the gate and minimum areas (the masks alone): {mean['dice_defect_pairs_ungated']:.4f}")
    print(f"Dice with thresholds tuned on the held-out images themselves (the most tuning could reach): "
          f"{mean['dice_tuning_ceiling']:.4f}, gain {mean['dice_tuning_ceiling'] - mean['all_empty']:+.4f}")
    print(f"{mean['folds_beating_all_empty']} of {len(report['folds'])} folds beat all-empty; {plan['images']} images "
          f"scored, {len(plan['left_out_incomplete'])} left out (incomplete truth); {args.out / 'cv.json'}")
    if args.json:
        print_json_line({"mean": mean, "spread": spread})


def predict_arguments(parser: argparse.ArgumentParser) -> None:
    _weights_option(parser)
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


def run_predict(args: argparse.Namespace) -> int:
    from severstal.model.predict import EXIT_UNREADABLE

    if args.ray is None:
        from severstal.model.backends import describe_backend
        from severstal.model.predict import Predictor, predict_folder
        from severstal.viz.draw import overlay_writer

        ray_only = [f"--{k.replace('_', '-')}" for k in ("actors", "cpus_per_actor", "gpus_per_actor", "parquet")
                    if getattr(args, k) is not None]
        if ray_only:
            raise ValueError(f"{', '.join(ray_only)} need(s) --ray")
        predictor = Predictor.from_weights(args.weights, tta=args.tta, backend=args.backend, precision=args.precision)
        print(f"backend: {describe_backend(predictor.backend)}")
        s = predict_folder(args.weights, args.images, args.out, fmt=args.format, batch_size=args.batch_size,
                           predictor=predictor, on_record=overlay_writer(args.overlays) if args.overlays else None)
    else:
        from severstal.model.predict_ray import predict_ray

        if args.overlays:
            raise ValueError("--overlays is not available with --ray")
        s = predict_ray(args.weights, args.images, args.out, address=args.ray, fmt=args.format, tta=args.tta,
                        backend=args.backend, precision=args.precision, batch_size=args.batch_size, actors=args.actors,
                        cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                        parquet=args.parquet)
        pool = s["pool"]
        print(f"ray: {pool['actors']} actors x ({pool['cpus_per_actor']:g} CPU, {pool['gpus_per_actor']:g} GPU, "
              f"{pool['threads']} threads), batch size {args.batch_size}; backend: {s['backend']}")
    per_class = ", ".join(f"class {c}: {n}" for c, n in s["masks_per_class"].items())
    print(f"{s['images']} images, {s['masks']} non-empty masks ({per_class})\nsubmission: {s['submission']}")
    if s.get("parquet"):
        print(f"records: {s['parquet']} (Parquet)")
    for item in s["unreadable"]:
        print(f"severstal predict: unreadable: {item['error']}", file=sys.stderr)
    if s["unreadable"]:
        print(f"severstal predict: {len(s['unreadable'])} of {s['images']} images unreadable, written with empty "
              f"masks; exit status {EXIT_UNREADABLE}", file=sys.stderr)
        return EXIT_UNREADABLE
    return 0


def export_arguments(parser: argparse.ArgumentParser) -> None:
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
    int8.add_argument("--calibration", type=Path, help="folder of real images: the first N calibrate, up to the next "
                      "M check parity")
    int8.add_argument("--calibration-images", type=int, default=16, metavar="N", help="calibration images (default 16)")
    int8.add_argument("--parity-images", type=int, default=64, metavar="M",
                      help="images, never calibrated on, whose class masks must match fp32's "
                      "(default 64: with 8, one mask that appears or vanishes costs 0.031)")


def run_export(args: argparse.Namespace) -> None:
    from severstal.model.export import export_onnx, export_tensorrt

    logging.basicConfig(level=logging.INFO, format="severstal export: %(message)s")
    if args.int8 and (args.format != "onnx" or args.calibration is None):
        raise ValueError("--int8 needs --format onnx and --calibration DIR (real images to calibrate and check on)")
    onnx = args.weights if args.weights.suffix == ".onnx" else None
    if onnx is None:
        onnx = export_onnx(args.weights, args.out, opset=args.opset, simplify=args.simplify,
                           score_floor=args.score_floor)
        print(f"onnx: {_size(onnx)}")
    if args.int8:
        from severstal.model.quantize import quantize_export

        path, report = quantize_export(onnx, args.calibration, args.out, args.calibration_images, args.parity_images)
        print(f"int8: {_size(path)}: {report['quantized_convs']} convolutions, class-mask Dice "
              f"{report['parity_dice']:.4f} against fp32 on {report['parity_images']} images not used for calibration")
    if args.format == "tensorrt":
        print(f"tensorrt: {_size(export_tensorrt(onnx, args.out, fp16=args.fp16))}")


# Serving ---------------------------------------------------------------------------------------------------------

def archive_arguments(parser: argparse.ArgumentParser) -> None:
    _weights_option(parser, ", or an exported model.onnx (or its folder)")
    parser.add_argument("--out", type=Path, required=True, help="model store folder to write NAME.mar into")
    parser.add_argument("--name", default="severstal", help="model name: the /predictions/NAME path")
    parser.add_argument("--version", default="1.0", help="model version")
    parser.add_argument("--model-config", type=Path, help="default: torchserve/model-config.yaml")
    parser.add_argument("--torch-only", action="store_true", help="pack the PyTorch weights alone (by default a "
                        "training run's ONNX and, where its answers hold, int8 exports go beside them, and a CPU "
                        "worker runs the fastest)")
    parser.add_argument("--calibration", type=Path, help="real images to calibrate int8 on (default: the run's "
                        "training images)")


def run_archive(args: argparse.Namespace) -> None:
    from severstal.files import model_file_in
    from severstal.serve.archive import archive, export_for_serving

    weights = model_file_in(args.weights) if args.weights.is_dir() else args.weights
    also = [] if args.torch_only or weights.suffix != ".pth" else export_for_serving(weights, args.calibration)[0]
    path = archive(weights, args.out, name=args.name, version=args.version, model_config=args.model_config, also=also)
    print(f"archive: {_size(path)} with {', '.join(p.name for p in [weights, *also])}")


def serve_arguments(parser: argparse.ArgumentParser) -> None:
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


def run_serve(args: argparse.Namespace) -> int:
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


# The whole pipeline, figures, benchmarks ---------------------------------------------------------------------------

def demo_arguments(parser: argparse.ArgumentParser) -> None:
    from severstal.demo import DemoSettings  # no heavy import: the demo module imports its stages when run

    defaults = DemoSettings()
    parser.add_argument("--out", type=Path, default=Path("demo"), help="folder for every output of the demo")
    parser.add_argument("--images", type=int, default=defaults.train_images, help="synthetic training images")
    parser.add_argument("--iterations", type=int, default=defaults.max_iter,
                        help="training iterations (default: the config's SOLVER.MAX_ITER)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help=f"seed of the data, the split and the training (default {defaults.seed})")
    _overrides(parser)


def run_demo(args: argparse.Namespace) -> None:
    from severstal.demo import DemoSettings, run_demo

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = run_demo(args.out, DemoSettings(train_images=args.images, max_iter=args.iterations, seed=args.seed,
                                                opts=list(args.opts)))
    e, held = r["evaluation"], r["predict"]
    print()
    _dice_table(22, [("mean Dice (val)", e["mean_dice"], e["empty_baseline"]),
                     *((f"  class {c}", v, None) for c, v in e["dice_per_class"].items()),
                     ("mean Dice (held out)", held["holdout_dice"], held["holdout_empty_baseline"])])
    answer, int8 = r["serve"]["first_answer"], r["int8"]
    summary = [(d["class_id"], d["score"], d["area"]) for d in answer["defects"]]
    kept = f"int8 kept ({int8.get('parity_dice', int8.get('why'))})" if int8["kept"] else "int8 refused"
    print(f"\nserved and predicted with {r['served_model']} ({kept})")
    print(f"TorchServe answer for {answer['image']}: {len(summary)} defects (class, score, area) {summary[:5]}")
    print(f"latencies (s): {r['serve']['latencies_s']}")
    print(f"stage seconds: {r['seconds']} (total {sum(r['seconds'].values()):.0f} s; training in "
          f"{r['training_precision']})")
    print(f"figures: {', '.join(r['figures'])}")
    print(f"submission: {r['predict']['submission']}; overlays: {Path(args.out) / 'overlays'}")


def figures_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("graphs"), help="folder for the figures (default graphs)")
    parser.add_argument("--data", type=Path, help="dataset folder (Kaggle layout); default: the real sample in "
                                                  "../shared/data/severstal-real")
    parser.add_argument("--run", type=Path, help="training run folder (e.g. demo/run): curves, Dice, latency")
    parser.add_argument("--images-out", type=Path, help="folder for the README's pictures (e.g. images)")


def run_figures(args: argparse.Namespace) -> None:
    from severstal.figures import write_figures

    r = write_figures(args.out, args.data, args.run, args.images_out)
    print("\n".join([*(f"wrote {path}" for path in r["written"]), *(f"skipped {why}" for why in r["skipped"])]))



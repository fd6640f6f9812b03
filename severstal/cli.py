"""The ``severstal`` command line: a table of contents of the commands (:data:`COMMANDS`).

Each command's options, call and printing live with its kind: the pipeline's in :mod:`severstal.commands`, the
benchmarks' in :mod:`severstal.bench.commands`. Errors a user can cause become a message and exit status 2 here,
once for every command. Nothing heavy is imported before a command runs, so that ``severstal --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NamedTuple

from severstal import commands
from severstal.commands import json_option, print_json_line


class Command(NamedTuple):
    """One ``severstal NAME``: its help line, a function adding its options, and the function running it (it returns
    the exit status, None for 0)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from severstal.bench.commands import BENCHMARKS

    sub = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    for name, entry in BENCHMARKS.items():
        p = sub.add_parser(name, help=entry.help, description=entry.help)
        entry.add_arguments(p)
        json_option(p)
        p.set_defaults(prog=p.prog)


def _bench(args: argparse.Namespace) -> int:
    """Run one benchmark, print its report (and ``--json``'s line); status 1 with the reason when it failed."""
    from severstal.bench.commands import BENCHMARKS, render

    entry = BENCHMARKS[args.what]
    r = entry.run(args)
    print(render(entry.report(r)))
    if args.json:
        print_json_line(r)
    failure = entry.failure(r)
    if failure:
        print(f"{args.prog}: {failure}", file=sys.stderr)
    return 1 if failure else 0


COMMANDS = {
    "synth": Command("Write a synthetic Severstal-like dataset in Kaggle's layout (no download).",
                     commands.synth_arguments, commands.run_synth),
    "convert": Command("Convert a train.csv into COCO instance JSON (one instance per connected component).",
                       commands.convert_arguments, commands.run_convert),
    "train": Command("Train Mask R-CNN on a folder in Kaggle's layout.", commands.train_arguments, commands.run_train),
    "evaluate": Command("Mean Dice (per class, vs the all-empty baseline) and COCO AP on the validation split.",
                        commands.evaluate_arguments, commands.run_evaluate),
    "cv": Command("k-fold cross-validation on labelled images: train, tune, score each held-out fold vs all-empty.",
                  commands.cv_arguments, commands.run_cv),
    "predict": Command("Predict images into a Kaggle submission (one process, or a Ray cluster with --ray). "
                       "Exit status 3: some files were unreadable (named on stderr; their masks are written empty).",
                       commands.predict_arguments, commands.run_predict),
    "export": Command("Export a trained model to ONNX (simplified, checked) or a TensorRT engine.",
                      commands.export_arguments, commands.run_export),
    "archive": Command("Pack weights, config, thresholds and the handler into a TorchServe .mar.",
                       commands.archive_arguments, commands.run_archive),
    "serve": Command("Serve the model store with TorchServe (or Ray Serve) until Ctrl-C or SIGTERM.",
                     commands.serve_arguments, commands.run_serve),
    "demo": Command("The whole pipeline on synthetic data, offline: synth, train, evaluate, predict, serve.",
                    commands.demo_arguments, commands.run_demo),
    "figures": Command("Write the figures (class balance, areas, positions, examples, losses, Dice, latency) as PNG.",
                       commands.figures_arguments, commands.run_figures),
    "bench": Command("Benchmarks; `severstal bench WHAT --help` for each.", _bench_arguments, _bench),
}
"""Every ``severstal`` command, in the pipeline's order: data, model, serving, then the demo, figures and benchmarks."""


def expected_errors() -> tuple[type[Exception], ...]:
    """The errors that mean a wrong input or a missing optional engine, not a bug.

    ValueError (ParityError, ImageError, RLEError among them), FileNotFoundError, and BackendUnavailable and
    PredictionError once their modules are loaded: only then can they have been raised, and loading
    ``severstal.model.backends`` here would load PyTorch.
    """
    errors: list[type[Exception]] = [ValueError, FileNotFoundError]
    loaded = (("severstal.model.backends", "BackendUnavailable"), ("severstal.serve.client", "PredictionError"))
    for module, name in loaded:
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="severstal",
        description="Steel-defect segmentation: Severstal data -> Detectron2 Mask R-CNN -> TorchServe.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, entry in COMMANDS.items():
        p = sub.add_parser(name, help=entry.help, description=entry.help)
        entry.add_arguments(p)
        p.set_defaults(func=entry.run, prog=p.prog)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``severstal ARGV``; an expected error (:func:`expected_errors`) is printed as ``PROG: error: ...`` with
    exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except expected_errors() as err:
        print(f"{args.prog}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

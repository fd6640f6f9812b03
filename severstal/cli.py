"""The ``severstal`` command line: parses arguments, calls the package, prints results.

Every command is a thin layer over an importable function; heavy modules are imported inside the
command so that ``severstal --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int | None]]] = {}


def command(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``func(args)`` as the sub-command ``name``."""

    def decorator(func):
        COMMANDS[name] = (help_text, add_arguments, func)
        return func

    return decorator


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
    from severstal.coco import convert_to_coco

    s = convert_to_coco(args.csv, args.out, images=args.images, val_fraction=args.val_fraction, seed=args.seed,
                        min_area=args.min_area)
    per_class = ", ".join(f"class {c}: {n}" for c, n in s["instances_per_class"].items())
    print(f"{s['images']} images ({s['train_images']} train, {s['val_images']} val), {s['masks']} masks")
    print(f"{s['instances']} instances ({per_class})")
    if s["masks_left_out"]:
        print(f"{s['masks_left_out']} masks left out: their images are not in {args.images}")
    print(f"wrote {s['train_json']} and {s['val_json']}")


BENCHMARKS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int | None]]] = {}
"""Sub-benchmarks of ``severstal bench WHAT``; add one with :func:`benchmark`."""


def benchmark(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``func(args)`` as ``severstal bench NAME``."""

    def decorator(func):
        BENCHMARKS[name] = (help_text, add_arguments, func)
        return func

    return decorator


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
    from severstal.bench import bench_convert, format_table, real_train_csv

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


if __name__ == "__main__":
    sys.exit(main())

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

if __name__ == "__main__":
    sys.exit(main())

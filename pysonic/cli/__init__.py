"""The ``pysonic`` command line: ``pysonic <command> ...``.

Each command lives in its own module of this package (``pysonic/cli/<command>.py``) and defines
``add_parser(subparsers)``, which adds its sub-parser and sets ``func`` (called with the parsed
arguments, returns an exit code). Commands import their heavy dependencies inside ``func`` so
``pysonic --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Module names under pysonic.cli, in the order `pysonic --help` lists them.
COMMANDS: list[str] = ["generate", "vocode", "train", "bench", "codec"]


class CLIError(Exception):
    """A user error: printed as ``pysonic <command>: error: ...`` with exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pysonic", description="Fast, hackable neural audio generation.")
    parser.add_argument("--version", action="store_true", help="print the version and build, then exit")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMANDS:
        importlib.import_module(f"pysonic.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pysonic`` script and of ``python -m pysonic``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        import pysonic

        print(f"pysonic {pysonic.__version__} ({pysonic.build_info()})")
        return 0
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        # Bad input is reported in one line; anything else is a bug and keeps its traceback.
        print(f"pysonic {args.command}: error: {exc}", file=sys.stderr)
        return 2

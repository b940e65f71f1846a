"""The `gatedmoe` command. Each subcommand lives in its own module of this package and
exposes ``register(subparsers)``, which adds its parser and sets ``func``.

A user mistake (a bad flag value, a missing or unwritable path, a device this machine does
not have, a malformed file) ends as one line on stderr and exit status 2, never a traceback:
subcommands raise `gatedmoe.cli._common.UsageError`, and the ``ValueError`` / ``TypeError``
/ ``OSError`` that the library raises for bad input are reported the same way (``-v`` shows
their traceback too)."""

from __future__ import annotations

import importlib
import logging
import sys
import traceback

from gatedmoe.cli._common import Parser, UsageError, print_error

__all__ = ["main", "build_parser"]

# Subcommand modules, in the order `gatedmoe --help` lists them.
SUBCOMMANDS = ["compare", "train", "predict", "bench", "simulate", "fit"]


def build_parser() -> Parser:
    parser = Parser(
        prog="gatedmoe",
        description="Gated mixture-of-experts: train, compare, benchmark and fit MoE models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level; show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in SUBCOMMANDS:
        importlib.import_module(f"gatedmoe.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print_error(_prog(argv), str(e))
        raise
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    prog = f"gatedmoe {args.command}"
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print_error(prog, str(e))
        raise
    except (ValueError, TypeError, OSError) as e:
        # The library's contract: bad input raises ValueError/TypeError naming the argument;
        # a missing or unreadable file is an OSError. One line, as for the CLI's own checks.
        if args.verbose:
            traceback.print_exc()
        message = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print_error(prog, message or type(e).__name__)
        raise UsageError(message) from None
    except KeyboardInterrupt:
        print_error(prog, "interrupted")
        return 130


def _prog(argv: list[str] | None) -> str:
    words = sys.argv[1:] if argv is None else argv
    command = next((w for w in words if w in SUBCOMMANDS), None)
    return "gatedmoe" if command is None else f"gatedmoe {command}"


if __name__ == "__main__":
    sys.exit(main())

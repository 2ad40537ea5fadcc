"""The `linrec` command line: one module per subcommand (serve, generate, convert, demo-model, info, bench).

Each subcommand module registers its parser in `add_parser` and runs in `run`; the model and engine flags
they share live in cli/common.py. Heavy imports (torch, transformers) happen inside the handlers so that
`linrec --help` stays fast. Bad input ends in one line on stderr and exit code 2 (argparse usage errors) or
1 (everything else), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import linrec
from linrec.cli import bench, convert, demo_model, generate, info, router, serve

# Exceptions that mean "the input is wrong", reported as one line; anything else is a bug and
# keeps its traceback.
_USER_ERRORS = (ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linrec",
        description="Serve linearized and recurrent LLMs: one constant-size state per request instead of a KV cache.",
    )
    parser.add_argument("--version", action="version", version=f"linrec {linrec.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (convert, demo_model, router, info, generate, bench, serve):
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except _USER_ERRORS as exc:
        print(f"linrec: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

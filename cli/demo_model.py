"""`linrec demo-model`: write a tiny seeded random checkpoint of one family."""

from __future__ import annotations

import argparse

from linrec.models.demo import DEFAULT_DEMO_FAMILY
from linrec.models.registry import DEMO_FAMILIES


def add_parser(commands) -> None:
    demo = commands.add_parser(
        "demo-model",
        help="write a tiny random checkpoint with a byte-level tokenizer",
        description="Write a tiny seeded random model of one family, loadable with --model DIR.",
    )
    demo.add_argument("dir", metavar="DIR", help="output directory (must not exist or be empty)")
    demo.add_argument(
        "--family", default=DEFAULT_DEMO_FAMILY, choices=DEMO_FAMILIES, help="model family (default: %(default)s)"
    )
    demo.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from linrec.models.demo import write_demo_model

    dst = write_demo_model(args.dir, args.family)
    print(f"wrote {args.family} demo model to {dst}")
    return 0

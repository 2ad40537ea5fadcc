"""`linrec convert`: write a Liger-GLA checkpoint from a Llama/Qwen2/Mistral one."""

from __future__ import annotations

import argparse

from linrec.models.loader import LINEARIZE_CHOICES


def add_parser(commands) -> None:
    convert = commands.add_parser(
        "convert",
        help="write a Liger-GLA checkpoint from a Llama/Qwen2/Mistral one",
        description="Copy SRC's weights, tokenizer and generation config to DST with a linearized config.json.",
    )
    convert.add_argument("--to", required=True, choices=LINEARIZE_CHOICES, help="target family")
    convert.add_argument("src", metavar="SRC", help="local HF-format checkpoint directory")
    convert.add_argument("dst", metavar="DST", help="output directory (must not exist or be empty)")
    convert.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from linrec.models.convert import convert_checkpoint

    dst = convert_checkpoint(args.src, args.dst, to=args.to)
    print(f"wrote {args.to} checkpoint to {dst}")
    return 0

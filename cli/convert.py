"""`linrec convert`: write a Liger-GLA checkpoint from a Llama/Qwen2/Mistral one, or a LoLCATs one from a
Llama/Mistral base and the released LoLCATs weights (docs/lolcats.md)."""

from __future__ import annotations

import argparse

from linrec.models.loader import LINEARIZE_CHOICES

CONVERT_CHOICES = (*LINEARIZE_CHOICES, "lolcats")


def add_parser(commands) -> None:
    convert = commands.add_parser(
        "convert",
        help="write a Liger-GLA or LoLCATs checkpoint from a Llama/Qwen2/Mistral one",
        description=(
            "Copy SRC's weights, tokenizer and generation config to DST with a linearized config.json. "
            "--to lolcats also takes the released LoLCATs .pt files (--lolcats-weights, in order: attention "
            "transfer, then LoRA finetune): their feature maps and window factors are written beside the weights "
            "and their LoRA is merged when the model loads."
        ),
    )
    convert.add_argument("--to", required=True, choices=CONVERT_CHOICES, help="target family")
    convert.add_argument(
        "--lolcats-weights",
        action="append",
        metavar="FILE",
        help="a released LoLCATs .pt file (repeat for several; later files win); required with --to lolcats",
    )
    convert.add_argument(
        "--lora-alpha",
        type=float,
        default=None,
        help="the LoLCATs LoRA's alpha (the .pt files do not hold it; default: 2 * rank, as in every release)",
    )
    convert.add_argument("src", metavar="SRC", help="local HF-format checkpoint directory")
    convert.add_argument("dst", metavar="DST", help="output directory (must not exist or be empty)")
    convert.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.to == "lolcats":
        from linrec.models.lolcats_checkpoint import convert_lolcats

        if not args.lolcats_weights:
            raise ValueError("--to lolcats needs --lolcats-weights FILE (the released .pt files)")
        dst = convert_lolcats(args.src, args.dst, args.lolcats_weights, lora_alpha=args.lora_alpha)
    else:
        if args.lolcats_weights or args.lora_alpha is not None:
            raise ValueError(f"--lolcats-weights and --lora-alpha go with --to lolcats, not --to {args.to}")
        from linrec.models.convert import convert_checkpoint

        dst = convert_checkpoint(args.src, args.dst, to=args.to)
    print(f"wrote {args.to} checkpoint to {dst}")
    return 0

"""`linrec info`: load a model and print its size and per-request state."""

from __future__ import annotations

import argparse

from linrec.cli.common import add_model_args


def add_parser(commands) -> None:
    info = commands.add_parser(
        "info",
        help="load a model and print its size and per-request state",
        description="Load a model with the given flags and report what serving it costs per request.",
    )
    add_model_args(info)
    info.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from linrec.models.demo import default_model_path
    from linrec.models.loader import load_model, load_tokenizer

    path = args.model if args.model is not None else str(default_model_path())
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(
        path,
        dtype=args.dtype,
        device=device,
        kernel_backend=args.kernel_backend,
        linearize=args.linearize,
        merge_lora=args.merge_lora,
    )
    tokenizer = load_tokenizer(path)
    num_params = sum(p.numel() for p in model.parameters())
    param = next(model.parameters())
    rows = {
        "model": path,
        "class": type(model).__name__,
        "parameters": f"{num_params:,}",
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": str(param.device),
        "state per request": f"{model.state_bytes_per_request():,} bytes (constant in context length)",
        "tokenizer": f"{len(tokenizer)} tokens, chat template {'yes' if tokenizer.chat_template else 'no'}",
    }
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0

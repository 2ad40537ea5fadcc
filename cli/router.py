"""`linrec router`: write a seeded random layer-router directory for a checkpoint (docs/routing.md), for tests and
demos; a trained router in the same format drops in with `--router DIR`."""

from __future__ import annotations

import argparse


def add_parser(commands) -> None:
    router = commands.add_parser(
        "router",
        help="write seeded random layer routers for a checkpoint",
        description="Write a seeded random router directory (router_config.json, router.safetensors) sized for the "
        "checkpoint in MODEL: one Dr.LLM-style router per decoder layer. Serve it with --router DIR.",
    )
    router.add_argument("model", metavar="MODEL", help="checkpoint directory (its config.json gives the sizes)")
    router.add_argument("dir", metavar="DIR", help="output directory (must not exist or be empty)")
    router.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    router.add_argument("--router-hidden", type=int, default=128, help="router MLP width (default: %(default)s)")
    router.add_argument(
        "--num-windows", type=int, default=4, help="windows a prompt chunk is mean-pooled over (default: %(default)s)"
    )
    router.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from linrec.models.loader import check_model_dir, read_hf_config
    from linrec.models.router import write_random_routers

    for name in ("router_hidden", "num_windows"):
        if getattr(args, name) < 1:
            raise ValueError(f"expected --{name.replace('_', '-')} >= 1, got {getattr(args, name)}")
    config = read_hf_config(check_model_dir(args.model))
    sizes = {key: config.get(key) for key in ("num_hidden_layers", "hidden_size")}
    bad = [key for key, value in sizes.items() if not isinstance(value, int) or value < 1]
    if bad:
        raise ValueError(f"{args.model}: expected a positive integer {bad[0]} in config.json, got {sizes[bad[0]]!r}")
    dst = write_random_routers(
        args.dir,
        sizes["num_hidden_layers"],
        sizes["hidden_size"],
        seed=args.seed,
        router_hidden=args.router_hidden,
        num_windows=args.num_windows,
        base_model_name_or_path=str(args.model),
    )
    print(f"wrote {sizes['num_hidden_layers']} layer routers for {args.model} to {dst}")
    return 0

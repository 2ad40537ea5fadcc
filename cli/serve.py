"""`linrec serve [MODEL]`: the OpenAI-compatible HTTP server; its flags map onto EngineConfig and ServerConfig."""

from __future__ import annotations

import argparse
import dataclasses

from linrec.cli.common import add_config_args, add_engine_args, add_model_args, config_kwargs, engine_config_from_args
from linrec.server.config import ServerConfig

SERVER_FIELDS = tuple(f.name for f in dataclasses.fields(ServerConfig))


def add_parser(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Start the OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
        "/tokenize, /detokenize, /health, /version, /metrics). SIGTERM drains in-flight requests first.",
    )
    serve.add_argument("model_path", nargs="?", default=None, metavar="MODEL", help="same as --model")
    add_model_args(serve)
    add_engine_args(serve)
    add_config_args(serve.add_argument_group("server"), ServerConfig, SERVER_FIELDS)
    serve.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="engine replicas: more than 1 starts a local Ray instance and serves them as Ray Serve replicas behind "
        "this endpoint, routed by prefix, adapter and conversation (needs linrec[ray]; docs/scale-out.md) "
        "(default: %(default)s)",
    )
    serve.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        raise ValueError(f"expected --replicas >= 1, got {args.replicas}")
    if args.model_path is not None:
        if args.model is not None and args.model != args.model_path:
            raise ValueError(f"expected one model, got MODEL={args.model_path!r} and --model={args.model!r}")
        args.model = args.model_path
    server_config = ServerConfig(**config_kwargs(args, SERVER_FIELDS))
    engine_config = engine_config_from_args(args)
    if args.replicas == 1:  # one engine in this process: no Ray
        from linrec.server.app import run_server

        return run_server(engine_config, server_config)
    try:
        from linrec.server.ray_serve import run_ray_server
    except ImportError as exc:
        raise ValueError(f"--replicas {args.replicas} needs Ray Serve: pip install 'linrec[ray]' ({exc})") from None
    return run_ray_server(engine_config, server_config, args.replicas)

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
    serve.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from linrec.server.app import run_server

    if args.model_path is not None:
        if args.model is not None and args.model != args.model_path:
            raise ValueError(f"expected one model, got MODEL={args.model_path!r} and --model={args.model!r}")
        args.model = args.model_path
    server_config = ServerConfig(**config_kwargs(args, SERVER_FIELDS))
    return run_server(engine_config_from_args(args), server_config)

"""`linrec serve [MODEL]`: the OpenAI-compatible HTTP server; its flags map onto EngineConfig and ServerConfig."""

from __future__ import annotations

import argparse

from linrec.cli.common import add_engine_args, add_model_args, engine_config_from_args, parse_state_memory


def add_parser(commands) -> None:
    """`linrec serve [MODEL]`: the OpenAI-compatible HTTP server; server flags map onto ServerConfig."""
    serve = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Start the OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
        "/tokenize, /detokenize, /health, /version, /metrics). SIGTERM drains in-flight requests first.",
    )
    serve.add_argument("model_path", nargs="?", default=None, metavar="MODEL", help="same as --model")
    add_model_args(serve)
    add_engine_args(serve)
    group = serve.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for every interface)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument(
        "--api-key",
        dest="api_key",
        default=None,
        help="require `Authorization: Bearer KEY` on every route but /health, /version, /openapi.json and "
        "/metrics (or LINREC_API_KEY)",
    )
    group.add_argument(
        "--served-model-name", dest="served_model_name", default=None, help="the model name clients send"
    )
    group.add_argument(
        "--drain-timeout", dest="drain_timeout", type=float, default=30.0, help="seconds to finish requests on SIGTERM"
    )
    group.add_argument("--log-level", dest="log_level", default="info", choices=("debug", "info", "warning", "error"))

    def byte_count(text: str) -> int:
        try:
            value = parse_state_memory(text)  # '1' comes back as the fraction 1.0
        except (argparse.ArgumentTypeError, OverflowError):  # OverflowError: 'inf'
            value = 0
        if not 1 <= value < float("inf") or value != int(value):
            raise argparse.ArgumentTypeError(f"expected a byte count such as 16MiB or 1000000, got {text!r}")
        return int(value)

    group.add_argument(
        "--max-request-body-bytes",
        dest="max_request_body_bytes",
        type=byte_count,
        default=16 * 2**20,
        help="larger request bodies get 413 before they are parsed (bytes, or 16MiB, 1GB; default 16MiB)",
    )
    group.add_argument(
        "--metrics-require-api-key",
        dest="metrics_require_api_key",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="put /metrics behind --api-key too (Prometheus: `authorization: {credentials: KEY}`)",
    )
    serve.set_defaults(handler=run)


SERVER_ARG_FIELDS = (
    "host",
    "port",
    "api_key",
    "served_model_name",
    "drain_timeout",
    "log_level",
    "max_request_body_bytes",
    "metrics_require_api_key",
)


def run(args: argparse.Namespace) -> int:
    from linrec.server.app import run_server
    from linrec.server.config import ServerConfig

    if args.model_path is not None:
        if args.model is not None and args.model != args.model_path:
            raise ValueError(f"expected one model, got MODEL={args.model_path!r} and --model={args.model!r}")
        args.model = args.model_path
    server_config = ServerConfig(**{name: getattr(args, name) for name in SERVER_ARG_FIELDS})
    return run_server(engine_config_from_args(args), server_config)

"""ServerConfig: the HTTP server's knobs in one frozen, validated dataclass.

As in EngineConfig, each field carries its command-line help (and parser or choices) in `metadata`, and
`linrec serve` builds its server flags from these fields. This module loads without torch, fastapi or
uvicorn, so that `linrec serve --help` is fast.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from linrec.engine.config import parse_byte_size

# 16 MiB: a prompt far beyond any context linrec serves still fits (a million token ids as JSON take ~7 MB,
# a 128k-token text ~0.5 MB, or ~3 MB when every character is a JSON \u escape), while one request can no
# longer hold gigabytes: parsed JSON takes several times its size in Python objects.
DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 2**20
LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_byte_count(text: str) -> int:
    """'16MiB', '1GB', '1e6' or '1000000' -> that many bytes (a whole number, at least 1)."""
    try:
        value, _ = parse_byte_size(text)
    except ValueError:
        value = 0.0
    if value < 1 or value != int(value):
        raise ValueError(f"expected a byte count such as 16MiB or 1000000, got {text!r}")
    return int(value)


def parse_lora_module(text: str) -> tuple[str, str]:
    """vLLM's --lora-modules item: 'NAME=DIR' or '{"name": NAME, "path": DIR}' -> (NAME, DIR)."""
    if text.lstrip().startswith("{"):
        try:
            item = json.loads(text)
        except json.JSONDecodeError:
            item = None
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("path"), str):
            raise ValueError(f'expected a LoRA module as NAME=DIR or {{"name": ..., "path": ...}}, got {text!r}')
        name, path = item["name"], item["path"]
    else:
        name, sep, path = text.partition("=")
        if not sep:
            raise ValueError(f"expected a LoRA module as NAME=DIR, got {text!r}")
    if not name or not path:
        raise ValueError(f"expected a LoRA module as NAME=DIR with both parts non-empty, got {text!r}")
    return name, path


@dataclass(frozen=True)
class ServerConfig:
    # Loopback unless asked: 0.0.0.0 exposes the server to the network.
    host: str = field(default="127.0.0.1", metadata={"help": "bind address (0.0.0.0 for every interface)"})
    port: int = field(default=8000, metadata={"help": "TCP port to listen on"})
    # None = LINREC_API_KEY, and no key anywhere = no auth.
    api_key: str | None = field(
        default=None,
        metadata={
            "help": "require `Authorization: Bearer KEY` on every route but /health, /version, /openapi.json and "
            "/metrics (or LINREC_API_KEY)"
        },
    )
    served_model_name: str | None = field(
        default=None,
        metadata={"help": "the model name clients send (default: the model path, or linrec-default)"},
    )
    drain_timeout: float = field(
        default=30.0,
        metadata={"help": "seconds in-flight requests get to finish after SIGTERM; those still running get 503"},
    )
    log_level: str = field(default="info", metadata={"help": "uvicorn's log level", "choices": LOG_LEVELS})
    max_request_body_bytes: int = field(
        default=DEFAULT_MAX_REQUEST_BODY_BYTES,
        metadata={
            "help": "larger request bodies get 413 before they are parsed (bytes, or 16MiB, 1GB)",
            "parse": parse_byte_count,
            "metavar": "BYTES",
        },
    )
    # Off by default, as Prometheus setups (and vLLM) expect an open scrape.
    metrics_require_api_key: bool = field(
        default=False,
        metadata={"help": "put /metrics behind --api-key too (Prometheus: `authorization: {credentials: KEY}`)"},
    )

    # Adapters served from start-up (needs --enable-lora); more come and go through /v1/load_lora_adapter.
    lora_modules: tuple[tuple[str, str], ...] = field(
        default=(),
        metadata={
            "help": 'LoRA adapters to serve, each NAME=DIR (or JSON {"name": ..., "path": ...}); a request\'s '
            "model picks one by NAME",
            "parse": parse_lora_module,
            "nargs": "+",
            "metavar": "NAME=DIR",
        },
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_modules", tuple(tuple(m) for m in self.lora_modules or ()))
        names = [name for name, _ in self.lora_modules]
        if len(set(names)) != len(names):
            raise ValueError(f"expected distinct LoRA module names, got {names}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"expected a port in [0, 65535], got {self.port}")
        if self.drain_timeout < 0:
            raise ValueError(f"expected drain_timeout >= 0, got {self.drain_timeout}")
        if self.api_key == "":
            raise ValueError("expected a non-empty api_key or None")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"expected log_level in {LOG_LEVELS}, got {self.log_level!r}")
        if isinstance(self.max_request_body_bytes, bool) or not isinstance(self.max_request_body_bytes, int):
            raise ValueError(f"expected max_request_body_bytes as an int, got {self.max_request_body_bytes!r}")
        if self.max_request_body_bytes < 1:
            raise ValueError(f"expected max_request_body_bytes >= 1, got {self.max_request_body_bytes}")

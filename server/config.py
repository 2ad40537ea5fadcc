"""ServerConfig: the HTTP server's knobs in one frozen, validated dataclass (`linrec serve` flags map onto its
fields). Like EngineConfig it loads without torch, fastapi or uvicorn, so that `linrec serve --help` is fast.
"""

from __future__ import annotations

from dataclasses import dataclass

# 16 MiB: a prompt far beyond any context linrec serves still fits (a million token ids as JSON take ~7 MB,
# a 128k-token text ~0.5 MB, or ~3 MB when every character is a JSON \u escape), while one request can no
# longer hold gigabytes: parsed JSON takes several times its size in Python objects.
DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 2**20


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless asked: 0.0.0.0 exposes the server to the network
    port: int = 8000
    # Every route but /health, /version, /openapi.json (and /metrics, see below) demands
    # `Authorization: Bearer <key>`; None = LINREC_API_KEY, and no key anywhere = no auth.
    api_key: str | None = None
    served_model_name: str | None = None  # the `model` clients send; None = the model path (or linrec-demo)
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM; then 503
    log_level: str = "info"
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES  # larger bodies get 413 before they are parsed
    # /metrics behind the API key too; off by default, as Prometheus setups (and vLLM) expect an open scrape.
    metrics_require_api_key: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"expected a port in [0, 65535], got {self.port}")
        if self.drain_timeout < 0:
            raise ValueError(f"expected drain_timeout >= 0, got {self.drain_timeout}")
        if self.api_key == "":
            raise ValueError("expected a non-empty api_key or None")
        if isinstance(self.max_request_body_bytes, bool) or not isinstance(self.max_request_body_bytes, int):
            raise ValueError(f"expected max_request_body_bytes as an int, got {self.max_request_body_bytes!r}")
        if self.max_request_body_bytes < 1:
            raise ValueError(f"expected max_request_body_bytes >= 1, got {self.max_request_body_bytes}")

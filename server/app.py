"""The app factory and the uvicorn runner with a SIGTERM drain.

SIGTERM: new requests get 503 while the ones in flight finish (up to drain_timeout seconds), then
uvicorn stops; whatever is still running then is cancelled, which aborts its engine requests. A
second SIGTERM, or SIGINT, stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from types import FrameType

import uvicorn
from fastapi import FastAPI

from linrec import envs
from linrec.engine.async_llm import AsyncLLM
from linrec.engine.config import EngineConfig
from linrec.server.metrics import Metrics
from linrec.server.routes import ServerMiddleware, ServerState, build_router, install_error_handlers
from linrec.server.serving import OpenAIServing

logger = logging.getLogger(__name__)
DEMO_MODEL_NAME = "linrec-demo"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless asked: 0.0.0.0 exposes the server to the network
    port: int = 8000
    api_key: str | None = None  # every /v1 route demands `Authorization: Bearer <key>`; None = LINREC_API_KEY
    served_model_name: str | None = None  # the `model` clients send; None = the model path (or linrec-demo)
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"expected a port in [0, 65535], got {self.port}")
        if self.drain_timeout < 0:
            raise ValueError(f"expected drain_timeout >= 0, got {self.drain_timeout}")
        if self.api_key == "":
            raise ValueError("expected a non-empty api_key or None")


def model_name_for(engine_config: EngineConfig, server_config: ServerConfig) -> str:
    if server_config.served_model_name:
        return server_config.served_model_name
    if engine_config.model is None:
        return DEMO_MODEL_NAME
    return str(engine_config.model)


def build_app(llm: AsyncLLM, config: ServerConfig, model_name: str) -> FastAPI:
    """One app per engine; each app has its own metrics registry and drain state (app.state.server)."""
    metrics = Metrics(model_name, llm.engine.stats)
    serving = OpenAIServing(llm, model_name, metrics)
    state = ServerState()
    app = FastAPI(title="linrec", docs_url=None, redoc_url=None, openapi_url=None)
    router = build_router(serving)
    app.include_router(router)
    install_error_handlers(app)
    api_key = config.api_key if config.api_key is not None else envs.api_key()
    route_paths = frozenset(route.path for route in router.routes)
    app.add_middleware(ServerMiddleware, state=state, metrics=metrics, api_key=api_key, route_paths=route_paths)
    app.state.server = state
    app.state.serving = serving
    app.state.metrics = metrics
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains instead of closing the listening socket at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.state.is_draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self.state.is_draining = True
        logger.info(
            "linrec: SIGTERM, draining %d request(s) for up to %.0fs", self.state.num_inflight, self.drain_timeout
        )
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.state.num_inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.state.num_inflight:
            logger.warning("linrec: drain timeout, cancelling %d request(s)", self.state.num_inflight)
        self.should_exit = True


def run_server(engine_config: EngineConfig, config: ServerConfig) -> int:
    llm = AsyncLLM(engine_config, progress=True)
    try:
        app = build_app(llm, config, model_name_for(engine_config, config))
        uv_config = uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            timeout_graceful_shutdown=1,  # the drain already waited; this only bounds the cancel
            access_log=False,
        )
        server = DrainingServer(uv_config, app.state.server, config.drain_timeout)
        server.run()
    finally:
        llm.shutdown()
    return 0

"""The app factory and the uvicorn runner with a SIGTERM drain.

SIGTERM: new requests get 503 while the ones in flight finish (up to drain_timeout seconds). Those still
running then end with a 503 in OpenAI's shape (a stream: an error event, then [DONE]) and their engine
requests are aborted; then uvicorn stops. A second SIGTERM, or SIGINT, stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

import linrec
from linrec import envs
from linrec.engine.async_llm import AsyncLLM
from linrec.engine.client import EngineClient
from linrec.engine.config import EngineConfig
from linrec.server.config import ServerConfig
from linrec.server.metrics import Metrics
from linrec.server.routes import (
    ServerMiddleware,
    ServerState,
    build_router,
    install_error_handlers,
    install_openapi,
)
from linrec.server.serving import OpenAIServing

logger = logging.getLogger(__name__)
# What clients call the shipped default model (models/default/) when no model and no name are given.
DEFAULT_MODEL_NAME = "linrec-default"


def model_name_for(engine_config: EngineConfig, server_config: ServerConfig) -> str:
    if server_config.served_model_name:
        return server_config.served_model_name
    if engine_config.model is None:
        return DEFAULT_MODEL_NAME
    return str(engine_config.model)


def build_app(llm: EngineClient, config: ServerConfig, model_name: str) -> FastAPI:
    """One app per engine client (engine/client.py: an in-process AsyncLLM, or replicas behind one); each app has
    its own metrics registry and drain state (app.state.server). Call it outside an event loop: it loads
    --lora-modules before serving."""
    if config.lora_modules and not llm.info.serves_adapters:
        raise ValueError("--lora-modules needs --enable-lora (the engine allocates adapter slots only then)")
    for name, path in config.lora_modules:
        if name == model_name:
            raise ValueError(f"expected LoRA module names other than the served model's {model_name!r}")
        asyncio.run(llm.load_lora_adapter(name, path))
    metrics = Metrics(model_name, llm.stats)
    serving = OpenAIServing(llm, model_name, metrics)
    state = ServerState()
    app = FastAPI(
        title="linrec", version=linrec.__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json"
    )
    router = build_router(serving)
    app.include_router(router)
    install_error_handlers(app)
    api_key = config.api_key if config.api_key is not None else envs.api_key()
    install_openapi(app, model_name, llm.info.vocab_size, api_key is not None, config.metrics_require_api_key)
    if config.metrics_require_api_key and api_key is None:
        raise ValueError("metrics_require_api_key needs an API key (--api-key or LINREC_API_KEY), got none")
    route_paths = frozenset(route.path for route in router.routes)
    app.add_middleware(
        ServerMiddleware,
        state=state,
        metrics=metrics,
        api_key=api_key,
        route_paths=route_paths,
        max_request_body_bytes=config.max_request_body_bytes,
        is_metrics_protected=config.metrics_require_api_key,
    )
    app.state.server = state
    app.state.serving = serving
    app.state.metrics = metrics
    return app


# After the drain timeout, how long the requests ended with 503 get to send it before uvicorn cancels them.
EXPIRED_FLUSH_TIMEOUT = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains instead of closing the listening socket at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, serving: OpenAIServing, drain_timeout: float):
        super().__init__(config)
        self.state = state
        self.serving = serving
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
            logger.warning("linrec: drain timeout, ending %d request(s) with 503", self.state.num_inflight)
            self.serving.expire_inflight(
                f"the server is shutting down: this request did not finish within the drain timeout "
                f"({self.drain_timeout:g}s)"
            )
            deadline = time.monotonic() + EXPIRED_FLUSH_TIMEOUT
            while self.state.num_inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        self.should_exit = True


def serve_app(app: FastAPI, config: ServerConfig) -> None:
    """Serve a built app with uvicorn until it stops (SIGTERM drains it first); the engine client is the caller's
    to shut down."""
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=1,  # the drain already waited; this only bounds the cancel
        access_log=False,
    )
    server = DrainingServer(uv_config, app.state.server, app.state.serving, config.drain_timeout)
    server.run()
    app.state.serving.close()


def run_server(engine_config: EngineConfig, config: ServerConfig) -> int:
    if config.lora_modules and not engine_config.enable_lora:  # before minutes of model loading, not after
        raise ValueError("--lora-modules needs --enable-lora (the engine allocates adapter slots only then)")
    llm = AsyncLLM(engine_config, progress=True)
    try:
        serve_app(build_app(llm, config, model_name_for(engine_config, config)), config)
    finally:
        llm.shutdown()
    return 0

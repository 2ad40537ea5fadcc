"""Live servers on loopback for the HTTP tests: uvicorn in a thread over a tiny demo model."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from linrec.engine.async_llm import AsyncLLM
from linrec.engine.config import EngineConfig
from linrec.models.demo import write_demo_model
from linrec.server.app import build_app
from linrec.server.config import ServerConfig

MODEL_NAME = "demo"


@dataclass
class LiveServer:
    base_url: str  # http://127.0.0.1:PORT
    app: FastAPI
    llm: AsyncLLM
    api_key: str | None

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.v1, api_key=self.api_key or "unused", max_retries=0, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server_model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("server-demo")
    write_demo_model(path, "liger_gla")
    return str(path)


@contextlib.contextmanager
def run_app(app: FastAPI) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def app_over(llm: AsyncLLM, api_key: str | None = None, **server_config) -> FastAPI:
    """A fresh app (own metrics registry, own drain state) over an engine that may serve others too;
    `server_config`: further ServerConfig fields."""
    config = ServerConfig(api_key=api_key, served_model_name=MODEL_NAME, **server_config)
    return build_app(llm, config, MODEL_NAME)


@contextlib.contextmanager
def serve(model_dir: str, api_key: str | None = None, **engine_kwargs) -> Iterator[LiveServer]:
    """A new engine and app; for tests whose engine limits differ from the shared server's."""
    engine_kwargs = {"device": "cpu", "max_num_seqs": 8, "max_num_batched_tokens": 256, **engine_kwargs}
    llm = AsyncLLM(EngineConfig(model=model_dir, **engine_kwargs))
    try:
        app = app_over(llm, api_key)
        with run_app(app) as base_url:
            yield LiveServer(base_url, app, llm, api_key)
    finally:
        llm.shutdown()


@pytest.fixture(scope="session")
def live_server(server_model_dir: str) -> Iterator[LiveServer]:
    """One shared server (no API key, max_model_len 96) for every test that does not need its own."""
    with serve(server_model_dir, max_model_len=96) as server:
        yield server


@pytest.fixture(scope="session")
def make_server(server_model_dir: str) -> Callable[..., contextlib.AbstractContextManager[LiveServer]]:
    return lambda **kwargs: serve(server_model_dir, **kwargs)


@pytest.fixture()
def fresh_app(live_server: LiveServer) -> Iterator[LiveServer]:
    """A new app (fresh metrics, own API key setting) over the shared engine, on its own port."""
    app = app_over(live_server.llm)
    with run_app(app) as base_url:
        yield LiveServer(base_url, app, live_server.llm, None)


def metric_samples(base_url: str, family: str) -> list:
    """The samples of one metric family in a scrape of base_url's /metrics."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return [s for f in text_string_to_metric_families(text) if f.name == family for s in f.samples]


def routing_decisions(base_url: str) -> dict[str, float]:
    """A Ray ingress's routing decisions so far, by reason."""
    samples = metric_samples(base_url, "linrec:routing_decisions")
    return {s.labels["reason"]: s.value for s in samples if s.name.endswith("_total")}


@pytest.fixture(scope="session")
def tools() -> SimpleNamespace:
    """conftest helpers for test modules (importlib import mode keeps conftest off sys.path)."""
    return SimpleNamespace(
        run_app=run_app,
        app_over=app_over,
        free_port=free_port,
        metric_samples=metric_samples,
        routing_decisions=routing_decisions,
    )

"""linrec_client's LoRA adapter routes without a server (httpx.MockTransport): the bodies sent, the server's
text returned, each 4xx raised as its typed exception with the server's fields, and `parent` on model cards."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

import linrec_client as lc
from linrec_client._base import RetryPolicy

FAST = RetryPolicy(max_retries=1, initial_backoff=0.01, max_backoff=0.01)
MODELS = {
    "object": "list",
    "data": [
        {"id": "base", "object": "model", "created": 1, "owned_by": "linrec", "root": "/m", "max_model_len": 96},
        {"id": "sql", "object": "model", "created": 1, "owned_by": "linrec", "root": "/a/sql", "parent": "base"},
    ],
}


def error(status: int, message: str, type: str, param: str | None = None, code: str | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": type, "param": param, "code": code}})


class FakeServer:
    """The server's LoRA routes as vLLM answers them: text on success, OpenAI's error shape otherwise."""

    def __init__(self) -> None:
        self.adapters: dict[str, str] = {}
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = json.loads(request.content) if request.content else None
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        if request.url.path == "/v1/load_lora_adapter":
            name, path = body["lora_name"], body["lora_path"]
            if name in self.adapters:
                return error(400, f"The lora adapter '{name}' has already been loaded.", "BadRequestError")
            if not path.startswith("/adapters/"):
                return error(400, f"expected a LoRA adapter directory, got {path!r}", "BadRequestError", "lora_path")
            self.adapters[name] = path
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' added successfully.")
        if request.url.path == "/v1/unload_lora_adapter":
            name = body["lora_name"]
            if self.adapters.pop(name, None) is None:
                return error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError", "lora_name")
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' removed successfully.")
        return error(404, "no route", "NotFoundError")


def test_load_and_unload_return_the_servers_text_and_raise_its_errors() -> None:
    server = FakeServer()
    with lc.Client("http://linrec.test/v1", api_key="k", retry=FAST, transport=httpx.MockTransport(server)) as client:
        assert client.load_lora_adapter("sql", "/adapters/sql") == "Success: LoRA adapter 'sql' added successfully."
        with pytest.raises(lc.BadRequestError, match="already been loaded") as info:
            client.load_lora_adapter("sql", "/adapters/sql")
        assert info.value.status_code == 400 and info.value.type == "BadRequestError"
        with pytest.raises(lc.BadRequestError) as info:
            client.load_lora_adapter("bad", "/tmp/nothing")
        assert info.value.param == "lora_path" and "'/tmp/nothing'" in info.value.message
        assert client.unload_lora_adapter("sql") == "Success: LoRA adapter 'sql' removed successfully."
        with pytest.raises(lc.NotFoundError, match="cannot be found") as info:
            client.unload_lora_adapter("sql")
        assert info.value.param == "lora_name"
    first = server.requests[0]
    assert str(first.url) == "http://linrec.test/v1/load_lora_adapter" and first.method == "POST"
    assert json.loads(first.content) == {"lora_name": "sql", "lora_path": "/adapters/sql"}
    assert first.headers["authorization"] == "Bearer k"
    assert json.loads(server.requests[3].content) == {"lora_name": "sql"}
    assert len(server.requests) == 5  # 4xx answers are not retried


def test_async_client_loads_and_unloads() -> None:
    server = FakeServer()

    async def main() -> list[str]:
        async with lc.AsyncClient("http://linrec.test", retry=FAST, transport=httpx.MockTransport(server)) as client:
            texts = [await client.load_lora_adapter("sql", "/adapters/sql")]
            with pytest.raises(lc.BadRequestError, match="already been loaded"):
                await client.load_lora_adapter("sql", "/adapters/other")
            texts.append(await client.unload_lora_adapter("sql"))
            with pytest.raises(lc.NotFoundError) as info:
                await client.unload_lora_adapter("sql")
            assert info.value.status_code == 404 and info.value.type == "NotFoundError"
            return texts

    assert asyncio.run(main()) == [
        "Success: LoRA adapter 'sql' added successfully.",
        "Success: LoRA adapter 'sql' removed successfully.",
    ]
    assert [r.url.path for r in server.requests] == ["/v1/load_lora_adapter", "/v1/load_lora_adapter"] + [
        "/v1/unload_lora_adapter"
    ] * 2


def test_model_cards_carry_the_adapters_parent() -> None:
    with lc.Client("http://linrec.test", retry=FAST, transport=httpx.MockTransport(FakeServer())) as client:
        cards = client.models().data
    assert [(m.id, m.parent, m.root) for m in cards] == [("base", None, "/m"), ("sql", "base", "/a/sql")]

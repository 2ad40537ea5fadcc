"""linrec_client without a server: SSE decoding, request bodies, error mapping, retries and timeouts,
over httpx.MockTransport (scripted answers, so every retry path is deterministic)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import linrec_client as lc
from linrec_client._base import RetryPolicy, parse_retry_after
from linrec_client.streaming import iter_events

ROOT = Path(__file__).resolve().parents[2]
FAST = RetryPolicy(max_retries=2, initial_backoff=0.01, max_backoff=0.02)
COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length", "stop_reason": None}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
}


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Script:
    """A MockTransport handler that answers from a list, one entry per request; records the requests."""

    def __init__(self, *answers: httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(time.monotonic())
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(request)
        return answer

    def client(self, **kwargs) -> lc.Client:
        kwargs.setdefault("retry", FAST)
        return lc.Client("http://linrec.test/v1", transport=httpx.MockTransport(self), **kwargs)

    def async_client(self, **kwargs) -> lc.AsyncClient:
        kwargs.setdefault("retry", FAST)
        return lc.AsyncClient("http://linrec.test", transport=httpx.MockTransport(self), **kwargs)


def sse(*events: str, done: bool = True) -> httpx.Response:
    text = "".join(f"data: {e}\n\n" for e in events) + ("data: [DONE]\n\n" if done else "")
    return httpx.Response(200, content=text.encode(), headers={"content-type": "text/event-stream"})


# -- SSE -----------------------------------------------------------------------------------------------


def test_sse_decoder_follows_the_event_stream_rules() -> None:
    lines = [": keep-alive", "event: message", 'data: {"a":', "data:1}", "id: 7", "", "", "data:  two spaces", ""]
    assert list(iter_events(lines)) == ['{"a":\n1}', " two spaces"]
    assert list(iter_events(["data: last without a blank line"])) == ["last without a blank line"]
    # httpx splits \r\n and \r as well as \n
    body = b"data: x\r\n\r\ndata: y\r\rdata: [DONE]\n\n"
    assert list(iter_events(httpx.Response(200, content=body).iter_lines())) == ["x", "y", "[DONE]"]


def test_stream_yields_typed_chunks_and_keeps_usage() -> None:
    chunk = {**COMPLETION, "usage": None}
    last = {**COMPLETION, "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}}
    script = Script(sse(json.dumps(chunk), json.dumps(chunk), json.dumps(last)))
    with script.client() as client, client.completions("x", stream=True) as stream:
        chunks = list(stream)
    assert [c.choices[0].text for c in chunks[:2]] == ["hi", "hi"] and isinstance(chunks[0], lc.Completion)
    assert stream.usage == lc.Usage(prompt_tokens=2, completion_tokens=5, total_tokens=7)
    body = json.loads(script.requests[0].content)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_stream_cut_off_or_carrying_an_error_raises() -> None:
    script = Script(sse(json.dumps(COMPLETION), done=False), sse(json.dumps(error_body("engine died", "Internal"))))
    with script.client() as client:
        stream = client.completions("x", stream=True)
        assert next(stream).choices[0].text == "hi"
        with pytest.raises(lc.APIConnectionError, match=r"\[DONE\]"):
            next(stream)
        with pytest.raises(lc.LinrecAPIError, match="engine died") as info:
            list(client.completions("x", stream=True))
    assert info.value.status_code is None and info.value.type == "Internal"


# -- bodies --------------------------------------------------------------------------------------------


def test_request_bodies_headers_and_base_url() -> None:
    chat = {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "yo"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    script = Script(httpx.Response(200, json=COMPLETION), httpx.Response(200, json=chat))
    with script.client(api_key="k", model="default-model") as client:
        client.completions([1, 2], max_tokens=3, temperature=None, top_k=5, extra_body={"cache_salt": "t"})
        out = client.chat_completions([{"role": "user", "content": "hi"}], model="other", logprobs=True)
    assert out.choices[0].message.content == "yo" and out.usage.total_tokens == 2
    first, second = (json.loads(r.content) for r in script.requests)
    assert first == {"prompt": [1, 2], "max_tokens": 3, "top_k": 5, "model": "default-model", "cache_salt": "t"}
    assert second == {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "model": "other"}
    assert [str(r.url) for r in script.requests] == [
        "http://linrec.test/v1/completions",
        "http://linrec.test/v1/chat/completions",
    ]
    assert script.requests[0].headers["authorization"] == "Bearer k"
    assert script.requests[0].headers["user-agent"].startswith("linrec-client/")


def test_api_key_and_base_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINREC_API_KEY", "env-key")
    monkeypatch.setenv("LINREC_BASE_URL", "http://elsewhere:9/v1/")
    client = lc.Client()
    assert client.base_url == "http://elsewhere:9" and client.headers["Authorization"] == "Bearer env-key"
    assert "Authorization" not in lc.Client(api_key="").headers  # an explicit empty key sends none
    with pytest.raises(ValueError, match="max_retries or retry"):
        lc.Client(max_retries=1, retry=FAST)


# -- errors --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, lc.BadRequestError),
        (401, lc.AuthenticationError),
        (403, lc.PermissionDeniedError),
        (404, lc.NotFoundError),
        (405, lc.LinrecAPIError),
        (422, lc.UnprocessableEntityError),
        (500, lc.InternalServerError),
        (502, lc.InternalServerError),
    ],
)
def test_error_statuses_map_to_exceptions_with_the_server_fields(status: int, cls: type) -> None:
    body = error_body(f"bad thing {status}", "some_type", "temperature", "some_code")
    script = Script(httpx.Response(status, json=body, headers={"x-request-id": "rid"}))
    with script.client() as client, pytest.raises(cls) as info:
        client.completions("x")
    error = info.value
    assert type(error) is cls and len(script.requests) == 1  # not retried
    assert (error.status_code, error.message, error.type, error.param, error.code) == (
        status,
        f"bad thing {status}",
        "some_type",
        "temperature",
        "some_code",
    )
    assert error.request_id == "rid" and str(error) == f"HTTP {status}: bad thing {status}"


def test_an_error_body_that_is_not_json_keeps_its_text() -> None:
    script = Script(httpx.Response(502, text="upstream exploded"))
    with script.client(max_retries=0, retry=None) as client, pytest.raises(lc.InternalServerError) as info:
        client.models()
    assert info.value.message == "upstream exploded" and info.value.type is None


# -- retries -------------------------------------------------------------------------------------------


def test_429_is_retried_after_retry_after_then_succeeds() -> None:
    def busy() -> httpx.Response:
        return httpx.Response(429, json=error_body("queue full", "RateLimitError"), headers={"Retry-After": "0.15"})

    script = Script(busy(), busy(), httpx.Response(200, json=COMPLETION))
    with script.client() as client:
        assert client.completions("x").choices[0].text == "hi"
    waits = [b - a for a, b in zip(script.times, script.times[1:])]
    assert len(script.requests) == 3 and all(0.15 <= w < 0.15 * 1.25 + 0.1 for w in waits), waits
    assert script.requests[0].content == script.requests[2].content


def test_503_is_retried_with_backoff_until_the_retries_run_out() -> None:
    down = [
        httpx.Response(503, json=error_body("the server is shutting down", "ServiceUnavailableError")) for _ in "12345"
    ]
    policy = RetryPolicy(max_retries=3, initial_backoff=0.04, max_backoff=0.1)
    script = Script(*down)
    with script.client(retry=policy) as client, pytest.raises(lc.ServiceUnavailableError, match="shutting down"):
        client.chat_completions([{"role": "user", "content": "x"}])
    assert len(script.requests) == 4
    waits = [b - a for a, b in zip(script.times, script.times[1:])]
    for wait, backoff in zip(waits, (0.04, 0.08, 0.1)):  # doubled, capped, at most 25% jitter below
        assert 0.75 * backoff <= wait < backoff + 0.1, waits


def test_connection_errors_are_retried_and_timeouts_are_not() -> None:
    script = Script(
        httpx.ConnectError("refused"), httpx.RemoteProtocolError("reset"), httpx.Response(200, json=COMPLETION)
    )
    with script.client() as client:
        assert client.completions("x").choices[0].text == "hi"
    assert len(script.requests) == 3

    script = Script(*[httpx.ConnectError("refused") for _ in range(3)])
    with script.client() as client, pytest.raises(lc.APIConnectionError, match="refused") as info:
        client.completions("x")
    assert type(info.value) is lc.APIConnectionError and len(script.requests) == 3

    script = Script(httpx.ReadTimeout("slow"), httpx.Response(200, json=COMPLETION))
    with script.client() as client, pytest.raises(lc.APITimeoutError):
        client.completions("x")
    assert len(script.requests) == 1


def test_retry_policy_delays() -> None:
    policy = RetryPolicy(max_retries=5, initial_backoff=1.0, max_backoff=5.0)
    for attempt, backoff in enumerate((1.0, 2.0, 4.0, 5.0, 5.0)):
        assert 0.75 * backoff <= policy.delay(attempt) <= backoff
    assert 3.0 <= policy.delay(0, httpx.Headers({"retry-after": "3"})) <= 3.75
    later = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8.0 <= parse_retry_after(httpx.Headers({"retry-after": later})) <= 10.0
    assert parse_retry_after(httpx.Headers({"retry-after": "soon"})) is None
    assert policy.delay(0, httpx.Headers({"retry-after": "3600"})) <= 1.0  # past max_retry_after: backoff
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)


def test_async_client_retries_streams_and_maps_errors() -> None:
    busy = httpx.Response(429, json=error_body("queue full", "RateLimitError"), headers={"Retry-After": "0"})
    chunk = {**COMPLETION, "usage": None}
    script = Script(
        busy,
        sse(json.dumps(chunk), json.dumps(chunk)),
        httpx.Response(404, json=error_body("no such model", "NotFoundError", "model", "model_not_found")),
        httpx.ReadTimeout("slow"),
    )

    async def main() -> list[str]:
        async with script.async_client() as client:
            stream = await client.completions("x", stream=True, include_usage=False)
            texts = [c.choices[0].text async for c in stream]
            with pytest.raises(lc.NotFoundError) as info:
                await client.models()
            assert info.value.code == "model_not_found" and info.value.param == "model"
            with pytest.raises(lc.APITimeoutError):
                await client.chat_completions([{"role": "user", "content": "x"}])
            return texts

    assert asyncio.run(main()) == ["hi", "hi"]
    assert json.loads(script.requests[1].content)["stream_options"] == {"include_usage": False}
    assert len(script.requests) == 4


# -- the distribution ----------------------------------------------------------------------------------


def test_the_client_distribution_needs_neither_torch_nor_linrec() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "clients" / "pyproject.toml").read_text())["project"]
    assert project["name"] == "linrec-client"
    assert sorted(dep.split(">")[0] for dep in project["dependencies"]) == ["httpx", "pydantic"]
    assert project["version"] == lc.__version__
    code = "import sys, linrec_client; assert not {'torch', 'linrec'} & set(sys.modules), sorted(sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "clients")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT / "clients")

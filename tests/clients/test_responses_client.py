"""linrec_client's Responses API and state methods without a server (httpx.MockTransport): the bodies, paths and
queries sent, typed responses and stream events, a stream's end, cut-off and error event, and each 4xx raised as
its typed exception. tests/server/test_responses_api.py runs the same methods against a real server."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

import linrec_client as lc
from linrec_client._base import RetryPolicy
from linrec_client.types import ResponseLifecycleEvent, ResponseTextDeltaEvent

FAST = RetryPolicy(max_retries=0)
RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1,
    "status": "completed",
    "model": "m",
    "output": [
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Hello", "annotations": []}],
        }
    ],
    "usage": {
        "input_tokens": 7,
        "input_tokens_details": {"cached_tokens": 5},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 9,
    },
    "a_field_from_a_newer_server": 1,
}
STATE = {"id": "resp_2", "object": "state", "model": "m", "num_tokens": 9, "num_bytes": 64, "created_at": 2}


def not_found(name: str) -> httpx.Response:
    message = f"no stored state {name!r} for this model and tenant"
    error = {"message": message, "type": "NotFoundError", "param": "response_id", "code": "state_not_found"}
    return httpx.Response(404, json={"error": error})


class FakeServer:
    """The routes as the server answers them, over one stored response `resp_1` (tenant None)."""

    def __init__(self, stream_events: list[dict] | None = None, done: bool = True) -> None:
        self.requests: list[httpx.Request] = []
        self.stream_events = stream_events or []
        self.done = done

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        method, path, query = request.method, request.url.path, dict(request.url.params)
        if method == "POST" and path == "/v1/responses":
            body = json.loads(request.content)
            if not body.get("stream"):
                return httpx.Response(200, json=RESPONSE)
            text = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in self.stream_events)
            return httpx.Response(200, content=text.encode(), headers={"content-type": "text/event-stream"})
        if path.startswith("/v1/responses/") or path.startswith("/v1/states/"):
            name = path.split("/")[3]
            if name != "resp_1" or query.get("cache_salt") is not None:
                return not_found(name)
            if method == "GET" and path.startswith("/v1/states/"):
                return httpx.Response(200, content=b"STATE", headers={"content-type": "application/octet-stream"})
            if method == "GET":
                return httpx.Response(200, json=RESPONSE)
            if method == "DELETE":
                return httpx.Response(200, json={"id": name, "object": "response", "deleted": True})
            return httpx.Response(200, json={**RESPONSE, "id": "resp_fork"})
        if method == "POST" and path == "/v1/states":
            if request.content != b"STATE":
                error = {"message": "expected a safetensors file", "type": "invalid_request_error"}
                return httpx.Response(400, json={"error": {**error, "param": None, "code": None}})
            return httpx.Response(200, json={**STATE, "id": query.get("id", "resp_2")})
        return httpx.Response(404, json={"error": {"message": "no route", "type": "NotFoundError"}})


def events(final: str = "response.completed") -> list[dict]:
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    started = {**RESPONSE, "status": "in_progress", "output": [], "usage": None}
    return [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
        {"type": "response.output_item.added", "output_index": 0, "item": {**RESPONSE["output"][0], "content": []}},
        {"type": "response.content_part.added", **where, "part": {"type": "output_text", "text": ""}},
        {"type": "response.output_text.delta", **where, "delta": "Hel", "logprobs": []},
        {"type": "response.output_text.delta", **where, "delta": "lo", "logprobs": []},
        {"type": "response.output_text.done", **where, "text": "Hello", "logprobs": []},
        {"type": "response.something_new", "value": 1},
        {"type": final, "response": RESPONSE},
    ]


def numbered(items: list[dict]) -> list[dict]:
    return [{**e, "sequence_number": i} for i, e in enumerate(items)]


def client(fake: FakeServer, **kwargs) -> lc.Client:
    return lc.Client("http://linrec.test/v1", transport=httpx.MockTransport(fake), retry=FAST, **kwargs)


def test_responses_sends_the_fields_and_reads_a_typed_response() -> None:
    fake = FakeServer()
    with client(fake, model="default-model") as c:
        out = c.responses(
            [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
            instructions="Be brief.",
            previous_response_id="resp_0",
            store=False,
            max_output_tokens=8,
            temperature=0.0,
            cache_salt="tenant",
            layer_route=[1, 0],
            metadata={"k": "v"},
            seed=None,  # None: the server's default, not sent
            extra_body={"ignore_eos": True},
        )
    body = json.loads(fake.requests[0].content)
    assert body == {
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        "model": "default-model",
        "instructions": "Be brief.",
        "previous_response_id": "resp_0",
        "store": False,
        "max_output_tokens": 8,
        "temperature": 0.0,
        "cache_salt": "tenant",
        "layer_route": [1, 0],
        "metadata": {"k": "v"},
        "ignore_eos": True,
    }
    assert isinstance(out, lc.Response) and out.output_text == "Hello" and out.status == "completed"
    usage = out.usage
    assert (usage.input_tokens, usage.input_tokens_details.cached_tokens, usage.output_tokens) == (7, 5, 2)
    assert usage.total_tokens == 9 and usage.layer_routes is None
    assert out.model_extra["a_field_from_a_newer_server"] == 1


def test_a_stream_yields_typed_events_and_ends_with_the_final_response() -> None:
    fake = FakeServer(numbered(events("response.incomplete")))
    with client(fake) as c, c.responses("Hi", stream=True) as stream:
        got = list(stream)
    assert json.loads(fake.requests[0].content) == {"input": "Hi", "stream": True}
    assert [e.sequence_number for e in got] == list(range(9))
    assert isinstance(got[0], ResponseLifecycleEvent) and got[0].response.status == "in_progress"
    deltas = [e for e in got if isinstance(e, ResponseTextDeltaEvent)]
    assert "".join(d.delta for d in deltas) == "Hello" and got[6].text == "Hello"
    assert type(got[7]) is lc.ResponseEvent and got[7].model_extra == {"value": 1}  # unknown: kept, untyped
    assert stream.final_response is not None and stream.final_response.output_text == "Hello"


def test_a_stream_cut_off_or_carrying_an_error_raises() -> None:
    cut = FakeServer(numbered(events()[:5]))
    with client(cut) as c, pytest.raises(lc.APIConnectionError, match="response.completed"):
        list(c.responses("Hi", stream=True))
    failed = numbered(
        [
            *events()[:4],
            {"type": "error", "code": "InternalServerError", "message": "the engine stopped", "param": None},
            {"type": "response.failed", "response": {**RESPONSE, "status": "failed"}},
        ]
    )
    with client(FakeServer(failed)) as c, pytest.raises(lc.LinrecAPIError, match="the engine stopped") as info:
        list(c.responses("Hi", stream=True))
    assert info.value.status_code is None and info.value.code == "InternalServerError"


def test_retrieve_delete_fork_export_and_import() -> None:
    fake = FakeServer()
    with client(fake) as c:
        assert c.retrieve_response("resp_1").id == "resp_1"
        assert c.fork_response("resp_1").id == "resp_fork"
        blob = c.export_state("resp_1")
        assert blob == b"STATE"
        state = c.import_state(blob, state_id="mine")
        assert isinstance(state, lc.State) and state.id == "mine" and state.num_tokens == 9
        assert c.delete_response("resp_1") == lc.ResponseDeleted(id="resp_1", deleted=True)
        with pytest.raises(lc.NotFoundError) as info:
            c.retrieve_response("resp_1", cache_salt="other")
        assert info.value.code == "state_not_found" and info.value.param == "response_id"
        with pytest.raises(lc.NotFoundError):
            c.delete_response("a/b")  # quoted into one path segment, not a route of its own
        with pytest.raises(lc.BadRequestError, match="expected a safetensors file"):
            c.import_state(b"junk")
    sent = {(r.method, r.url.raw_path.decode()) for r in fake.requests}
    assert ("GET", "/v1/responses/resp_1?cache_salt=other") in sent and ("DELETE", "/v1/responses/a%2Fb") in sent
    assert ("POST", "/v1/states?id=mine") in sent
    upload = next(r for r in fake.requests if r.url.path == "/v1/states")
    assert upload.headers["content-type"] == "application/octet-stream" and upload.content == b"STATE"
    fork = next(r for r in fake.requests if r.url.path.endswith("/fork"))
    assert fork.content == b""  # no tenant: no body


def test_the_async_client_has_the_same_methods() -> None:
    async def run() -> None:
        fake = FakeServer(numbered(events()))
        transport = httpx.MockTransport(fake)
        async with lc.AsyncClient("http://linrec.test", transport=transport, retry=FAST) as c:
            assert (await c.responses("Hi")).output_text == "Hello"
            stream = await c.responses("Hi", stream=True)
            got = [e async for e in stream]
            assert got[-1].type == "response.completed" and stream.final_response.status == "completed"
            assert (await c.retrieve_response("resp_1")).id == "resp_1"
            assert (await c.fork_response("resp_1", cache_salt="t")).id == "resp_fork"
            blob = await c.export_state("resp_1")
            assert (await c.import_state(blob)).id == "resp_2"
            assert (await c.delete_response("resp_1")).deleted is True
            with pytest.raises(lc.NotFoundError):
                await c.retrieve_response("resp_9")
        fork = next(r for r in fake.requests if r.url.path.endswith("/fork"))
        assert json.loads(fork.content) == {"cache_salt": "t"}

    asyncio.run(run())

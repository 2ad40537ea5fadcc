"""linrec_client against a live server: the same requests through the official `openai` client give
the same answers, streams equal whole responses, and each server error arrives as its exception."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

import linrec_client as lc
from linrec_client._base import RetryPolicy

openai = pytest.importorskip("openai")

MODEL = "demo"
CHAT = [{"role": "user", "content": "Say hi"}]
GREEDY = {"temperature": 0, "ignore_eos": True}


def sdk(server, **kwargs) -> lc.Client:
    kwargs.setdefault("max_retries", 0)
    return lc.Client(server.base_url, api_key=server.api_key, **kwargs)


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_completions_equal_the_openai_clients(live_server) -> None:
    reference = live_server.client().completions.create(
        model=MODEL, prompt=["Hello", "Yo"], n=2, max_tokens=6, logprobs=2, temperature=0, extra_body=GREEDY
    )
    with sdk(live_server, model=MODEL) as client:
        out = client.completions(["Hello", "Yo"], n=2, max_tokens=6, logprobs=2, **GREEDY)
    assert isinstance(out, lc.Completion) and out.id.startswith("cmpl-") and out.model == MODEL
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [c.text for c in reference.choices]
    assert [c.logprobs.tokens for c in out.choices] == [c.logprobs.tokens for c in reference.choices]
    assert out.choices[0].logprobs.token_logprobs == pytest.approx(reference.choices[0].logprobs.token_logprobs)
    usage = reference.usage
    assert (
        (out.usage.prompt_tokens, out.usage.completion_tokens)
        == (usage.prompt_tokens, usage.completion_tokens)
        == (
            usage.prompt_tokens,
            24,
        )
    )
    assert all(c.finish_reason == "length" for c in out.choices)


def test_chat_stream_equals_the_whole_response(live_server) -> None:
    with sdk(live_server) as client:  # no model named: linrec serves one
        whole = client.chat_completions(CHAT, max_completion_tokens=8, logprobs=True, top_logprobs=2, **GREEDY)
        with client.chat_completions(CHAT, stream=True, max_tokens=8, **GREEDY) as stream:
            chunks = list(stream)
        quiet = list(client.chat_completions(CHAT, stream=True, include_usage=False, max_tokens=2))
    reference = live_server.client().chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert whole.choices[0].message.content == reference.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 8
    assert [len(t.top_logprobs) for t in whole.choices[0].logprobs.content] == [2] * 8
    assert all(isinstance(c, lc.ChatCompletionChunk) for c in chunks) and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and stream.usage == whole.usage
    assert all(c.usage is None for c in quiet) and quiet[-1].choices[0].finish_reason is not None


def test_async_client_streams_completions_and_chat(live_server) -> None:
    async def main():
        async with lc.AsyncClient(live_server.v1, max_retries=0) as client:
            whole = await client.completions("async me", max_tokens=10, **GREEDY)
            stream = await client.completions("async me", stream=True, max_tokens=10, **GREEDY)
            text = "".join([c.choices[0].text async for c in stream if c.choices])
            chat = await client.chat_completions(CHAT, n=2, stream=True, max_tokens=3, seed=1, temperature=1.0)
            finished = {c.choices[0].index async for c in chat if c.choices and c.choices[0].finish_reason}
            both = await asyncio.gather(*(client.completions("together", max_tokens=4, **GREEDY) for _ in range(3)))
            return whole, text, stream.usage, finished, both, await client.models(), await client.health()

    whole, text, usage, finished, both, models, healthy = asyncio.run(main())
    assert text == whole.choices[0].text and usage == whole.usage
    assert finished == {0, 1}
    assert len({c.choices[0].text for c in both}) == 1
    assert [m.id for m in models.data] == [MODEL] and healthy


def test_stop_and_seeded_sampling_match_the_openai_client(live_server) -> None:
    with sdk(live_server) as client:
        text = client.completions("stop here", max_tokens=10, **GREEDY).choices[0].text
        stop = next(ch for i, ch in enumerate(text) if i >= 2 and ch.isascii() and ch.isprintable())
        out = client.completions("stop here", max_tokens=10, stop=[stop], **GREEDY)
        assert out.choices[0].text == text[: text.index(stop)] and out.choices[0].finish_reason == "stop"

        def sampled(seed: int) -> str:
            return client.completions("seeded", max_tokens=6, temperature=1.0, seed=seed).choices[0].text

        reference = live_server.client().completions.create(
            model=MODEL, prompt="seeded", max_tokens=6, temperature=1.0, seed=7
        )
        assert sampled(7) == reference.choices[0].text  # the same seed through another client: same sample
        assert sampled(8) != reference.choices[0].text


def test_models_tokenize_detokenize_health_version(live_server) -> None:
    import linrec

    with sdk(live_server) as client:
        model = client.models().data[0]
        assert model.id == MODEL and model.max_model_len == 96
        ids = client.tokenize("héllo")
        assert ids.tokens == live_server.llm.tokenizer.encode("héllo") and ids.count == len(ids.tokens)
        assert client.detokenize(ids.tokens).prompt.endswith("héllo")
        assert client.tokenize(messages=CHAT).count > client.tokenize(messages=CHAT, add_generation_prompt=False).count
        assert client.health() and client.version() == linrec.__version__
        with pytest.raises(ValueError, match="exactly one"):
            client.tokenize()
    assert not lc.Client(f"http://127.0.0.1:{_closed_port()}").health()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_each_server_error_raises_its_exception_with_the_servers_message(live_server) -> None:
    with sdk(live_server) as client:
        with pytest.raises(lc.BadRequestError) as info:
            client.completions("x", temperature=2.5)
        assert info.value.status_code == 400 and info.value.param == "temperature"
        assert info.value.type == "invalid_request_error" and "temperature" in info.value.message
        with pytest.raises(lc.BadRequestError) as info:
            client.completions("x" * 200)
        assert info.value.code == "context_length_exceeded" and "96" in info.value.message
        with pytest.raises(lc.BadRequestError) as info:
            client.chat_completions([])
        assert "at least 1 item" in info.value.message and info.value.param == "messages"  # the schema's bound
        with pytest.raises(lc.BadRequestError, match="max_tokens"):
            client.completions("x", max_tokens=0, stream=True)  # refused before the stream starts
        with pytest.raises(lc.NotFoundError) as info:
            client.completions("x", model="gpt-4")
        assert info.value.code == "model_not_found" and "gpt-4" in info.value.message
        with pytest.raises(lc.BadRequestError, match="token ids"):
            client.detokenize([10**9])
        assert client.completions("still fine", max_tokens=1).usage.completion_tokens == 1


def test_api_key_and_authentication_error(live_server, tools) -> None:
    with tools.run_app(tools.app_over(live_server.llm, api_key="sekrit")) as base:
        with pytest.raises(lc.AuthenticationError) as info, lc.Client(base, max_retries=0) as client:
            client.models()
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        with pytest.raises(lc.AuthenticationError), lc.Client(base, api_key="wrong") as client:
            client.completions("x")
        with lc.Client(base, api_key="sekrit") as client:
            assert client.completions("x", max_tokens=2).usage.completion_tokens == 2
            assert client.health()  # probes need no key


def test_timeout_raises_and_the_server_frees_the_slot(live_server) -> None:
    stats = live_server.llm.engine.stats
    with sdk(live_server, timeout=httpx.Timeout(5, read=0.05)) as client:
        with pytest.raises(lc.APITimeoutError):
            client.completions("slow", max_tokens=80, ignore_eos=True)
        with pytest.raises(lc.APITimeoutError):  # a per-call timeout wins over the client's
            client.completions("slow", max_tokens=80, ignore_eos=True, timeout=0.05)
    wait_until(lambda: stats().num_slots_used == 0)


def test_503_while_draining_is_retried_until_the_server_is_back(fresh_app) -> None:
    state = fresh_app.app.state.server
    state.is_draining = True
    with sdk(fresh_app) as client, pytest.raises(lc.ServiceUnavailableError, match="shutting down") as info:
        client.completions("x", max_tokens=1)
    assert info.value.status_code == 503 and info.value.type == "ServiceUnavailableError"
    threading.Timer(0.3, lambda: setattr(state, "is_draining", False)).start()
    policy = RetryPolicy(max_retries=6, initial_backoff=0.1, max_backoff=0.2)
    with lc.Client(fresh_app.base_url, retry=policy) as client:
        assert client.completions("x", max_tokens=1).usage.completion_tokens == 1


class CountingTransport(httpx.HTTPTransport):
    """Records the status of every response it returns (to see the retries from outside)."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.statuses.append(response.status_code)
        return response


def test_429_then_success_with_retry_after(make_server) -> None:
    with make_server(max_num_seqs=1, max_waiting_requests=1) as server:
        stats = server.llm.engine.stats
        long = {"prompt": "hold", "max_tokens": 2000, "ignore_eos": True}
        with lc.Client(server.base_url, max_retries=0) as holder:
            stream = holder.completions(**long, stream=True)
            next(stream)  # the only slot is taken
            results: dict = {}
            other = sdk(server)
            waiter = threading.Thread(target=lambda: results.update(w=other.completions("wait", max_tokens=2)))
            waiter.start()
            wait_until(lambda: stats().num_waiting == 1)  # and the only queue place

            with pytest.raises(lc.RateLimitError) as info, sdk(server) as client:
                client.completions("x", max_tokens=2)
            assert info.value.status_code == 429 and info.value.headers["retry-after"] == "1"
            assert "full" in info.value.message

            transport = CountingTransport()
            retrying = lc.Client(server.base_url, retry=RetryPolicy(max_retries=3), transport=transport)
            thread = threading.Thread(target=lambda: results.update(r=retrying.completions("retry", max_tokens=2)))
            start = time.monotonic()
            thread.start()
            wait_until(lambda: transport.statuses == [429])
            stream.close()  # frees the slot: the waiter runs, then the retry finds room
            thread.join(30)
            waiter.join(30)
        elapsed = time.monotonic() - start
        assert transport.statuses == [429, 200] and elapsed >= 1.0  # waited out Retry-After: 1
        assert results["r"].usage.completion_tokens == 2 and results["w"].usage.completion_tokens == 2
        retrying.close()
        other.close()

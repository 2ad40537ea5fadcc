"""The OpenAI API against a live server, spoken by the official `openai` client (streaming included)."""

from __future__ import annotations

import httpx
import pytest

from linrec.engine.sampling_params import SamplingParams

openai = pytest.importorskip("openai")

MODEL = "demo"
CHAT = [{"role": "user", "content": "Say hi"}]


def greedy_text(client, prompt: str, max_tokens: int = 12) -> str:
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    return out.choices[0].text


def test_completion_matches_the_engine_and_openai_fields(live_server) -> None:
    client = live_server.client()
    out = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == MODEL
    assert out.created > 0
    choice = out.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length"
    prompt_ids = live_server.llm.tokenizer.encode("Hello")
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == 6 and out.usage.total_tokens == len(prompt_ids) + 6

    # The same prompt through the offline engine API gives the same greedy text.
    import asyncio

    async def engine_text() -> str:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        return "".join([d.text async for d in live_server.llm.generate(prompt_ids, params)])

    assert choice.text == asyncio.run(engine_text())


def test_prompt_forms_and_choice_indices(live_server) -> None:
    client = live_server.client()
    ids = live_server.llm.tokenizer.encode("Hi")
    by_text = greedy_text(client, "Hi", 5)
    for prompt in ("Hi", ids):
        out = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
        )
        assert out.choices[0].text == by_text
    out = client.completions.create(
        model=MODEL, prompt=["Hi", "Yo"], n=2, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text == by_text
    assert out.choices[2].text == greedy_text(client, "Yo", 5)
    out = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=5, temperature=0)
    assert len(out.choices) == 2 and out.usage.prompt_tokens == 2 * len(ids)


def test_streaming_completion_with_usage_equals_non_streaming(live_server) -> None:
    client = live_server.client()
    whole = greedy_text(client, "stream me", 10)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="stream me",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_echo_prepends_the_prompt(live_server) -> None:
    client = live_server.client()
    out = client.completions.create(model=MODEL, prompt="Echo", max_tokens=3, temperature=0, echo=True)
    assert out.choices[0].text.startswith("Echo")
    streamed = client.completions.create(
        model=MODEL, prompt="Echo", max_tokens=3, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text


def test_chat_completion_and_stream(live_server) -> None:
    client = live_server.client()
    out = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    message = out.choices[0].message
    assert message.role == "assistant" and out.choices[0].finish_reason == "length"
    template_ids = live_server.llm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert out.usage.prompt_tokens == len(live_server.llm.tokenizer.encode(template_ids, add_special_tokens=False))

    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == out.usage.prompt_tokens


def test_n2_samples_differ_and_stream_both(live_server) -> None:
    client = live_server.client()
    out = client.chat.completions.create(
        model=MODEL, messages=CHAT, n=2, max_tokens=12, temperature=1.0, seed=3, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content != out.choices[1].message.content
    assert out.usage.completion_tokens == 24
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, n=2, max_tokens=4, stream=True)
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_chat_logprobs(live_server) -> None:
    client = live_server.client()
    out = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert entry.bytes == list(entry.token.encode())
    special = set(live_server.llm.tokenizer.get_added_vocab())  # listed as tokens, skipped in the text
    assert "".join(e.token for e in content if e.token not in special) == out.choices[0].message.content


def test_completion_logprobs(live_server) -> None:
    client = live_server.client()
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=5, temperature=0, logprobs=2)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert logprobs.text_offset[0] == 0
    for token, offset, next_offset in zip(logprobs.tokens, logprobs.text_offset, logprobs.text_offset[1:]):
        assert next_offset == offset + len(token)
    for logprob, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 2 and logprob == pytest.approx(max(top.values()), abs=1e-5)
    streamed = client.completions.create(model=MODEL, prompt="Hi", max_tokens=5, temperature=0, logprobs=2, stream=True)
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == logprobs.tokens


def test_stop_strings_cut_the_text(live_server) -> None:
    client = live_server.client()
    text = greedy_text(client, "stop here", 16)
    index = next(i for i, ch in enumerate(text) if i >= 2 and ch.isascii() and ch.isprintable())
    stop = text[index]
    expected = text[: text.index(stop)]
    for stop_arg in (stop, [stop, "\x00never"]):
        out = client.completions.create(
            model=MODEL,
            prompt="stop here",
            max_tokens=16,
            temperature=0,
            stop=stop_arg,
            extra_body={"ignore_eos": True},
        )
        assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    print(f"stop={stop!r} cut {text!r} to {expected!r}")


def test_seed_reproduces_sampling(live_server) -> None:
    client = live_server.client()

    def sample(seed: int) -> str:
        out = client.completions.create(
            model=MODEL,
            prompt="seeded",
            max_tokens=12,
            temperature=1.0,
            top_p=0.9,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return out.choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_sampling_extras_and_penalties_are_accepted(live_server) -> None:
    client = live_server.client()
    out = client.completions.create(
        model=MODEL,
        prompt="extras",
        max_tokens=6,
        temperature=0.8,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"65": 100},  # token 65 is byte 'A' in the demo tokenizer: a +100 bias always wins
        user="someone",
        extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 6, "ignore_eos": True},
    )
    assert out.choices[0].text == "AAAAAA"
    out = client.completions.create(
        model=MODEL, prompt="x", max_tokens=10, logit_bias={"66": 100}, extra_body={"stop_token_ids": [66]}
    )
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 1


def test_models_tokenize_detokenize_health_version_request_id(live_server) -> None:
    client = live_server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    base = live_server.base_url
    ids = httpx.post(f"{base}/tokenize", json={"prompt": "héllo"}).json()
    assert ids["tokens"] == live_server.llm.tokenizer.encode("héllo") and ids["count"] == len(ids["tokens"])
    text = httpx.post(f"{base}/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
    assert text.endswith("héllo")
    chat = httpx.post(f"{base}/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > ids["count"]
    assert httpx.get(f"{base}/health").status_code == 200
    import linrec

    assert httpx.get(f"{base}/version").json() == {"version": linrec.__version__}
    response = httpx.post(
        f"{base}/v1/completions", json={"prompt": "id", "max_tokens": 1}, headers={"X-Request-Id": "abc123"}
    )
    assert response.headers["x-request-id"] == "abc123" and response.json()["id"] == "cmpl-abc123"
    assert httpx.get(f"{base}/health").headers["x-request-id"]

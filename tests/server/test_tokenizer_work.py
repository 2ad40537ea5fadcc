"""Tokenizer work off the event loop, and prompts refused by their length before they are tokenized."""

from __future__ import annotations

import random
import threading
from types import SimpleNamespace

import httpx
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from linrec.models.tokenizer import build_byte_tokenizer
from linrec.server.serving import max_chars_per_token

MODEL = "demo"
JSON = {"content-type": "application/json"}
BIG_CHARS = 1_500_000  # seconds of encoding with the demo byte tokenizer, well under the 16 MiB body limit


def test_small_requests_are_served_while_a_big_prompt_is_tokenized(make_server, monkeypatch) -> None:
    with make_server(max_model_len=4 * BIG_CHARS) as server:
        tokenizer = server.llm.tokenizer
        encode = tokenizer.encode
        big_started, big_encoded = threading.Event(), threading.Event()

        def watched_encode(text, *args, **kwargs):
            is_big = len(text) >= BIG_CHARS
            if is_big:
                big_started.set()
            try:
                return encode(text, *args, **kwargs)
            finally:
                if is_big:
                    big_encoded.set()

        monkeypatch.setattr(tokenizer, "encode", watched_encode)
        result: dict = {}
        big = threading.Thread(
            target=lambda: result.update(
                r=httpx.post(f"{server.base_url}/tokenize", json={"prompt": "x" * BIG_CHARS}, timeout=300)
            )
        )
        big.start()
        assert big_started.wait(60)
        # Each of these completes while the big prompt is still being encoded: the loop was free to serve
        # them and a pool thread was free to tokenize them.
        assert httpx.get(f"{server.base_url}/health", timeout=60).status_code == 200
        assert not big_encoded.is_set(), "the big encode finished first: it cannot show the loop was free"
        small = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "hi"}, timeout=60)
        assert small.json()["count"] == 3 and not big_encoded.is_set()
        body = {"model": MODEL, "prompt": "small", "max_tokens": 2}
        assert httpx.post(f"{server.v1}/completions", json=body, timeout=60).status_code == 200
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(f"{server.v1}/chat/completions", json=chat, timeout=60).status_code == 200
        assert not big_encoded.is_set()
        big.join(300)
        assert result["r"].status_code == 200 and result["r"].json()["count"] == BIG_CHARS + 1  # + <|bos|>


def test_text_provably_over_max_model_len_is_refused_before_tokenizing(fresh_app, monkeypatch) -> None:
    serving = fresh_app.app.state.serving
    max_model_len, per_token = serving.max_model_len, serving.max_chars_per_token
    assert per_token == len("<|assistant|>")  # the demo tokenizer's longest token
    calls: list[int] = []
    encode = serving.tokenizer.encode
    monkeypatch.setattr(
        serving.tokenizer, "encode", lambda text, *a, **k: calls.append(len(text)) or encode(text, *a, **k)
    )
    too_long = "x" * ((max_model_len - 1) * per_token + 1)
    for route, body in [
        ("v1/completions", {"prompt": too_long}),
        ("v1/completions", {"prompt": ["ok", too_long]}),
        ("v1/chat/completions", {"messages": [{"role": "user", "content": too_long}]}),
        ("tokenize", {"prompt": "y" * (max_model_len * per_token + 1)}),
    ]:
        response = httpx.post(f"{fresh_app.base_url}/{route}", json={"model": MODEL, **body})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and "characters" in error["message"], error
        assert str(max_model_len) in error["message"]
    assert all(n < max_model_len * per_token for n in calls), "a provably too long text was tokenized"
    # Just under the character bound, text is tokenized and counted as before.
    response = httpx.post(f"{fresh_app.v1}/completions", json={"prompt": "x" * (max_model_len * 2)})
    assert response.json()["error"]["code"] == "context_length_exceeded" and "tokens" in response.text
    fits = "x" * (max_model_len - 10)
    assert httpx.post(f"{fresh_app.v1}/completions", json={"prompt": fits, "max_tokens": 2}).status_code == 200


def test_tokenize_and_detokenize_are_bounded_by_max_model_len(fresh_app) -> None:
    base, limit = fresh_app.base_url, fresh_app.app.state.serving.max_model_len
    response = httpx.post(f"{base}/tokenize", json={"prompt": "x" * limit})  # + <|bos|>: one over
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.post(f"{base}/tokenize", json={"prompt": "x" * (limit - 1)}).json()["count"] == limit
    response = httpx.post(f"{base}/detokenize", json={"tokens": [120] * (limit + 1)})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tokens"
    assert httpx.post(f"{base}/detokenize", json={"tokens": [120] * limit}).json()["prompt"] == "x" * limit


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("v1/completions", '{"prompt": "a\\ud800b"}', "prompt"),
        ("v1/completions", '{"prompt": ["ok", "\\udfff"]}', "prompt"),
        ("v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages"),
        (
            "v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
            "messages",
        ),
        ("tokenize", '{"prompt": "\\ud800"}', "prompt"),
        ("tokenize", '{"messages": [{"role": "user", "content": "\\udc00"}]}', "messages"),
    ],
)
def test_lone_surrogates_are_400_not_500(live_server, route: str, body: str, param: str) -> None:
    # JSON's \ud800 escape decodes to a lone surrogate, which the tokenizer refused with a TypeError (HTTP 500).
    response = httpx.post(f"{live_server.base_url}/{route}", content=body, headers=JSON)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"]
    # A valid pair still works.
    ok = httpx.post(f"{live_server.base_url}/tokenize", content='{"prompt": "\\ud83d\\ude00"}', headers=JSON)
    assert ok.json()["count"] == 5  # <|bos|> + 4 bytes of U+1F600


# -- max_chars_per_token over tokenizers of different kinds -------------------------------------------------


def _bpe(normalizer=None, pre_tokenizer=None, byte_fallback: bool = False, unk: str | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=unk, byte_fallback=byte_fallback))
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_fallback is False and pre_tokenizer is not None else []
    special = [f"<0x{b:02X}>" for b in range(256)] if byte_fallback else []
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=alphabet, special_tokens=special + ([unk] if unk else []), show_progress=False
    )
    corpus = ["the quick brown fox jumps over the lazy dog " * 8, "    indented    code\n\n\n", "=" * 64]
    tok.train_from_iterator(corpus * 50, trainer)
    tok.decoder = decoders.ByteLevel()
    return tok


def _random_text(rng: random.Random) -> str:
    pieces = ["the ", "quick ", " " * rng.randint(1, 40), "=" * rng.randint(1, 80), "\u00e9", "e\u0301\u0323",
              "\u1100\u1161\u11a8", "\U0001f600", "<|special|>", "\n", chr(rng.randint(0x20, 0x2FFF))]  # fmt: skip
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 200)))


def _assert_bound_holds(tok: Tokenizer, bound: int) -> None:
    rng = random.Random(0)
    for _ in range(300):
        text = _random_text(rng)
        num_tokens = len(tok.encode(text, add_special_tokens=False).ids)
        assert num_tokens * bound >= len(text), (text, num_tokens, bound)


def test_max_chars_per_token_bounds_what_it_can_and_refuses_the_rest() -> None:
    wrap = lambda tok: SimpleNamespace(backend_tokenizer=tok)  # noqa: E731 -- what the function reads

    demo = build_byte_tokenizer()
    assert max_chars_per_token(wrap(demo)) == 13
    _assert_bound_holds(demo, 13)

    byte_level = _bpe(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False))
    byte_level.add_special_tokens([AddedToken("<|special|>", special=True, normalized=False)])
    bound = max_chars_per_token(wrap(byte_level))
    assert bound == max(map(len, byte_level.get_vocab(with_added_tokens=True))) and bound >= 11
    _assert_bound_holds(byte_level, bound)

    # Qwen2-style: NFC first, so a token may stand for up to 4 input characters per character it has.
    nfc = _bpe(normalizer=normalizers.NFC(), pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False))
    nfc_bound = max_chars_per_token(wrap(nfc))
    assert nfc_bound == 4 * max(map(len, nfc.get_vocab(with_added_tokens=True)))
    _assert_bound_holds(nfc, nfc_bound)

    # Llama-2-style: SentencePiece BPE with byte fallback.
    llama = _bpe(
        normalizer=normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]),
        byte_fallback=True,
        unk="<unk>",
    )
    llama_bound = max_chars_per_token(wrap(llama))
    assert llama_bound is not None
    _assert_bound_holds(llama, llama_bound)

    # Unbounded: a token that absorbs whitespace, a pre-tokenizer that drops it, an unknown-token model, a slow
    # tokenizer (no backend), a normalizer that can delete characters.
    stripping = _bpe(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False))
    stripping.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True)])
    assert len(stripping.encode(" " * 1000 + "<mask>").ids) == 1  # lstrip: the spaces join the token
    assert max_chars_per_token(wrap(stripping)) is None
    dropping = _bpe(pre_tokenizer=pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel()]))
    assert max_chars_per_token(wrap(dropping)) is None
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert max_chars_per_token(wrap(wordpiece)) is None
    assert max_chars_per_token(SimpleNamespace()) is None
    strip_accents = _bpe(normalizer=normalizers.StripAccents(), pre_tokenizer=pre_tokenizers.ByteLevel())
    assert max_chars_per_token(wrap(strip_accents)) is None

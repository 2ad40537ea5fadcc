"""Demo checkpoints of every family: written, loaded, run; the byte tokenizer and its chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from linrec.models.batch import ForwardBatch
from linrec.models.demo import DEFAULT_DEMO_FAMILY, write_demo_model
from linrec.models.loader import load_model, load_tokenizer
from linrec.models.registry import DEMO_FAMILIES, get_model_class
from linrec.models.tokenizer import DEMO_VOCAB_SIZE

# Text a byte tokenizer must return unchanged: multi-byte scripts, emoji (4-byte UTF-8 and ZWJ
# sequences), combining marks, control characters, runs of spaces, and special-token look-alikes.
ROUND_TRIP_TEXTS = [
    "",
    " ",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\x00\x7f",
    "naïve café — 日本語のテキスト, 한국어, العربية, עברית",
    "e\u0301 vs é",  # decomposed vs precomposed: no normalizer may merge them
    "🤖👩‍👩‍👧‍👦 🏳️‍🌈",
    "<|user|> looks special <|eos|><|bos|>",
    "<|user",
    "\U0010ffff\ud7ff\ue000",
]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LINREC_CACHE_DIR", str(cache))
    return cache


@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_demo_model_writes_loads_and_runs(family: str, tmp_path: Path) -> None:
    dst = write_demo_model(tmp_path / family, family)
    names = {p.name for p in dst.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == family and config["vocab_size"] == DEMO_VOCAB_SIZE

    model = load_model(dst)
    assert type(model) is get_model_class(family)
    tokenizer = load_tokenizer(dst)
    assert len(tokenizer) == model.config.vocab_size == DEMO_VOCAB_SIZE
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    input_ids = torch.tensor(prompt)
    batch = ForwardBatch.build([len(prompt)])
    state = model.allocate_state(2)
    with torch.no_grad():
        logits = model.compute_logits(model(input_ids, batch, state))
    assert logits.shape == (len(prompt), DEMO_VOCAB_SIZE) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all() and logits.std() > 0
    assert any(t.abs().sum() > 0 for layer in state for t in layer.values()), "forward must write the state"


def test_demo_model_is_deterministic_and_leaves_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    a = write_demo_model(tmp_path / "a", DEFAULT_DEMO_FAMILY)
    assert torch.equal(torch.rand(3), expected_next), "writing a demo model must not reseed the global RNG"
    b = write_demo_model(tmp_path / "b", DEFAULT_DEMO_FAMILY)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_demo_model_refuses_non_empty_dst_and_unknown_family(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="full"):
        write_demo_model(tmp_path / "full", DEFAULT_DEMO_FAMILY)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="'gpt2'.*liger_gla"):
        write_demo_model(tmp_path / "x", "gpt2")


def test_byte_tokenizer_round_trip_and_chat_template(tmp_path: Path) -> None:
    dst = write_demo_model(tmp_path / "demo", DEFAULT_DEMO_FAMILY)
    tokenizer = AutoTokenizer.from_pretrained(str(dst), local_files_only=True)
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        special = tokenizer.all_special_ids
        # every byte is one token unless it spells a special token
        if "<|" not in text:
            assert ids == list(text.encode("utf-8")), text
            assert not set(ids) & set(special)
        assert tokenizer.decode(ids) == text, repr(text)
    with_bos = tokenizer.encode("ab")
    assert with_bos == [tokenizer.bos_token_id, ord("a"), ord("b")]

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 👋"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|bos|><|system|>Be brief.<|eos|><|user|>Hi 👋<|eos|><|assistant|>Hello.<|eos|><|user|>Bye<|eos|><|assistant|>"
    )
    ids = tokenizer.apply_chat_template(messages[1:2], tokenize=True, add_generation_prompt=True, return_dict=False)
    user, assistant = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert ids == [tokenizer.bos_token_id, user, *"Hi 👋".encode(), tokenizer.eos_token_id, assistant]
    with pytest.raises(Exception, match="expected role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)

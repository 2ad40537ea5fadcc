"""The default model shipped in models/default/ (made by `python -m linrec.recipes.tiny_liger train`;
docs/default-model.md): what `LLM()`, `linrec serve` and `linrec generate` load with no model. It loads with
linrec's loader, carries its chat template, stays under 16 MB, writes English, and nothing writes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import linrec.models
import linrec.models.demo as demo
from linrec.models.demo import default_model_path
from linrec.models.loader import load_model
from linrec.models.tokenizer import load_tokenizer

DEFAULT_DIR = Path(linrec.models.__file__).parent / "default"
MAX_BYTES = 16_000_000


def test_default_model_path_is_the_shipped_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINREC_CACHE_DIR", str(tmp_path / "cache"))
    assert default_model_path() == DEFAULT_DIR
    assert not (tmp_path / "cache").exists(), "the default model is read in place, never written"


def test_a_missing_default_model_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "DEFAULT_MODEL_DIR", tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="default model is missing .*expected config.json"):
        default_model_path()


def test_files_and_size():
    names = sorted(p.name for p in DEFAULT_DIR.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert sum(p.stat().st_size for p in DEFAULT_DIR.iterdir()) < MAX_BYTES


def test_loads_as_liger_gla_in_bf16():
    model = load_model(DEFAULT_DIR, kernel_backend="torch")
    config = model.config
    assert config.model_type == "liger_gla" and config.window_size == 64
    assert config.num_key_value_heads < config.num_attention_heads  # GQA: one state per KV head
    assert next(model.parameters()).dtype == torch.bfloat16
    generation = json.loads((DEFAULT_DIR / "generation_config.json").read_text())
    tokenizer = load_tokenizer(DEFAULT_DIR)
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    assert len(tokenizer) == config.vocab_size


def test_chat_template():
    tokenizer = load_tokenizer(DEFAULT_DIR)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|system|>Be brief.<|eos|><|user|>What is a list?<|eos|><|assistant|>"


def test_the_english_check_refuses_what_the_random_demo_said(assert_english):
    assert_english("The json module exposes an API familiar to users of the pickle modules.")
    # The random demo model's answer to "Tell me a story" (issue 12), and code: neither passes.
    for text in ("\ufffd\ufffdy\x1c\ufffd\x0b\x1dvY\ufffd\ufffd", "x = f(1) + [2, 3] ** {4} // qz"):
        with pytest.raises(AssertionError):
            assert_english(text)


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_llm_with_no_model_writes_english(chat, assert_english):
    from linrec.engine.llm import LLM
    from linrec.engine.sampling_params import SamplingParams

    llm = LLM(kernel_backend="torch", max_num_seqs=2, state_memory=64 << 20)
    assert llm.engine.model_path == str(DEFAULT_DIR)
    params = SamplingParams(temperature=0.0, max_tokens=32)
    if chat:
        out = llm.chat([{"role": "user", "content": "Tell me about the json module."}], params)
    else:
        out = llm.generate(["A list comprehension is"], params)
    assert_english(out[0].outputs[0].text)

"""Llama -> Liger-GLA conversion, on disk (convert_checkpoint) and in memory (load_model(linearize=...)).

The source is a tiny random transformers LlamaForCausalLM written by its own save_pretrained; the
converted model must carry exactly its weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from linrec.models.convert import convert_checkpoint
from linrec.models.demo import demo_llama_config, write_demo_model
from linrec.models.loader import load_model, load_tokenizer
from linrec.models.tokenizer import write_byte_tokenizer


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINREC_CACHE_DIR", str(tmp_path / "cache"))


def _tiny_llama(dst: Path, max_shard_size: str | None = None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**demo_llama_config(), max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(dst), safe_serialization=True, **kwargs)
    write_byte_tokenizer(dst)
    return model


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_convert_llama_to_liger(sharded: bool, tmp_path: Path) -> None:
    src, dst = tmp_path / "llama", tmp_path / "liger"
    llama = _tiny_llama(src, max_shard_size="60KB" if sharded else None)
    src_weights = sorted(p.name for p in src.glob("*.safetensors"))
    assert (len(src_weights) > 1) == sharded

    assert convert_checkpoint(src, dst, to="liger-gla") == dst
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "liger_gla"
    assert config["hidden_size"] == 64 and config["num_key_value_heads"] == 2
    # weights and index copied byte for byte; tokenizer and generation config beside them
    copied = [*src_weights, "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    if sharded:
        copied.append("model.safetensors.index.json")
    for name in copied:
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert not list(tmp_path.glob(".liger.*")), "staging directory left behind"

    liger = load_model(dst)
    assert type(liger).__name__ == "LigerGLAForCausalLM"
    reference = dict(llama.named_parameters())
    max_diff = 0.0
    for name, param in liger.named_parameters():
        diff = (param - reference[name]).abs().max().item()
        max_diff = max(max_diff, diff)
        assert diff == 0.0, name
    assert set(dict(liger.named_parameters())) == set(reference)
    print(f"converted Liger vs source Llama: max |dw| = {max_diff} over {len(reference)} tensors")
    # embeddings and MLP are Llama's own, so they act identically on the same input
    ids = torch.tensor([[3, 100, 257, 7]])
    with torch.no_grad():
        emb_ref = llama.model.embed_tokens(ids)[0]
        mlp_ref = llama.model.layers[1].mlp(emb_ref)
        emb = liger.model.embed_tokens(ids[0])
        mlp = liger.model.layers[1].mlp(emb)
    assert torch.equal(emb, emb_ref)
    print(f"layer-1 MLP output: max |diff| vs transformers LlamaMLP = {(mlp - mlp_ref).abs().max().item():.3g}")
    torch.testing.assert_close(mlp, mlp_ref, rtol=0, atol=1e-6)
    assert load_tokenizer(dst).chat_template

    # linearizing at load time gives the same model as converting on disk
    in_memory = load_model(src, linearize="liger-gla")
    assert type(in_memory) is type(liger)
    for (name, a), (_, b) in zip(in_memory.state_dict().items(), liger.state_dict().items()):
        assert torch.equal(a, b), name


def test_convert_refuses_non_empty_dst_and_non_llama(tmp_path: Path) -> None:
    src = tmp_path / "llama"
    _tiny_llama(src)
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="taken"):
        convert_checkpoint(src, dst)
    assert (dst / "precious.txt").read_text() == "keep"

    empty = tmp_path / "empty"
    empty.mkdir()
    convert_checkpoint(src, empty)  # an existing empty directory is fine
    assert (empty / "config.json").is_file()

    mamba = write_demo_model(tmp_path / "mamba", "mamba2")
    with pytest.raises(ValueError, match="'mamba2'.*llama"):
        convert_checkpoint(mamba, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="'fancy'"):
        convert_checkpoint(src, tmp_path / "out2", to="fancy")
    with pytest.raises(FileNotFoundError, match="only local directories"):
        convert_checkpoint(tmp_path / "missing", tmp_path / "out3")
    with pytest.raises(ValueError, match="'fancy'"):
        load_model(src, linearize="fancy")

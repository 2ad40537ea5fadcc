"""What the benches share (bench/common.py): batch-size parsing, percentiles, the bench models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from linrec.bench.common import bench_model_dir, cached_bench_model, parse_batch_sizes, percentile, served_model_type


def test_parse_batch_sizes():
    assert parse_batch_sizes("1,8,64") == (1, 8, 64) and parse_batch_sizes("32") == (32,)
    for bad in ("1,x", "0", "", "32,-1"):
        with pytest.raises(ValueError, match="comma-separated batch sizes"):
            parse_batch_sizes(bad)


def test_percentile_is_nearest_rank():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and percentile([3.0, 1.0, 2.0, 4.0], 99) == 4.0
    assert percentile([5.0], 0) == percentile([5.0], 100) == 5.0


def test_served_model_type_follows_linearization():
    sizes = dict(vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    assert served_model_type({"model_type": "llama", **sizes}, "liger-gla") == "liger_gla"
    assert served_model_type({"model_type": "qwen2", **sizes}, "liger-gla") == "liger_qwen2_gla"
    assert served_model_type({"model_type": "mamba2"}, None) == "mamba2"


def test_bench_model_dir_linearizes_llama_and_writes_the_demo(tmp_path: Path):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    assert bench_model_dir(str(llama), "mamba2", str(tmp_path))[2] == "liger-gla"
    path, config, linearize = bench_model_dir(None, "mamba2", str(tmp_path))
    assert path.parent == tmp_path and config["model_type"] == "mamba2" and linearize is None
    with pytest.raises(ValueError, match="expected a demo family"):
        bench_model_dir(None, "gpt2", str(tmp_path))


def test_cached_bench_model_refuses_unknown_families(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LINREC_CACHE_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="expected a bench family"):
        cached_bench_model("bench-gla", "gla")
    assert not (tmp_path / "models" / "bench-gla").exists()


def test_lolcats_peer_is_its_base_without_the_lolcats_tensors(tmp_path: Path):
    """The HF peer of a lolcats_llama checkpoint: the base transformer of lolcats_base_model_type (llama when
    absent) built from the config without the LoLCATs keys, holding the checkpoint's base tensors exactly;
    a tensor it has no place for is an error, never a silently random peer."""
    import torch
    from safetensors.torch import load_file, save_file

    from linrec.bench.common import base_model_type, hf_peer, is_lolcats_tensor
    from linrec.models.demo import write_demo_model
    from linrec.models.loader import read_hf_config

    path = write_demo_model(tmp_path / "lolcats", "lolcats_llama")
    config = read_hf_config(path)
    mistral = {**config, "lolcats_base_model_type": "mistral"}
    assert base_model_type(config) == "llama" and base_model_type(mistral) == "mistral"
    peer = hf_peer(path, config, torch.float32, torch.device("cpu"))
    assert type(peer).__name__ == "LlamaForCausalLM" and not hasattr(peer.config, "feature_dim")
    tensors = load_file(str(path / "model.safetensors"))
    assert {n for n in tensors if is_lolcats_tensor(n)} == {
        f"model.layers.{i}.self_attn.{part}"
        for i in range(config["num_hidden_layers"])
        for part in ("feature_map_q.mlp.layer", "feature_map_k.mlp.layer", "window_factors")
    }
    assert torch.equal(peer.model.layers[1].self_attn.k_proj.weight, tensors["model.layers.1.self_attn.k_proj.weight"])

    assert type(hf_peer(path, mistral, torch.float32, torch.device("cpu"))).__name__ == "MistralForCausalLM"

    save_file({**tensors, "model.layers.0.self_attn.extra": torch.zeros(2)}, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"take every base tensor .*unexpected \['model.layers.0.self_attn.extra'\]"):
        hf_peer(path, config, torch.float32, torch.device("cpu"))

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

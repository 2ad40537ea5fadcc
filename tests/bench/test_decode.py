"""`linrec bench decode` as a CPU smoke test (--size small): it runs, prints JSON with a row per batch size,
and says that CPU figures are not performance."""

from __future__ import annotations

import json

import pytest

from linrec.cli import main


def test_bench_decode_small_cpu_json(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LINREC_CACHE_DIR", str(tmp_path))
    argv = ["bench", "decode", "--size", "small", "--device", "cpu", "--output-len", "4", "--prompt-len", "3"]
    argv += ["--repeats", "1"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["family"] == "liger_gla" and result["hf_peer"] == "HF LlamaForCausalLM.generate"
    assert result["cuda_graphs"] is False and "not a performance figure" in result["note"]
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    for r in result["rows"]:  # None only where CPU timing noise swallowed the (tiny) decode time
        rates = (r["linrec_tokens_per_s"], r["hf_tokens_per_s"])
        assert all(rate is None or rate > 0 for rate in rates)
        assert r["ratio"] is None or r["ratio"] == pytest.approx(rates[0] / rates[1])

"""`linrec bench kernels` and `linrec bench decode` as CPU smoke tests (--size small): they run, print JSON
with the expected rows, count bytes as documented, and say that CPU figures are not performance."""

from __future__ import annotations

import json

import pytest

from linrec.engine.decode_benchmark import KERNEL_SHAPES, parse_batch_sizes
from linrec.envs import triton_interpreter
from linrec.server.cli import main


def test_parse_batch_sizes():
    assert parse_batch_sizes("1,8,64") == (1, 8, 64)
    with pytest.raises(ValueError, match="comma-separated batch sizes"):
        parse_batch_sizes("1,x")
    with pytest.raises(ValueError, match="comma-separated batch sizes"):
        parse_batch_sizes("0")


def test_bench_kernels_small_cpu_json(capsys):
    assert main(["bench", "kernels", "--size", "small", "--device", "cpu", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"] == "cpu" and "not a performance figure" in result["note"]
    assert result["interpreted"] == triton_interpreter()
    assert any("fla fused_recurrent" in s for s in result["skipped"])  # the fla peer is CUDA only
    impls = {(r["kernel"], r["impl"], r["batch"]) for r in result["rows"]}
    for batch in (1, 2):
        assert ("gated_delta", "linrec torch (gather/scatter)", batch) in impls
        assert ("ssd", "transformers torch step + gather/scatter", batch) in impls
        if triton_interpreter():
            assert ("gated_delta", "linrec triton (in place)", batch) in impls
            assert ("ssd", "linrec triton (in place)", batch) in impls
    shape = KERNEL_SHAPES["small"]["gated_delta"]
    for r in result["rows"]:
        assert r["seconds"] > 0 and r["share_of_copy"] > 0
        if r["kernel"] == "gated_delta":
            state_bytes = 2 * r["batch"] * shape["HV"] * shape["K"] * shape["V"] * 4  # read + write, fp32
            assert state_bytes < r["bytes_moved"] < 2 * state_bytes


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

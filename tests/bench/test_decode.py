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


def test_bench_decode_fla_family_without_fla_models(tmp_path, monkeypatch):
    """GLA and Gated DeltaNet bench models are written by linrec in fla's format; without fla.models the
    peer rows are empty and the result says why, and linrec's own figures and prefill tokens/s still come."""
    from linrec.bench import decode

    monkeypatch.setenv("LINREC_CACHE_DIR", str(tmp_path))

    def no_fla(*args):
        raise ImportError("No module named 'fla.models'")

    monkeypatch.setattr(decode, "fla_peer", no_fla)
    result = decode.run_decode(
        family="gated_deltanet", size="small", device="cpu", batch_sizes=[1, 2], output_len=3, repeats=1
    )
    assert result.family == "gated_deltanet" and result.hf_peer == "fla.models GatedDeltaNetForCausalLM.generate"
    assert result.peer_note.startswith("peer skipped: fla.models is not importable")
    assert all(r.hf_tokens_per_s is None and r.ratio is None for r in result.rows)
    assert (result.prefill_batch, result.prefill_len) == (2, 32) and result.linrec_prefill_tokens_per_s > 0
    assert result.hf_prefill_tokens_per_s is None and result.prefill_ratio is None
    text = result.format()
    assert "peer skipped" in text and "prefill 2 x 32 tokens" in text


def test_bench_decode_reports_prefill_ratio(tmp_path, monkeypatch):
    from linrec.bench.decode import run_decode

    monkeypatch.setenv("LINREC_CACHE_DIR", str(tmp_path))
    result = run_decode(family="mamba2", size="small", device="cpu", batch_sizes=[1], output_len=3, repeats=1)
    assert result.hf_peer == "HF Mamba2ForCausalLM.generate" and result.peer_note == ""
    assert result.prefill_ratio == pytest.approx(result.linrec_prefill_tokens_per_s / result.hf_prefill_tokens_per_s)


def test_bench_decode_lolcats_small(tmp_path, monkeypatch):
    """lolcats_llama's tiny decode model (window 8: the 16-token prompts already fill the linear state) beside
    its base Llama under HF generate: both sides measured, prefill too."""
    from linrec.bench.decode import decode_model_path, run_decode
    from linrec.models.loader import read_hf_config

    monkeypatch.setenv("LINREC_CACHE_DIR", str(tmp_path))
    result = run_decode(family="lolcats_llama", size="small", device="cpu", batch_sizes=[1, 2], output_len=3, repeats=1)
    assert result.family == "lolcats_llama" and result.hf_peer == "HF LlamaForCausalLM.generate"
    assert result.peer_note == "" and [r.batch for r in result.rows] == [1, 2]
    for r in result.rows:  # None only where CPU timing noise swallowed the (tiny) decode time
        assert all(rate is None or rate > 0 for rate in (r.linrec_tokens_per_s, r.hf_tokens_per_s))
    assert result.prefill_ratio == pytest.approx(result.linrec_prefill_tokens_per_s / result.hf_prefill_tokens_per_s)
    config = read_hf_config(decode_model_path("lolcats_llama", "small"))  # the one just written, reused
    assert (config["model_type"], config["window_size"], config["feature_dim"]) == ("lolcats_llama", 8, 8)
    assert config["torch_dtype"] == "bfloat16"  # linrec's writer saves bf16, as for the fla families


@pytest.mark.parametrize("family", ["gla", "gated_deltanet"])
def test_fla_models_take_every_tensor_of_the_bench_checkpoint(family, tmp_path):
    """fla's own model class loads linrec's written checkpoint with no missing or unexpected tensor (the peer
    times the same weights). Needs flash-linear-attention (fla.models): docs/gpu-check.md brings it along."""
    pytest.importorskip("fla.models")
    import torch

    from linrec.bench.decode import DECODE_MODEL_OVERRIDES, fla_peer, write_fla_bench_model

    path = write_fla_bench_model(tmp_path / family, family, DECODE_MODEL_OVERRIDES["small"][family])
    model = fla_peer(path, torch.float32, torch.device("cpu"))
    assert type(model).__module__.startswith("fla.models")


def test_decode_module_main_takes_every_family():
    from linrec.bench.decode import DECODE_FAMILIES

    assert set(DECODE_FAMILIES) == {"liger_gla", "mamba2", "gla", "gated_deltanet", "lolcats_llama"}

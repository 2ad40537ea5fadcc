"""`linrec bench throughput` on a tiny workload: result structure, useful-token accounting, the CLI, and
token equality with transformers' Mamba2ForCausalLM (the mamba2 peer computes the same function) and with
LoLCATs' base Llama while every key is inside the window."""

from __future__ import annotations

import json

import pytest
import torch

from linrec.bench.common import parse_batch_sizes, write_bench_model
from linrec.bench.decode import DECODE_MODEL_OVERRIDES
from linrec.bench.throughput import make_workload, parse_range, run_throughput
from linrec.cli import main

# The tiny bench models: the same overrides `linrec bench decode --size small` uses.
TINY = DECODE_MODEL_OVERRIDES["small"]
SMALL = dict(num_prompts=5, prompt_len=(3, 9), output_len=(2, 7), max_num_seqs=4, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    made: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in made:
            made[family] = str(write_bench_model(tmp_path_factory.mktemp(f"bench-{family}"), family, TINY[family]))
        return made[family]

    return get


def test_workload_is_seeded_and_in_range():
    a = make_workload(20, (3, 9), (2, 7), vocab_size=50, seed=1)
    assert a == make_workload(20, (3, 9), (2, 7), vocab_size=50, seed=1)
    assert a != make_workload(20, (3, 9), (2, 7), vocab_size=50, seed=2)
    assert all(3 <= len(p) <= 9 and all(0 <= t < 50 for t in p) for p in a.prompts)
    assert all(2 <= n <= 7 for n in a.output_lens)
    with pytest.raises(ValueError, match="1 <= min <= max"):
        make_workload(4, (9, 3), (2, 7), vocab_size=50)
    assert parse_range("16:256") == (16, 256) and parse_range("8") == (8, 8)
    with pytest.raises(ValueError, match="MIN:MAX"):
        parse_range("1:2:3")


def test_liger_vs_original_llama(tiny_model):
    result = run_throughput(tiny_model("liger_gla"), hf_batch_size=2, warmup=False, keep_token_ids=True, **SMALL)
    workload = make_workload(5, (3, 9), (2, 7), vocab_size=300)
    assert result.linrec.name == "linrec liger_gla"
    assert result.hf.name == "HF LlamaForCausalLM.generate"
    for side in (result.linrec, result.hf):
        assert side.num_output_tokens == sum(workload.output_lens)
        assert side.num_prompt_tokens == sum(len(p) for p in workload.prompts)
        assert [len(ids) for ids in side.token_ids] == workload.output_lens
        assert side.seconds > 0
    # HF batches generate their longest request: what it computes is at least what is useful
    longest = [max(workload.output_lens[i : i + 2]) * len(workload.output_lens[i : i + 2]) for i in range(0, 5, 2)]
    assert result.hf.num_generated_tokens == sum(longest)
    assert result.linrec.num_generated_tokens == result.linrec.num_output_tokens
    assert result.output_ratio == pytest.approx(result.linrec.output_tokens_per_s / result.hf.output_tokens_per_s)
    data = json.loads(result.to_json())
    assert data["linrec"]["num_output_tokens"] == data["hf"]["num_output_tokens"]
    assert "token_ids" not in data["linrec"]
    assert "ratio linrec / HF" in result.format()


def test_mamba2_peer_generates_the_same_greedy_tokens(tiny_model):
    # hf_batch_size=1: no padding, so HF's greedy tokens are the reference for linrec's
    result = run_throughput(tiny_model("mamba2"), hf_batch_size=1, warmup=False, keep_token_ids=True, **SMALL)
    assert result.hf.name == "HF Mamba2ForCausalLM.generate"
    assert result.linrec.token_ids == result.hf.token_ids
    print("mamba2 greedy tokens equal to HF on", len(result.hf.token_ids), "requests")


def test_lolcats_vs_its_base_llama(tiny_model):
    """lolcats_llama (window 8: keys leave the window in every request here) beside its base Llama under HF
    generate: both sides generate and count the same requested tokens."""
    result = run_throughput(tiny_model("lolcats_llama"), hf_batch_size=2, warmup=False, keep_token_ids=True, **SMALL)
    workload = make_workload(5, (3, 9), (2, 7), vocab_size=300)
    assert result.linrec.name == "linrec lolcats_llama" and result.hf.name == "HF LlamaForCausalLM.generate"
    for side in (result.linrec, result.hf):
        assert [len(ids) for ids in side.token_ids] == workload.output_lens and side.seconds > 0
    assert result.output_ratio > 0 and result.cpu_ratio > 0
    assert "linrec lolcats_llama" in result.format()


def test_lolcats_peer_is_the_base_on_the_same_weights(tmp_path):
    """While no key has left its window LoLCATs' attention is the base's softmax attention: with a window longer
    than every request, linrec's greedy tokens equal the peer's (batch 1: no padding), which shows that the
    peer holds the checkpoint's base weights and nothing else."""
    path = write_bench_model(tmp_path / "lolcats", "lolcats_llama", {**TINY["lolcats_llama"], "window_size": 64})
    result = run_throughput(str(path), hf_batch_size=1, warmup=False, keep_token_ids=True, **SMALL)
    assert result.hf.name == "HF LlamaForCausalLM.generate"
    assert result.linrec.token_ids == result.hf.token_ids


def test_cli_json(tiny_model, capsys):
    argv = ["bench", "throughput", "--model", tiny_model("liger_gla"), "--num-prompts", "3"]
    argv += ["--prompt-len", "4:6", "--output-len", "3", "--hf-batch-size", "3,1", "--max-num-seqs", "2"]
    argv += ["--max-num-batched-tokens", "8", "--threads", "1", "--json"]
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # the bench's --threads does not outlive it
    data = json.loads(capsys.readouterr().out)
    assert data["linrec"]["num_output_tokens"] == data["hf"]["num_output_tokens"] == 9
    assert data["hf"]["num_generated_tokens"] == 9
    assert data["output_ratio"] > 0
    # both HF batch sizes ran; the peer is the one with less CPU time (one thread)
    runs = {run["batch_size"]: run for run in data["hf_runs"]}
    assert sorted(runs) == [1, 3] and data["num_threads"] == 1
    best = min(runs, key=lambda bs: runs[bs]["cpu_seconds"])
    assert data["hf_batch_size"] == best and data["hf"]["cpu_seconds"] == runs[best]["cpu_seconds"]
    assert data["cpu_ratio"] == pytest.approx(data["hf"]["cpu_seconds"] / data["linrec"]["cpu_seconds"])
    with pytest.raises(ValueError, match="batch sizes"):
        parse_batch_sizes("32,x")


def test_model_without_hf_peer_is_refused(demo_model_dir):
    with pytest.raises(ValueError, match="no HF transformers peer"):
        run_throughput(demo_model_dir("gla"), warmup=False, **SMALL)

"""`linrec bench lora` on a tiny run: every configuration reported, the merge-switching peer generating the
same greedy tokens as per-request LoRA (a check of the bench itself), the weights restored bit for bit, and
the CLI writing its JSON."""

from __future__ import annotations

import json

import pytest
import torch

from linrec.bench.common import write_bench_model
from linrec.bench.decode import DECODE_MODEL_OVERRIDES
from linrec.bench.lora import MergeSwitching, make_prompts, run_lora_bench, write_lora_adapter
from linrec.cli import main

TINY = DECODE_MODEL_OVERRIDES["small"]["liger_gla"]
NAMES = ["base", "lora base", "lora-1", "merge-1", "lora-2", "merge-2"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(write_bench_model(tmp_path_factory.mktemp("bench-lora"), "liger_gla", TINY))


def test_tiny_run_reports_every_configuration_and_the_peer_agrees(tiny_model):
    result = run_lora_bench(tiny_model, num_requests=4, prompt_len=5, output_len=3, adapter_counts=(2, 1), repeats=1)
    assert [c.name for c in result.configs] == NAMES
    assert result.adapter_counts == [1, 2] and result.max_loras == 2 and result.dtype == "float32"
    for c in result.configs:
        assert len(c.seconds_runs) == len(c.cpu_seconds_runs) == 1 and c.seconds > 0 and c.cpu_seconds > 0
        assert c.output_tokens_per_s == pytest.approx(4 * 3 / c.seconds)
        assert c.requests_per_s == pytest.approx(4 / c.seconds)
        assert [len(ids) for ids in c.token_ids] == [3] * 4
        assert (c.merge_seconds > 0) == c.name.startswith("merge")
    by = result.by_name()
    # the merge-switching peer computes what per-request LoRA computes: same greedy tokens, request by request
    for k in (1, 2):
        assert by[f"merge-{k}"].token_ids == by[f"lora-{k}"].token_ids
        assert result.merge_equals_lora[k] == 4
    # ... and that is not because the adapters do nothing
    assert all(result.adapted_differ_from_base[k] > 0 for k in (1, 2))
    assert by["lora-1"].token_ids != by["lora-2"].token_ids
    assert result.lora_base_equals_base and result.weights_restored

    ratios = result.ratios()
    assert set(ratios) == {"lora base / base", "lora-1 / base", "lora-2 / base", "lora-1 / merge-1", "lora-2 / merge-2"}
    assert ratios["lora-2 / merge-2"] == pytest.approx(
        by["lora-2"].output_tokens_per_s / by["merge-2"].output_tokens_per_s
    )
    data = json.loads(result.to_json())
    assert [c["name"] for c in data["configs"]] == NAMES and "token_ids" not in data["configs"][0]
    assert data["ratios"] == pytest.approx(ratios)
    assert data["ratios_cpu_time"]["lora-2 / base"] == pytest.approx(by["base"].cpu_seconds / by["lora-2"].cpu_seconds)
    text = result.format()
    assert "lora-2 / merge-2" in text and "restored bit for bit after merge-switching: yes" in text


def test_peer_restores_weights_bit_for_bit(tiny_model, tmp_path):
    from linrec.engine.llm import LLM

    llm = LLM(tiny_model, device="cpu", dtype="float32", linearize="liger-gla", enable_prefix_caching=False)
    model = llm.engine.model
    projections = {name: (m.in_features, m.out_features) for name, m in model.projections().items()}
    originals = {name: m.weight.detach().clone() for name, m in model.projections().items()}
    peer = MergeSwitching(model, {"a": write_lora_adapter(tmp_path / "a", projections, rank=4, seed=1)})
    assert set(peer.saved) == set(projections)  # every projection targeted

    peer.merge("a")
    assert not peer.is_restored()
    assert all(not torch.equal(m.weight, originals[name]) for name, m in model.projections().items())
    peer.restore()
    assert peer.is_restored()
    for name, m in model.projections().items():
        assert torch.equal(m.weight.detach().view(torch.uint8), originals[name].view(torch.uint8)), name

    prompts = make_prompts(3, 4, vocab_size=300, seed=2)
    _, token_ids = peer.serve(llm.engine, prompts, 2, ["a", "a", "a"])
    assert [len(ids) for ids in token_ids] == [2, 2, 2] and peer.is_restored()


def test_cli_writes_json(tiny_model, tmp_path, capsys):
    out = tmp_path / "lora.json"
    argv = ["bench", "lora", "--model", tiny_model, "--num-requests", "2", "--prompt-len", "3", "--output-len", "2"]
    argv += ["--adapters", "1", "2", "--rank", "2", "--repeats", "1", "--device", "cpu", "--threads", "1"]
    threads = torch.get_num_threads()
    assert main([*argv, "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # put back
    assert "lora-2 / merge-2" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["rank"] == 2 and data["adapter_counts"] == [1, 2] and data["weights_restored"]
    assert [c["name"] for c in data["configs"]] == NAMES


def test_bad_arguments_say_what_was_expected(tiny_model):
    with pytest.raises(ValueError, match="max_loras >= the largest adapter count 2"):
        run_lora_bench(tiny_model, num_requests=4, adapter_counts=(2,), max_loras=1)
    with pytest.raises(ValueError, match="at most num_requests=2 adapters"):
        run_lora_bench(tiny_model, num_requests=2, adapter_counts=(4,))

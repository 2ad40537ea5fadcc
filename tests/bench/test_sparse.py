"""`linrec bench sparse` on a tiny run: the switch timing and every configuration reported, the self-checks (sparse-k
tokens == an engine with the adapter merged by hand, base weights bit for bit after every run) passing, the CLI
writing its JSON; the adapters it writes and the arrivals at a rate."""

from __future__ import annotations

import json

import pytest
import torch

from linrec.bench.common import write_bench_model
from linrec.bench.decode import DECODE_MODEL_OVERRIDES
from linrec.bench.lora import make_prompts
from linrec.bench.sparse import equivalent_rank, run_sparse_bench, serve, sparse_deltas, write_equivalent_lora
from linrec.cli import main

TINY = DECODE_MODEL_OVERRIDES["small"]["liger_gla"]
NAMES = ["base", "sparse-1", "sparse-2", "lora-1", "lora-2", "mixed-2"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(write_bench_model(tmp_path_factory.mktemp("bench-sparse"), "liger_gla", TINY))


def test_tiny_run_reports_every_configuration_and_passes_its_checks(tiny_model, tmp_path, capsys):
    out = tmp_path / "sparse.json"
    argv = ["bench", "sparse", "--model", tiny_model, "--num-requests", "8", "--prompt-len", "5", "--output-len", "3"]
    argv += [
        "--adapters",
        "2",
        "1",
        "--max-num-seqs",
        "4",
        "--repeats",
        "1",
        "--switch-repeats",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())

    assert [c["name"] for c in data["configs"]] == NAMES and "token_ids" not in data["configs"][0]
    assert data["adapter_counts"] == [1, 2] and data["mixed_adapters"] == 2 and data["dtype"] == "float32"
    assert data["max_num_seqs"] == 4  # 8 requests: half of them queue behind the running ones
    for c in data["configs"]:
        assert len(c["seconds_runs"]) == 1 and c["seconds"] > 0 and c["cpu_seconds"] > 0
        assert c["output_tokens_per_s"] == pytest.approx(8 * 3 / c["seconds"])
        assert 0 < c["p50_latency_s"] <= c["p99_latency_s"] <= c["seconds"]
        assert (c["base_p99_latency_s"] is not None) == (c["name"] in ("base", "mixed-2"))
        # only sparse tokens beside other weights take the add-on: never base, LoRA or one adapter alone
        if c["name"] not in ("sparse-2", "mixed-2"):
            assert c["mixed_steps"] == 0, c["name"]
    by = {c["name"]: c for c in data["configs"]}
    assert by["sparse-1"]["sparse_switches"] >= 1  # one adapter alone runs scattered
    # two adapters, 4 slots for 8 requests: whole batches of one (scattered in turns) or mixed steps (add-on)
    assert by["sparse-2"]["sparse_switches"] >= 2 or by["sparse-2"]["mixed_steps"] > 0

    switch = data["switch"]
    assert switch["sparse_params"] > 0 and switch["lora_params"] > 0 and switch["repeats"] == 2
    for name in ("activate_s", "deactivate_s", "merge_s", "unmerge_s", "restore_copy_s"):
        assert switch[name] > 0, name
    assert switch["sparse_restored_bitwise"] and switch["unmerge_max_abs_diff"] >= 0
    assert set(data["switch_ratios"]) == {"merge+unmerge / sparse switch", "merge+restore / sparse switch"}

    # self-checks: hand-merged reference == sparse-k on the checked requests, the adapters do something, the
    # mixed run's base requests are base's, the base weights bit for bit after every run
    assert data["sparse_equals_reference"] == {"1": [4, 4], "2": [4, 4]}
    assert data["base_equals_reference"] and data["mixed_base_equals_base"] and data["weights_restored"]
    assert all(data["sparse_differ_from_base"][k] > 0 for k in ("1", "2"))
    assert all(data["lora_differ_from_base"][k] > 0 for k in ("1", "2"))
    assert data["checks_passed"]

    assert set(data["ratios"]) == {
        "sparse-2 / sparse-1",
        "sparse-1 / lora-1",
        "sparse-2 / lora-2",
        "sparse-1 / base",
        "sparse-2 / base",
        "lora-1 / base",
        "lora-2 / base",
        "mixed-2 base p99 / base p99",
    }
    assert data["ratios"]["sparse-2 / sparse-1"] == pytest.approx(
        by["sparse-2"]["output_tokens_per_s"] / by["sparse-1"]["output_tokens_per_s"]
    )
    assert data["ratios_cpu_time"]["sparse-2 / lora-2"] == pytest.approx(
        by["lora-2"]["cpu_seconds"] / by["sparse-2"]["cpu_seconds"]
    )
    assert set(data["targets_met"]) == {"switch"}  # no sparse-4 in this run
    assert "merge+unmerge / sparse switch" in text and "self-checks: passed" in text and "mixed-2" in text


def test_switch_only(tiny_model):
    result = run_sparse_bench(tiny_model, switch_only=True, switch_repeats=2)
    assert result.configs == [] and result.ratios() == {} and set(result.targets_met()) == {"switch"}
    assert result.switch.sparse_restored_bitwise and result.switch.switch_s > 0 and result.checks_passed()
    assert result.weights_restored is None and result.sparse_equals_reference == {}
    text = result.format()
    assert "merge+unmerge / sparse switch" in text and "workload" not in text and "self-checks: passed" in text
    assert json.loads(result.to_json())["configs"] == []


def test_sparse_deltas_and_the_equivalent_lora(tmp_path):
    from linrec.models.lora import read_lora_adapter

    projections = {"model.layers.0.mlp.up_proj": (64, 176), "model.layers.0.self_attn.k_proj": (64, 16)}
    deltas = sparse_deltas(projections, 0.02, seed=3)
    for name, (in_features, out_features) in projections.items():
        indices, values = deltas[name]
        nnz = round(0.02 * in_features * out_features)
        assert indices.shape == (2, nnz) and values.shape == (nnz,) and values.dtype == torch.float32
        assert (indices[0] < out_features).all() and (indices[1] < in_features).all()
        assert torch.unique(indices[0] * in_features + indices[1]).numel() == nnz  # no repeated positions
    again = sparse_deltas(projections, 0.02, seed=3)  # seeded
    assert all(
        torch.equal(again[name][0], deltas[name][0]) and torch.equal(again[name][1], deltas[name][1]) for name in deltas
    )

    assert equivalent_rank(64, 176, 0.02) == 1 and equivalent_rank(4096, 4096, 0.01) == 20
    assert equivalent_rank(512, 1408, 0.01) == 4 and equivalent_rank(512, 128, 0.01) == 1
    adapter = read_lora_adapter(write_equivalent_lora(tmp_path / "lora", projections, 0.1, seed=0))
    for name, (in_features, out_features) in projections.items():
        delta = adapter.deltas[f"{name}.weight"]
        rank = equivalent_rank(in_features, out_features, 0.1)
        assert delta.lora_a.shape == (rank, in_features) and delta.lora_b.shape == (out_features, rank)
        assert delta.scaling == 2.0


def test_arrivals_at_a_rate(tiny_model):
    from linrec.engine.llm import LLM

    engine = LLM(tiny_model, device="cpu", dtype="float32", linearize="liger-gla", enable_prefix_caching=False).engine
    prompts = make_prompts(4, 3, vocab_size=300, seed=1)
    served = serve(engine, prompts, 2, [None] * 4, rate=20.0)
    assert served.seconds >= 3 / 20.0  # the last request arrives at 0.15 s
    assert [len(ids) for ids in served.token_ids] == [2] * 4 and all(0 < t <= served.seconds for t in served.latencies)
    assert served.token_ids == serve(engine, prompts, 2, [None] * 4).token_ids  # same greedy tokens at once


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"arrival": "rate"}, "expected a rate > 0 exactly with arrival 'rate'"),
        ({"rate": 5.0}, "expected a rate > 0 exactly with arrival 'rate'"),
        ({"density": 0.0}, "expected 0 < density <= 1"),
        ({"max_num_seqs": 0}, "expected max_num_seqs >= 1"),
        ({"size": "7b"}, "expected size in"),
        ({"adapter_counts": (1, 16), "num_requests": 8}, "the largest adapter count 16"),
        (
            {"mixed_adapters": 3, "adapter_counts": (1, 2)},
            "expected 1 <= mixed_adapters <= the largest adapter count 2",
        ),
    ],
)
def test_refusals_before_any_engine(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        run_sparse_bench("/nonexistent", **kwargs)


def test_cli_refusal_is_one_line(capsys):
    assert main(["bench", "sparse", "--model", "/nonexistent", "--arrival", "rate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("linrec: error: expected a rate > 0") and len(err.strip().splitlines()) == 1

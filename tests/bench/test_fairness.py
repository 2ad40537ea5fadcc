"""`linrec bench fairness` on tiny sizes: the command runs and its JSON holds what docs/benchmarks.md quotes."""

from __future__ import annotations

import json

import pytest

from linrec import cli
from linrec.bench.fairness import make_fairness_workload


def test_bench_fairness_json_smoke(capsys):
    code = cli.main(
        ["bench", "fairness", "--family", "mamba2", "--device", "cpu", "--num-long", "1", "--long-len", "400",
         "--num-short", "3", "--short-len", "4", "--short-output", "2", "--short-interval", "0.01",
         "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--json"]
    )  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [m["mode"] for m in result["modes"]] == ["fifo", "fair"]
    fifo, fair = result["modes"]
    assert fifo["long_prefill_token_threshold"] == 0 and fair["long_prefill_token_threshold"] == 16
    assert result["outputs_identical"] is True
    assert len(fair["long_ttft_s"]) == 1 and fair["short_ttft_max_s"] >= fair["short_ttft_p50_s"] > 0
    assert result["short_ttft_p99_fifo_over_fair"] > 0


def test_workload_arrivals_and_bad_sizes():
    arrivals = make_fairness_workload(2, 10, 1, 3, 4, 2, 0.5, 0.25, vocab=50, seed=0)
    assert [a.at_s for a in arrivals] == [0.0, 0.0, 0.5, 0.75, 1.0]
    assert [len(a.prompt) for a in arrivals] == [10, 10, 4, 4, 4] and [a.is_long for a in arrivals].count(True) == 2
    with pytest.raises(ValueError, match="long_len"):
        make_fairness_workload(1, 0, 1, 1, 1, 1, 0.0, 0.0, vocab=50, seed=0)

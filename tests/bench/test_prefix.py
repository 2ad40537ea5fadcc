"""`linrec bench prefix` on a tiny workload: the workload's shape, the three contenders, and the CLI."""

from __future__ import annotations

import json

from linrec.bench.common import percentile
from linrec.bench.prefix import count_distinct_tokens, make_prefix_workload
from linrec.cli import main


def test_workload_shape_and_distinct_tokens():
    w = make_prefix_workload(3, 4, prefix_len=20, question_len=5, output_len=2, vocab=1000, seed=1)
    assert len(w.prompts) == 12 and all(len(p) == 25 for p in w.prompts)
    assert len({tuple(p[:20]) for p in w.prompts}) == 3
    assert w.num_distinct_tokens == 3 * 20 + 12 * 5
    brute = len({tuple(p[: i + 1]) for p in w.prompts for i in range(len(p))})
    assert count_distinct_tokens(w.prompts) == brute
    assert count_distinct_tokens([[1, 2, 3], [1, 2], [1, 2, 3]]) == 3
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0 and percentile([3.0, 1.0, 2.0, 4.0], 99) == 4.0


def test_cli_smoke_three_modes(demo_model_dir, capsys):
    argv = ["bench", "prefix", "--model", demo_model_dir("mamba2"), "--num-groups", "2", "--prompts-per-group"]
    argv += ["3", "--prefix-len", "40", "--question-len", "6", "--output-len", "3", "--repeats", "1", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    modes = {m["mode"]: m for m in data["modes"]}
    assert list(modes) == ["off", "radix", "global"] and data["outputs_identical"]
    assert data["num_distinct_tokens"] == 2 * 40 + 6 * 6
    assert modes["off"]["prefill_tokens_computed"] == data["num_prompt_tokens"] == 6 * 46
    # global grouping prefills each shared system prompt once
    assert modes["global"]["prefill_tokens_computed"] == data["num_distinct_tokens"]
    assert modes["global"]["cache_hit_tokens"] == 4 * 40
    assert all(m["ttft_p50_s"] <= m["ttft_p99_s"] for m in modes.values())

"""`linrec bench prefix --replicas 2` on a tiny workload: two CPU replicas of the demo model on a local Ray instance,
affinity routing beside power-of-two, through the CLI."""

from __future__ import annotations

import json

import pytest

from linrec.cli import main


def test_replicas_below_two_are_one_line(capsys) -> None:
    assert main(["bench", "prefix", "--replicas", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "linrec: error: expected replicas >= 2 (1 is the single-engine bench), got 0"
    )


def test_two_replicas_affinity_beside_power_of_two(demo_model_dir, tmp_path, capsys) -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'linrec[ray]')")
    out = tmp_path / "prefix.json"
    argv = ["bench", "prefix", "--replicas", "2", "--model", demo_model_dir("mamba2"), "--device", "cpu"]
    argv += ["--num-groups", "2", "--prompts-per-group", "3", "--prefix-len", "64", "--question-len", "6"]
    argv += ["--output-len", "3", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "checks: greedy tokens equal per request across policies: yes" in printed
    data = json.loads(out.read_text())
    policies = {p["policy"]: p for p in data["policies"]}
    assert list(policies) == ["affinity", "power_of_two"] and data["checks_passed"]
    assert data["num_distinct_tokens"] == 2 * 64 + 6 * 6
    # Affinity: each group's first request goes to an idle replica, the others follow it (one group per replica).
    affinity = policies["affinity"]
    assert affinity["decisions"] == {**dict.fromkeys(affinity["decisions"], 0), "least_loaded": 2, "prefix": 4}
    assert affinity["replica_requests"] == [3, 3]
    assert policies["power_of_two"]["decisions"]["power_of_two"] == 6
    for policy in policies.values():
        assert sum(policy["replica_requests"]) == 6
        # every prompt token is either prefilled or loaded from a snapshot
        assert policy["prefill_tokens_computed"] + policy["cache_hit_tokens"] == data["num_prompt_tokens"]
        assert policy["prefill_tokens_computed"] >= data["num_distinct_tokens"]

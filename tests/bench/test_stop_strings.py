"""`linrec bench stop-strings` on a tiny workload: the workload's shape and the CLI's JSON."""

from __future__ import annotations

import json

import pytest

from linrec.bench.stop_strings import make_stop_string_workload
from linrec.cli import main


def test_workload_stop_strings_never_complete_but_overlap_the_text():
    workload = make_stop_string_workload(num_stops=20, stop_len=30, num_tokens=100, seed=1)
    text = workload.text
    assert len(text) == 100 and text.isascii()
    assert set(workload.stop_sets) == {"overlapping", "unrelated"}
    for stops in workload.stop_sets.values():
        assert len(stops) == 20 and all(len(s) == 30 and s[-1] not in text for s in stops)
    # Overlapping ones are windows of the text (wrapping around at its end) with the last character replaced.
    assert all(s[:-1] in text * 2 for s in workload.stop_sets["overlapping"])
    # Longer stop strings than text still work (they wrap around more than once).
    long = make_stop_string_workload(num_stops=2, stop_len=250, num_tokens=40, seed=1)
    assert all(len(s) == 250 for s in long.stop_sets["overlapping"])
    with pytest.raises(ValueError, match="expected num_stops >= 1, got 0"):
        make_stop_string_workload(num_stops=0, stop_len=3, num_tokens=10, seed=0)


def test_cli_json_smoke(capsys):
    argv = ["bench", "stop-strings", "--num-stops", "8", "--stop-len", "16", "--num-tokens", "120"]
    assert main([*argv, "--repeats", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["num_stops"], data["stop_len"], data["num_tokens"], data["repeats"]) == (8, 16, 120, 1)
    contenders = [(c["stop_set"], c["matcher"]) for c in data["contenders"]]
    assert contenders == [
        ("none", "none"),
        ("overlapping", "automaton"),
        ("overlapping", "naive"),
        ("unrelated", "automaton"),
        ("unrelated", "naive"),
    ]
    assert all(c["text_is_the_input"] and c["cpu_us_per_token"] > 0 for c in data["contenders"])
    stats = {s["stop_set"]: s for s in data["stop_sets"]}
    assert 1.0 <= stats["overlapping"]["automaton_steps_per_char"] <= 2.0
    assert stats["overlapping"]["max_held_chars"] == 15  # a whole window but its last character
    assert set(data["ratios"]) == {"overlapping", "unrelated"}
    assert all(r["naive_over_automaton"] > 0 for r in data["ratios"].values())
    # The table form names both ratios.
    assert main([*argv, "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert "automaton/no stops" in table and "naive/automaton" in table

"""`linrec bench multiturn` on a tiny run: both contenders reported turn by turn, the self-checks passing (the same
greedy tokens and engine prompts in every turn), responses prefilling only the new input + the stored last token,
and the JSON output in its documented shape."""

from __future__ import annotations

import json

import pytest

from linrec.bench.common import write_bench_model
from linrec.bench.decode import DECODE_MODEL_OVERRIDES
from linrec.bench.multiturn import make_conversations
from linrec.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = DECODE_MODEL_OVERRIDES["small"]["liger_gla"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(write_bench_model(tmp_path_factory.mktemp("bench-multiturn"), "liger_gla", TINY))


def test_conversations_are_seeded_and_shaped():
    users = make_conversations(3, 4, 5, 300, seed=7)
    assert [len(turns) for turns in users] == [4] * 3 and all(len(u) == 5 for turns in users for u in turns)
    assert users == make_conversations(3, 4, 5, 300, seed=7) != make_conversations(3, 4, 5, 300, seed=8)
    assert all(0 <= token < 300 for turns in users for u in turns for token in u)


def test_tiny_run_reports_every_turn_and_the_checks_pass(tiny_model, tmp_path, capsys):
    out = tmp_path / "multiturn.json"
    argv = ["bench", "multiturn", "--model", tiny_model, "--num-conversations", "3", "--num-turns", "3"]
    argv += ["--user-len", "4", "--output-len", "3", "--repeats", "1", "--device", "cpu", "--out", str(out)]
    # one pool row for stored states: the other conversations resume from host memory, and still agree
    argv += ["--max-device-states", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["contenders"]] == ["responses", "resend"]
    assert data["checks_passed"] and data["tokens_equal"] and data["prompts_equal"]
    assert data["num_turns_compared"] == data["num_turns_equal"] == 3 * 3
    responses, resend = data["contenders"]
    for contender in (responses, resend):
        assert [t["turn"] for t in contender["turns"]] == [1, 2, 3] and "token_ids" not in contender
        # the engine's prompt is the whole conversation so far: turn k has (k - 1) * (4 + 3) + 4 tokens
        assert [t["prompt_tokens"] for t in contender["turns"]] == [4, 11, 18]
        assert all(t["ttft_s"] > 0 and len(t["ttft_runs_s"]) == 1 for t in contender["turns"])
        first, last = contender["turns"][0]["ttft_s"], contender["turns"][-1]["ttft_s"]
        assert contender["ttft_ratio"] == pytest.approx(last / first)
    # responses feeds the new input alone in turn 1, then the new input + the stored last token (sampled, never fed)
    assert [(t["prefill_tokens_min"], t["prefill_tokens_max"]) for t in responses["turns"]] == [(4, 4), (5, 5), (5, 5)]
    assert data["targets_met"]["responses prefill == new input + 1"]
    # every turn stored its state, every turn after the first resumed one, none was missing
    stats = data["store_stats"]
    assert (stats["saves"], stats["resumes"], stats["misses"]) == (9, 6, 0)
    assert data["max_device_states"] == 1 and stats["spills_to_host"] > 0
    # resending cannot feed less: the last reply token was never fed in its own request either
    assert all(t["prefill_tokens_min"] >= 5 for t in resend["turns"][1:])
    assert "responses: turn-3 / turn-1 TTFT" in text and "greedy tokens equal in every turn: yes (9/9" in text


def test_bad_flags_are_one_line(capsys):
    assert main(["bench", "multiturn", "--num-turns", "0", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == "linrec: error: expected num_turns >= 1, got 0"

"""Scheduler tests in plain data: no model, no tensors."""

from __future__ import annotations

import pytest

from linrec.engine.request import Request, RequestStatus
from linrec.engine.sampling_params import SamplingParams
from linrec.engine.scheduler import QueueFullError, Scheduler, StepResult

EOS = 0


def make_scheduler(**kwargs) -> Scheduler:
    args = dict(num_slots=4, max_num_seqs=4, max_num_batched_tokens=16, max_waiting_requests=8, eos_token_ids=(EOS,))
    args.update(kwargs)
    return Scheduler(**args)


def make_request(rid: str, prompt_len: int, n: int = 1, **params) -> Request:
    sp = SamplingParams(n=n, **{"max_tokens": 4, **params})
    parent = Request(rid, list(range(1, prompt_len + 1)), sp)
    parent.children = [
        Request(f"{rid}#{i}", parent.prompt_token_ids, sp, sample_index=i, parent_id=rid) for i in range(1, n)
    ]
    return parent


def step(sched: Scheduler, token: int = 7):
    out = sched.schedule()
    result = StepResult({req.request_id: token for req, _ in out.samples})
    return out, sched.update(out, result)


def test_decode_first_then_chunked_prefill_under_budget():
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add_request(make_request("a", 3))
    out, _ = step(sched)
    assert [len(s.token_ids) for s in out.sequences] == [3]
    sched.add_request(make_request("b", 20))
    out, _ = step(sched)
    # a decodes (1 token) before b's first chunk takes the remaining 7
    assert [(s.request_id, len(s.token_ids)) for s in out.sequences] == [("a", 1), ("b", 7)]
    assert out.num_batched_tokens == 8
    assert not out.sequences[1].needs_sample
    out, _ = step(sched)
    assert [(s.request_id, len(s.token_ids), s.start_position) for s in out.sequences] == [
        ("a", 1, 4),
        ("b", 7, 7),
    ]


def test_prefill_chunk_feeds_the_right_tokens_and_samples_at_prompt_end():
    sched = make_scheduler(max_num_batched_tokens=4, max_num_seqs=2, num_slots=2)
    sched.add_request(make_request("a", 6))
    out, _ = step(sched)
    assert out.sequences[0].token_ids == [1, 2, 3, 4] and not out.samples
    out, updates = step(sched, token=9)
    assert out.sequences[0].token_ids == [5, 6] and out.sequences[0].needs_sample
    assert updates[0].new_token_ids == [9]
    out, _ = step(sched)
    assert out.sequences[0].token_ids == [9] and out.sequences[0].start_position == 6


def test_admission_waits_for_a_free_slot_and_reuse_is_reset():
    sched = make_scheduler(num_slots=2, max_num_seqs=2)
    for rid in "abc":
        sched.add_request(make_request(rid, 2, max_tokens=1))
    out, _ = step(sched)
    assert {s.request_id for s in out.sequences} == {"a", "b"}
    assert sorted(out.slots_to_reset) == [1, 2]
    assert sched.num_waiting == 1
    out, _ = step(sched)  # a and b finished at max_tokens=1 in the last update: c gets a freed slot
    assert [s.request_id for s in out.sequences] == ["c"]
    assert out.slots_to_reset == [out.sequences[0].slot_id]
    assert set(out.finished_request_ids) == {"a", "b"}


def test_stop_conditions():
    sched = make_scheduler()
    sched.add_request(make_request("eos", 2, max_tokens=10))
    sched.add_request(make_request("min", 2, max_tokens=10, min_tokens=2))
    sched.add_request(make_request("ign", 2, max_tokens=3, ignore_eos=True))
    sched.add_request(make_request("stoptok", 2, max_tokens=10, stop_token_ids=[5], ignore_eos=True))
    out, updates = step(sched, token=EOS)
    finished = {u.request.request_id: u.request.finish_reason for u in updates if u.finished}
    assert finished == {"eos": "stop"}  # min_tokens=2 and ignore_eos keep the others going
    out, updates = step(sched, token=5)
    finished = {u.request.request_id: (u.request.finish_reason, u.request.stop_reason) for u in updates if u.finished}
    assert finished == {"stoptok": ("stop", 5)}
    _, updates = step(sched, token=EOS)
    finished = {u.request.request_id: u.request.finish_reason for u in updates if u.finished}
    assert finished == {"min": "stop", "ign": "length"}


def test_abort_frees_the_slot_for_the_next_step():
    sched = make_scheduler(num_slots=1, max_num_seqs=1)
    sched.add_request(make_request("a", 3, max_tokens=100))
    sched.add_request(make_request("b", 3))
    step(sched)
    assert sched.allocator.num_free == 0
    sched.abort(["a"])
    assert sched.allocator.num_free == 1
    out, _ = step(sched)
    assert [s.request_id for s in out.sequences] == ["b"]
    assert "a" in out.finished_request_ids
    sched.abort(["does-not-exist"])  # unknown ids are ignored


def test_n_samples_fork_after_one_prefill():
    sched = make_scheduler(max_num_batched_tokens=4)
    sched.add_request(make_request("p", 6, n=3))
    out, _ = step(sched)
    assert not out.forks and sched.allocator.num_used == 3  # children's slots reserved at admission
    out, updates = step(sched)
    assert len(out.sequences) == 1  # the prompt is prefilled once
    ((src, dsts),) = out.forks
    assert src == out.sequences[0].slot_id and len(dsts) == 2 and src not in dsts
    assert [r.request_id for r, _ in out.samples] == ["p", "p#1", "p#2"]
    assert all(idx == 0 for _, idx in out.samples)
    assert sorted(u.request.request_id for u in updates) == ["p", "p#1", "p#2"]
    out, _ = step(sched)
    assert sorted(s.request_id for s in out.sequences) == ["p", "p#1", "p#2"]
    assert all(s.start_position == 6 for s in out.sequences)  # feeding sample 0 at position 6


def test_n_samples_survive_a_parent_that_stops_at_once():
    sched = make_scheduler()
    sched.add_request(make_request("p", 2, n=2, max_tokens=1))
    _, updates = step(sched)
    assert sorted((u.request.request_id, u.request.finish_reason) for u in updates) == [
        ("p", "length"),
        ("p#1", "length"),
    ]
    assert sched.allocator.num_used == 0


def test_abort_parent_before_fork_releases_children():
    sched = make_scheduler(max_num_batched_tokens=4)
    sched.add_request(make_request("p", 10, n=2))
    step(sched)
    assert sched.allocator.num_used == 2
    sched.abort(["p"])
    assert sched.allocator.num_used == 0 and not sched.has_unfinished()


def test_waiting_queue_is_bounded():
    sched = make_scheduler(max_waiting_requests=2)  # 4 free slots + 2 waiting places
    for i in range(6):
        sched.add_request(make_request(f"r{i}", 2))
    with pytest.raises(QueueFullError):
        sched.add_request(make_request("one-too-many", 2))
    step(sched)  # 4 run, 2 wait: the bound is the waiting places now
    assert sched.num_running == 4 and sched.num_waiting == 2
    with pytest.raises(QueueFullError):
        sched.add_request(make_request("still-too-many", 2))


def test_a_burst_fills_free_slots_as_well_as_waiting_places():
    # Found by a burst of 12 against 2 slots and 3 waiting places: 9 were refused while slots sat free.
    sched = make_scheduler(num_slots=2, max_num_seqs=2, max_waiting_requests=3)
    accepted = 0
    for i in range(12):
        try:
            sched.add_request(make_request(f"r{i}", 2))
            accepted += 1
        except QueueFullError:
            pass
    assert accepted == 5
    out, _ = step(sched)
    assert len(out.sequences) == 2 and sched.num_waiting == 3


def test_bad_configuration_and_requests_are_rejected():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_scheduler(max_num_batched_tokens=2, max_num_seqs=4)
    sched = make_scheduler(num_slots=2, max_num_seqs=2)
    with pytest.raises(ValueError, match="n=3"):
        sched.add_request(make_request("a", 2, n=3))
    sched.add_request(make_request("a", 2))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("a", 2))


def test_max_num_seqs_caps_running_even_with_free_slots():
    sched = make_scheduler(num_slots=4, max_num_seqs=2)
    for rid in "abc":
        sched.add_request(make_request(rid, 1, max_tokens=50))
    out, _ = step(sched)
    assert len(out.sequences) == 2 and sched.num_running == 2
    assert sched.requests["c"].status is RequestStatus.WAITING


# -- fair admission: short prompts are never stuck behind a long prefill -----------------------------


def tokens_of(out, rid: str) -> int:
    return sum(len(s.token_ids) for s in out.sequences if s.request_id == rid)


def test_a_short_prompt_is_admitted_at_the_next_step_while_a_long_one_prefills():
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=16)
    sched.add_request(make_request("long", 100_000))
    out, _ = step(sched)
    assert tokens_of(out, "long") == 64  # alone, it takes the whole budget
    sched.add_request(make_request("short", 8))
    out, updates = step(sched)
    # The short prompt runs whole in the very next step; the long one keeps the rest of the budget.
    assert tokens_of(out, "short") == 8 and tokens_of(out, "long") == 56
    assert [u.request.request_id for u in updates] == ["short"]  # its first token: TTFT of one step


def test_a_long_prefill_is_never_starved_by_a_flood_of_short_prompts():
    sched = make_scheduler(
        num_slots=64,
        max_num_seqs=64,
        max_num_batched_tokens=64,
        max_waiting_requests=1000,
        long_prefill_token_threshold=16,
    )
    sched.add_request(make_request("long", 1000))
    steps = 0
    while sched.requests["long"].is_prefilling:
        for i in range(4):  # more short prompt tokens arrive each step than the budget can take
            sched.add_request(make_request(f"s{steps}-{i}", 15, max_tokens=1))
        remaining = sched.requests["long"].num_pending_tokens
        out, _ = step(sched)
        assert tokens_of(out, "long") >= min(16, remaining)
        steps += 1
    assert steps <= -(-1000 // 16)


def test_a_second_long_prompt_waits_for_the_first_while_short_ones_pass_it():
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=16)
    sched.add_request(make_request("long-1", 200))
    sched.add_request(make_request("long-2", 200))
    sched.add_request(make_request("short", 4))
    out, _ = step(sched)
    assert tokens_of(out, "long-2") == 0 and tokens_of(out, "short") == 4
    assert sched.requests["long-2"].status is RequestStatus.WAITING and sched.requests["long-2"].slot_id == 0
    while sched.requests["long-1"].is_prefilling:
        step(sched)
    out, _ = step(sched)
    assert tokens_of(out, "long-2") > 0


def test_with_the_threshold_off_a_long_prefill_blocks_admission_as_before():
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=0)
    sched.add_request(make_request("long", 1000))
    step(sched)
    sched.add_request(make_request("short", 8))
    out, _ = step(sched)
    assert tokens_of(out, "short") == 0 and tokens_of(out, "long") == 64


def test_bad_fairness_settings_are_rejected():
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        make_scheduler(long_prefill_token_threshold=-1)
    with pytest.raises(ValueError, match="max_long_partial_prefills"):
        make_scheduler(max_long_partial_prefills=0)


# -- failed steps: quarantine, bisection, the cause alone fails ----------------------------------------


def run_with_faults(sched: Scheduler, fails, max_steps: int = 500) -> tuple[int, list[str]]:
    """Step until nothing is left; a step for which fails(out) is true is recovered instead of updated.
    Returns (failed steps, ids that ended with an error)."""
    num_failed, errors = 0, []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return num_failed, errors
        out = sched.schedule()
        if fails(out):
            num_failed += 1
            errors += [r.request_id for r in sched.recover(out)]
        else:
            sched.update(out, StepResult({req.request_id: 7 for req, _ in out.samples}))
    raise AssertionError("the scheduler did not finish")


def ids_of(out) -> set[str]:
    return {s.request_id for s in out.sequences}


def test_a_failed_step_is_bisected_down_to_its_cause():
    sched = make_scheduler(num_slots=8, max_num_seqs=8, max_num_batched_tokens=64)
    requests = [make_request(f"r{i}", 5, max_tokens=12) for i in range(8)]
    for request in requests:
        sched.add_request(request)
    for _ in range(3):
        step(sched)
    # r5 breaks every step it is in once it decodes; a rebuild (from position 0) passes, its next step does not.
    num_failed, errors = run_with_faults(
        sched, lambda out: any(s.request_id == "r5" and s.start_position > 5 for s in out.sequences)
    )
    assert errors == ["r5"] and requests[5].status is RequestStatus.FINISHED_ERROR
    assert num_failed <= 2 + 3  # the batch, the whole group again, then one failed group per halving of 8
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in requests if r.request_id != "r5")
    assert all(len(r.output_token_ids) == 12 for r in requests if r.request_id != "r5")
    assert sched.allocator.num_used == 0 and sched.num_suspects == 0


def test_quarantine_rebuilds_from_the_first_token_and_runs_nothing_else():
    sched = make_scheduler(num_slots=4, max_num_seqs=4, max_num_batched_tokens=16)
    a, b, c = make_request("a", 6, max_tokens=8), make_request("b", 3, max_tokens=8), make_request("c", 4)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    step(sched)
    out = sched.schedule()
    assert ids_of(out) == {"a", "b"}
    assert sched.recover(out) == []
    sched.add_request(c)  # arrives during the trouble: waits until the quarantine is over
    out = sched.schedule()
    assert out.is_quarantine and ids_of(out) == {"a", "b"}
    assert sorted(out.slots_to_reset) == sorted([a.slot_id, b.slot_id])
    # Rebuilt from position 0: the prompt and every token generated so far, then a sample.
    by_id = {s.request_id: s for s in out.sequences}
    assert by_id["a"].start_position == 0 and by_id["a"].token_ids == a.prompt_token_ids + a.output_token_ids
    assert by_id["a"].needs_sample and [r.request_id for r, _ in out.samples] == ["a", "b"]
    sched.update(out, StepResult({"a": 7, "b": 7}))
    out, _ = step(sched)  # the one more step each owes
    assert out.is_quarantine and ids_of(out) == {"a", "b"}
    out, _ = step(sched)
    assert not out.is_quarantine and ids_of(out) == {"a", "b", "c"}


def test_a_fault_that_needs_company_ends_after_max_failed_steps():
    sched = make_scheduler(num_slots=4, max_num_seqs=4, max_num_batched_tokens=16)
    for rid in ("a", "b"):
        sched.add_request(make_request(rid, 3, max_tokens=50))
    # Fails whenever a and b share a batched step, never in quarantine: no bisection can catch it.
    num_failed, errors = run_with_faults(sched, lambda out: not out.is_quarantine and ids_of(out) >= {"a", "b"})
    assert sorted(errors) == ["a", "b"] and num_failed == 3
    assert sched.allocator.num_used == 0 and sched.num_suspects == 0

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
    assert [(s.request.request_id, len(s.token_ids)) for s in out.sequences] == [("a", 1), ("b", 7)]
    assert out.num_batched_tokens == 8
    assert not out.sequences[1].needs_sample
    out, _ = step(sched)
    assert [(s.request.request_id, len(s.token_ids), s.start_position) for s in out.sequences] == [
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
    assert {s.request.request_id for s in out.sequences} == {"a", "b"}
    assert sorted(out.slots_to_reset) == [1, 2]
    assert sched.num_waiting == 1
    out, _ = step(sched)  # a and b finished at max_tokens=1 in the last update: c gets a freed slot
    assert [s.request.request_id for s in out.sequences] == ["c"]
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
    assert [s.request.request_id for s in out.sequences] == ["b"]
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
    assert sorted(s.request.request_id for s in out.sequences) == ["p", "p#1", "p#2"]
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
    sched = make_scheduler(max_waiting_requests=2)
    sched.add_request(make_request("a", 2))
    sched.add_request(make_request("b", 2))
    with pytest.raises(QueueFullError):
        sched.add_request(make_request("c", 2))


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

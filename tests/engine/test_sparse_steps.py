"""The scheduler's steps with sparse adapters, in plain data (no model): every running request runs every step
whatever its adapter; a step whose sequences all use one sparse adapter scatters it (SchedulerOutput.sparse_slot),
any other step keeps the base weights; distinct adapters running at once are bounded by the device adapter
slots, and a request waiting for a slot waits a bounded number of steps (engine/scheduler.py's docstring)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from linrec.engine.adapters import AdapterSlots
from linrec.engine.request import Request, RequestStatus
from linrec.engine.sampling_params import SamplingParams
from linrec.engine.scheduler import MAX_ADAPTER_WAIT_STEPS, MAX_SPARSE_PASSES, Scheduler, StepResult


@dataclass(frozen=True, eq=False)
class FakeSparse:
    """What the scheduler reads of a SparseWeights: its name and uid."""

    name: str
    uid: int


SPARSE = [FakeSparse(f"s{i}", 100 + i) for i in range(3)]


CREATED: dict[str, Request] = {}  # every request a test made, by id: the scheduler's output names them only


def make_request(rid: str, sparse: FakeSparse | None, max_tokens: int = 4, prompt_len: int = 3) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    request = CREATED[rid] = Request(rid, list(range(1, prompt_len + 1)), params, sparse=sparse)
    return request


def make_scheduler(num_slots: int = 8, budget: int = 64, adapter_slots: int = 4) -> Scheduler:
    return Scheduler(
        num_slots=num_slots,
        max_num_seqs=num_slots,
        max_num_batched_tokens=budget,
        max_waiting_requests=4096,
        adapter_slots=AdapterSlots(adapter_slots),
    )


def step(sched: Scheduler):
    out = sched.schedule()
    sched.update(out, StepResult({r.request_id: 7 for r, _ in out.samples}))
    return out


def adapters_of(out) -> set:
    return {CREATED[s.request_id].sparse for s in out.sequences}


def test_a_step_scatters_only_when_every_sequence_uses_that_adapter():
    sched = make_scheduler()
    for i in range(12):
        sched.add_request(make_request(f"r{i}", [None, *SPARSE][i % 4]))
    scattered = mixed = 0
    while sched.has_unfinished():
        out = step(sched)
        for seq in out.sequences:  # the sequence carries its adapter's device slot, and never a LoRA slot
            sparse = CREATED[seq.request_id].sparse
            assert seq.adapter_slot == -1
            assert seq.sparse_slot == (sched.adapter_slots.uids.index(sparse.uid) if sparse is not None else -1)
        if out.sparse_slot >= 0:  # base requests never run on an adapter's weights
            assert {s.sparse_slot for s in out.sequences} == {out.sparse_slot}
            scattered += 1
        else:
            mixed += len(adapters_of(out)) > 1
    assert mixed > 0 and sched.num_sparse_mixed_steps == mixed
    assert scattered == 0  # all twelve fit one batch: every step mixes


def test_one_adapters_requests_alone_run_scattered():
    sched = make_scheduler()
    for i in range(5):
        sched.add_request(make_request(f"r{i}", SPARSE[1]))
    while sched.has_unfinished():
        out = step(sched)
        assert out.sparse_slot == sched.adapter_slots.uids.index(SPARSE[1].uid)
    assert sched.num_sparse_mixed_steps == 0


def test_every_decoding_request_runs_every_step_and_adapter_waits_are_bounded():
    """Seeded random arrivals over the base and 3 sparse adapters with 2 device adapter slots: every decoding
    request is scheduled every step whatever the others' adapters (no request waits for another's weights),
    at most 2 distinct adapters run at once, and every request finishes."""
    rng = random.Random(0)
    sched = make_scheduler(num_slots=6, budget=24, adapter_slots=2)
    n, t, most_adapters = 0, 0, 0
    while n < 200 or sched.has_unfinished():
        t += 1
        if n < 200:
            for _ in range(rng.choice([0, 0, 1, 2, 3])):
                sched.add_request(make_request(f"r{n}", rng.choice([None, None, *SPARSE]), rng.randint(1, 12)))
                n += 1
        decoding = {r.request_id for r in sched.running if not r.is_prefilling}
        out = step(sched)
        assert decoding <= {s.request_id for s in out.sequences}
        running = {r.sparse.uid for r in sched.running if r.sparse is not None}
        most_adapters = max(most_adapters, len(running))
        assert len(running) <= 2
        assert t < 20000, "the simulation did not finish"
    assert not sched.requests
    assert most_adapters == 2 and sched.num_sparse_mixed_steps > 0
    print(f"{t} steps, {sched.num_sparse_mixed_steps} mixed; adapter waits bounded by {MAX_ADAPTER_WAIT_STEPS}")


def test_a_request_waiting_for_an_adapter_slot_is_admitted_within_the_bound():
    """One adapter slot, a steady stream on adapter s0 and one request on s1 behind the first: the s1 request
    waits while s0's requests pin the slot, and after MAX_ADAPTER_WAIT_STEPS nobody behind it is admitted, so
    the slot drains and it runs."""
    sched = make_scheduler(num_slots=4, adapter_slots=1)
    sched.add_request(make_request("first", SPARSE[0], max_tokens=3))
    admitted_at = admission_step(sched, make_request("other", SPARSE[1], max_tokens=3), stream_tokens=3)
    assert MAX_ADAPTER_WAIT_STEPS < admitted_at <= MAX_ADAPTER_WAIT_STEPS + 2 * 4, admitted_at


def admission_step(sched: Scheduler, request: Request, stream_tokens: int) -> int:
    """Queue `request`, then step while a new request on adapter s0 (`stream_tokens` long) arrives every step
    for 200 steps; returns the step at which `request` was admitted."""
    sched.add_request(request)
    t, admitted_at = 0, None
    while sched.has_unfinished():
        t += 1
        if t < 200:
            sched.add_request(make_request(f"s0-{t}", SPARSE[0], max_tokens=stream_tokens))
        step(sched)
        queued = sched.requests.get(request.request_id)
        if admitted_at is None and (queued is None or queued.status is RequestStatus.RUNNING):
            admitted_at = t
        assert t < 1000
    print(f"{request.request_id} was admitted at step {admitted_at}")
    assert admitted_at is not None
    return admitted_at


def test_without_sparse_requests_every_step_keeps_the_base_weights():
    sched = make_scheduler()
    for i in range(5):
        sched.add_request(make_request(f"r{i}", None))
    while sched.has_unfinished():
        out = step(sched)
        assert out.sparse_slot == -1
    assert sched.num_sparse_mixed_steps == 0


def test_an_aborted_sparse_request_releases_its_adapter_slot():
    sched = make_scheduler(adapter_slots=1)
    sched.add_request(make_request("a", SPARSE[0], max_tokens=100))
    sched.add_request(make_request("b", None, max_tokens=3))
    step(sched)
    sched.abort(["a"])
    assert sched.adapter_slots.pins == [0]
    sched.add_request(make_request("c", SPARSE[1], max_tokens=3))
    while sched.has_unfinished():
        out = step(sched)
        assert all(s.request_id != "a" for s in out.sequences)
    assert sched.adapter_slots.uids == [SPARSE[1].uid]


def test_a_deep_queue_runs_in_whole_batches_of_one_adapter():
    """32 requests queued at once, round-robin over the base and 3 sparse adapters, 8 slots: weight affinity
    fills the slots with one group's requests at a time, so most steps scatter one adapter (or run the base
    alone) instead of mixing four."""
    sched = make_scheduler(num_slots=8)
    for i in range(32):
        sched.add_request(make_request(f"r{i}", SPARSE[i % 3] if i % 4 else None, max_tokens=6))
    steps = pure = 0
    while sched.has_unfinished():
        out = step(sched)
        steps += 1
        pure += len(adapters_of(out)) == 1
    print(f"{pure} of {steps} steps on one group's weights, {sched.num_sparse_mixed_steps} mixed")
    assert pure >= 0.9 * steps


def test_a_request_passed_over_for_affinity_is_admitted_within_the_bound():
    """Two slots: a long request on adapter s0 in one, a steady stream of short s0 requests through the other,
    and one base request queued behind the first: affinity prefers s0's newcomers, and after MAX_SPARSE_PASSES
    passes the base request is admitted in queue order."""
    sched = make_scheduler(num_slots=2)
    sched.add_request(make_request("first", SPARSE[0], max_tokens=200))
    admitted_at = admission_step(sched, make_request("base", None, max_tokens=2), stream_tokens=2)
    assert MAX_SPARSE_PASSES <= admitted_at <= 3 * MAX_SPARSE_PASSES, admitted_at

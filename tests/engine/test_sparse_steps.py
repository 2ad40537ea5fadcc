"""The scheduler's weight groups in plain data (no model): one sparse adapter's requests run alone in a step,
grouped under load, and every request's wait is bounded (engine/scheduler.py's docstring states the policy)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from linrec.engine.request import Request, RequestStatus
from linrec.engine.sampling_params import SamplingParams
from linrec.engine.scheduler import MAX_SPARSE_WAIT_STEPS, Scheduler, StepResult


@dataclass(frozen=True, eq=False)
class FakeSparse:
    """What the scheduler reads of a SparseWeights: its identity and uid."""

    name: str
    uid: int


SPARSE = [FakeSparse(f"s{i}", 100 + i) for i in range(3)]


def make_request(rid: str, sparse: FakeSparse | None, max_tokens: int = 4, prompt_len: int = 3) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, list(range(1, prompt_len + 1)), params, sparse=sparse)


def make_scheduler(num_slots: int = 8, budget: int = 64) -> Scheduler:
    return Scheduler(
        num_slots=num_slots, max_num_seqs=num_slots, max_num_batched_tokens=budget, max_waiting_requests=4096
    )


def step(sched: Scheduler):
    out = sched.schedule()
    sched.update(out, StepResult({r.request_id: 7 for r, _ in out.samples}))
    return out


def groups_of(out) -> set:
    return {s.request.sparse.uid if s.request.sparse is not None else None for s in out.sequences}


def test_one_sparse_adapter_per_step_and_base_requests_never_share_it():
    sched = make_scheduler()
    for i in range(12):
        sched.add_request(make_request(f"r{i}", [None, *SPARSE][i % 4]))
    while sched.has_unfinished():
        out = step(sched)
        if out.sequences:
            assert len(groups_of(out)) == 1, groups_of(out)  # base requests never run on an adapter's weights
            expected = out.sequences[0].request.sparse
            assert out.sparse is expected  # the runner scatters exactly the step's adapter (None: base)


def test_a_deep_queue_runs_in_whole_groups():
    """All requests queued at once, round-robin over 4 sparse adapters, 8 slots: the slots fill with one
    adapter's requests at a time, so steps run full batches instead of a quarter of one."""
    sched = make_scheduler(num_slots=8)
    for i in range(32):
        sched.add_request(make_request(f"r{i}", SPARSE[i % 3] if i % 4 else None, max_tokens=6))
    sizes = []
    while sched.has_unfinished():
        out = step(sched)
        sizes.append(len(out.sequences))
    assert sched.num_group_switches <= 6, sched.num_group_switches  # 4 groups, each drained once or so
    assert sum(sizes) / len(sizes) >= 6, sizes


def test_every_request_waits_a_bounded_number_of_steps_under_random_arrivals():
    """Seeded random arrivals over the base and 3 sparse adapters, lengths and budgets varied: every running
    request is scheduled again within MAX_SPARSE_WAIT_STEPS + G steps (G weight groups), every request
    finishes, and the oldest waiting request is admitted within the bound once a slot is free (behind it, the
    queue is as long as the arrivals make it: that wait no policy bounds)."""
    rng = random.Random(0)
    sched = make_scheduler(num_slots=6, budget=24)
    last: dict[str, int] = {}
    max_gap, n, t = 0, 0, 0
    free_since: dict[str, int] = {}  # the oldest waiting request -> first step it was oldest with a slot free
    max_admission_wait = 0
    while n < 200 or sched.has_unfinished():
        t += 1
        if n < 200:
            for _ in range(rng.choice([0, 0, 1, 2, 3])):
                group = rng.choice([None, None, *SPARSE])
                sched.add_request(make_request(f"r{n}", group, rng.randint(1, 12), rng.randint(1, 30)))
                n += 1
        if sched.num_free_places and sched.waiting:  # arrival order: the head is the oldest
            free_since.setdefault(sched.waiting[0].request_id, t)
        out = step(sched)
        assert len(groups_of(out)) <= 1
        for seq in out.sequences:
            rid = seq.request.request_id
            if rid in last:
                max_gap = max(max_gap, t - last[rid])
            if rid in free_since:
                max_admission_wait = max(max_admission_wait, t - free_since.pop(rid))
            last[rid] = t
        for rid in [r for r in last if r not in sched.requests]:
            del last[rid]
        assert t < 20000, "the simulation did not finish"
    groups = 1 + len(SPARSE)
    print(
        f"max gap {max_gap} steps, head admission {max_admission_wait}, {sched.num_group_switches} switches, {t} steps"
    )
    assert max_gap <= MAX_SPARSE_WAIT_STEPS + groups, max_gap
    assert max_admission_wait <= MAX_SPARSE_WAIT_STEPS + groups, max_admission_wait
    assert not sched.requests
    assert sched.num_group_switches > 10  # the mix did make it switch


def test_without_sparse_requests_every_step_is_the_base_group():
    sched = make_scheduler()
    for i in range(5):
        sched.add_request(make_request(f"r{i}", None))
    while sched.has_unfinished():
        out = step(sched)
        assert out.sparse is None and sched.active_group is None
    assert sched.num_group_switches == 0


def test_an_aborted_sparse_request_leaves_no_group_behind():
    sched = make_scheduler()
    sched.add_request(make_request("a", SPARSE[0], max_tokens=100))
    sched.add_request(make_request("b", None, max_tokens=3))
    step(sched)
    sched.abort(["a"])
    assert sched.requests["b"].status in (RequestStatus.WAITING, RequestStatus.RUNNING)
    while sched.has_unfinished():
        out = step(sched)
        assert out.sparse is None
    assert sched._num_sparse == 0

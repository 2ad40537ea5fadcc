"""The scheduler's LoRA device slots in plain data (no model, no tensors): admission once a slot holds the
adapter, pins to the end, LRU reuse of unpinned slots, loads planned for the runner, and the bounded wait."""

from __future__ import annotations

from pathlib import Path

import pytest

from linrec.engine.adapters import AdapterSlots
from linrec.engine.request import Request
from linrec.engine.sampling_params import SamplingParams
from linrec.engine.scheduler import MAX_ADAPTER_WAIT_STEPS, Scheduler, StepResult
from linrec.models.lora import LoraWeights

EOS = 0


def adapter(name: str, uid: int) -> LoraWeights:
    return LoraWeights(name=name, path=Path(name), rank=4, modules={}, uid=uid)


def make_request(rid: str, lora: LoraWeights | None, max_tokens: int = 3, n: int = 1) -> Request:
    params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True)
    parent = Request(rid, [1, 2, 3], params, lora=lora)
    parent.children = [
        Request(f"{rid}#{i}", [1, 2, 3], params, sample_index=i, parent_id=rid, lora=lora) for i in range(1, n)
    ]
    return parent


def make_scheduler(num_adapter_slots: int, num_slots: int = 8) -> Scheduler:
    return Scheduler(
        num_slots=num_slots,
        max_num_seqs=num_slots,
        max_num_batched_tokens=64,
        max_waiting_requests=64,
        eos_token_ids=(EOS,),
        adapter_slots=AdapterSlots(num_adapter_slots),
    )


def step(sched: Scheduler):
    out = sched.schedule()
    sched.update(out, StepResult({r.request_id: 7 for r, _ in out.samples}))
    return out


def test_slots_pin_until_the_end_and_are_reused_least_recently_used_first():
    slots = AdapterSlots(2)
    a, b, c = adapter("a", 1), adapter("b", 2), adapter("c", 3)
    assert slots.acquire(a) == (0, True)
    assert slots.acquire(a, count=2) == (0, False)  # resident: no load
    assert slots.acquire(b) == (1, True)
    assert slots.acquire(c) is None and not slots.can_acquire(c)  # both pinned
    slots.release(1)
    assert slots.running_names() == ["a"]
    assert slots.acquire(c) == (1, True)  # b's slot: the only unpinned one
    for _ in range(3):
        slots.release(0)
    slots.release(1)
    assert slots.acquire(b) == (0, True)  # a was used before c: a's slot goes
    with pytest.raises(ValueError, match="released more often"):
        for _ in range(2):
            slots.release(1)


def test_requests_wait_for_a_slot_and_the_runner_gets_each_load_once():
    sched = make_scheduler(num_adapter_slots=1)
    a, b = adapter("a", 1), adapter("b", 2)
    for rid, lora in (("a1", a), ("b1", b), ("a2", a), ("base", None)):
        sched.add_request(make_request(rid, lora))
    out = step(sched)
    # b1 waits (the one slot holds a); a2 and the base request are admitted past it
    assert [s.request_id for s in out.sequences] == ["a1", "a2", "base"]
    assert [(slot, w.name) for slot, w in out.adapter_loads] == [(0, "a")]
    assert [s.adapter_slot for s in out.sequences] == [0, 0, -1]
    assert sched.waiting_adapters() == ["b"] and sched.running_adapters() == ["a"]
    while any(r.request_id == "a1" for r in sched.running):
        out = step(sched)
    # a1 and a2 finished together: the slot is free, b1 runs with b loaded into it
    out = step(sched)
    assert [s.request_id for s in out.sequences] == ["b1"]
    assert [(slot, w.name) for slot, w in out.adapter_loads] == [(0, "b")]
    assert sched.running_adapters() == ["b"]


def test_children_pin_the_slot_and_an_abort_releases_it():
    sched = make_scheduler(num_adapter_slots=1)
    a = adapter("a", 1)
    sched.add_request(make_request("p", a, n=3))
    step(sched)
    assert sched.adapter_slots.pins == [3]  # the parent and its two children
    sched.abort(["p", "p#1", "p#2"])
    assert sched.adapter_slots.pins == [0] and sched.running_adapters() == []


def test_a_request_waiting_for_a_slot_stops_admission_behind_it_after_a_bounded_wait():
    """A steady stream on the resident adapter would otherwise keep the only slot pinned forever."""
    sched = make_scheduler(num_adapter_slots=1, num_slots=64)
    a, b = adapter("a", 1), adapter("b", 2)
    sched.add_request(make_request("a0", a, max_tokens=1000))
    step(sched)
    sched.add_request(make_request("b0", b))
    admitted_behind = 0
    for i in range(MAX_ADAPTER_WAIT_STEPS + 8):
        sched.add_request(make_request(f"a{i + 1}", a, max_tokens=1000))
        out = step(sched)
        admitted_behind += sum(1 for s in out.sequences if s.start_position == 0 and s.request_id != "b0")
    assert admitted_behind == MAX_ADAPTER_WAIT_STEPS  # admitted while b0's wait was within its bound, then no more
    assert any(r.request_id == "b0" for r in sched.waiting)

"""StatePool accounting, reset and fork copies, on a real model's state spec."""

from __future__ import annotations

import pytest
import torch

from linrec.engine.state_pool import RowAllocator, StatePool, num_slots_for_budget
from linrec.models.loader import load_model


@pytest.mark.parametrize("family", ["liger_gla", "mamba2"])
def test_pool_fork_copy_and_reset(demo_model_dir, family):
    model = load_model(demo_model_dir(family))
    pool = StatePool(model, num_slots=4, device=torch.device("cpu"))
    for layer in pool.layers:
        for tensor in layer.values():
            tensor.copy_(torch.randn_like(tensor, dtype=torch.float32).to(tensor.dtype))
    before = [{k: t.clone() for k, t in layer.items()} for layer in pool.layers]
    pool.copy(2, [1, 4])
    for layer, old in zip(pool.layers, before):
        for name, tensor in layer.items():
            assert torch.equal(tensor[1], old[name][2]) and torch.equal(tensor[4], old[name][2])
            assert torch.equal(tensor[3], old[name][3]) and torch.equal(tensor[2], old[name][2])
    pool.reset([3])
    assert all(layer[name][3].abs().sum() == 0 for layer in pool.layers for name in layer)
    assert pool.total_bytes == (pool.num_slots + 1) * model.state_bytes_per_request()


def test_budget_gives_slots_from_state_size_only():
    assert num_slots_for_budget(10_000, 1_000, torch.device("cpu")) == 10
    assert num_slots_for_budget(0.5, 1_000, torch.device("cpu")) > 1
    with pytest.raises(ValueError, match="holds no request"):
        num_slots_for_budget(999, 1_000, torch.device("cpu"))
    with pytest.raises(ValueError, match="fraction"):
        num_slots_for_budget(1.5, 1_000, torch.device("cpu"))


def test_allocator_hands_out_each_slot_once():
    alloc = RowAllocator(3)
    slots = [alloc.allocate() for _ in range(3)]
    assert sorted(slots) == [1, 2, 3] and alloc.num_free == 0
    with pytest.raises(RuntimeError):
        alloc.allocate()
    alloc.free(slots[0])
    with pytest.raises(RuntimeError):
        alloc.free(slots[0])
    assert alloc.allocate() == slots[0]


def test_routed_rows_follow_the_route_and_leave_skipped_rows_to_others():
    alloc = RowAllocator(2, num_layers=4)
    first, second = alloc.allocate_route((1, 1, 0, 0))
    assert second == (0, 0, 0, 0) and first[2:] == (0, 0) and first[0] == first[1] > 0
    assert alloc.num_rows_used == 2 and alloc.num_free == 1  # the other row id is whole: a slot for anyone
    # The complementary route takes the rows the first one left in layers 2 and 3, and no whole slot.
    other, _ = alloc.allocate_route((0, 0, 1, 1))
    assert other == (0, 0, first[0], first[0]) and alloc.num_free == 1
    assert not alloc.can_allocate_route((2, 1, 1, 1))  # layer 0 has one free row, a repeat needs two
    slot = alloc.allocate()
    assert slot not in first and alloc.num_free == 0 and alloc.num_rows_used == 8
    assert not alloc.can_allocate_route((0, 0, 0, 1)) and alloc.num_used == 3
    alloc.free(first)
    assert alloc.num_free == 0 and alloc.can_allocate_route((1, 1, 0, 0))  # layers 2, 3 of that row: still held
    alloc.free(other)
    alloc.free(slot)
    assert alloc.num_free == 2 and alloc.num_rows_used == 0 and alloc.num_used == 0
    first, second = alloc.allocate_route((2, 1, 2, 0))
    assert first[0] != second[0] > 0 and first[2] != second[2] > 0 and second[1] == second[3] == 0
    alloc.release(tuple(r if layer == 2 else 0 for layer, r in enumerate(second)))  # a decided route keeps less
    assert alloc.num_rows_used == 4
    with pytest.raises(RuntimeError, match="not allocated"):
        alloc.release((0, 0, second[2], 0))
    with pytest.raises(ValueError, match=r"expected 4 per-layer row counts in \{0, 1, 2\}, got \[1, 3\]"):
        alloc.can_allocate_route((1, 3))


def test_pool_copies_and_resets_a_routed_requests_rows_layer_by_layer(demo_model_dir):
    model = load_model(demo_model_dir("liger_gla"))
    pool = StatePool(model, num_slots=3, device=torch.device("cpu"), num_snapshot_rows=1)
    num_layers = len(pool.layers)
    for layer in pool.layers:
        for tensor in layer.values():
            tensor.copy_(torch.randn_like(tensor, dtype=torch.float32).to(tensor.dtype))
    before = [{k: t.clone() for k, t in layer.items()} for layer in pool.layers]
    routed = tuple(2 if layer % 2 else 0 for layer in range(num_layers))  # odd layers in row 2, none in even ones
    snapshot = pool.snapshot_rows[0]
    pool.copy_rows([(routed, snapshot)])  # a save: only the layers it executes
    for index, (layer, old) in enumerate(zip(pool.layers, before)):
        for name, tensor in layer.items():
            expected = old[name][2] if index % 2 else old[name][snapshot]
            assert torch.equal(tensor[snapshot], expected)
    pool.reset([routed])
    for index, (layer, old) in enumerate(zip(pool.layers, before)):
        for name, tensor in layer.items():
            assert torch.equal(tensor[2], torch.zeros_like(tensor[2]) if index % 2 else old[name][2])
    pool.copy(1, [routed])  # a fork from a slot into a routed request's rows: the layers it executes
    for index, (layer, old) in enumerate(zip(pool.layers, before)):
        for name, tensor in layer.items():
            assert torch.equal(tensor[2], old[name][1] if index % 2 else old[name][2])

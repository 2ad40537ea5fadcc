"""StatePool accounting, reset and fork copies, on a real model's state spec."""

from __future__ import annotations

import pytest
import torch

from linrec.engine.state_pool import SlotAllocator, StatePool, num_slots_for_budget
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
    alloc = SlotAllocator(3)
    slots = [alloc.allocate() for _ in range(3)]
    assert sorted(slots) == [1, 2, 3] and alloc.num_free == 0
    with pytest.raises(RuntimeError):
        alloc.allocate()
    alloc.free(slots[0])
    with pytest.raises(RuntimeError):
        alloc.free(slots[0])
    assert alloc.allocate() == slots[0]

"""The state pool: one constant-size recurrent state per request, where a KV cache would be."""

from __future__ import annotations

import os

import torch

from linrec.models.base import CausalLM, LayerState


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on `device`: the CUDA allocator's view on a GPU, MemAvailable on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def num_slots_for_budget(state_memory: int | float, bytes_per_request: int, device: torch.device) -> int:
    """How many request states fit: `state_memory` is bytes (int) or a fraction of free memory (float).

    The answer depends only on the per-request state size, never on context length.
    """
    if isinstance(state_memory, float):
        if not 0.0 < state_memory <= 1.0:
            raise ValueError(f"expected state_memory as a fraction in (0, 1] or a byte count, got {state_memory}")
        budget = int(available_memory_bytes(device) * state_memory)
    else:
        budget = int(state_memory)
    num_slots = budget // bytes_per_request
    if num_slots < 1:
        raise ValueError(
            f"state_memory of {budget} bytes holds no request: one request's state takes {bytes_per_request} bytes"
        )
    return num_slots


class StatePool:
    """Owns every layer's state tensors, shaped [1 + num_slots + num_snapshot_rows, ...].

    Row 0 is the null slot; rows 1..num_slots are request slots; the rows after them hold prefix-cache
    snapshots, so slots and snapshots are one allocation from one memory budget and a hit or a save is
    a row-to-row copy inside the same tensors. The pool only stores and copies; which row belongs to
    whom is the SlotAllocator's and the PrefixCache's business.
    """

    def __init__(
        self,
        model: CausalLM,
        num_slots: int,
        device: torch.device,
        num_snapshot_rows: int = 0,
        num_lane_rows: int = 0,
    ):
        if num_slots < 1:
            raise ValueError(f"expected num_slots >= 1, got {num_slots}")
        if num_snapshot_rows < 0 or num_lane_rows < 0:
            raise ValueError(
                f"expected num_snapshot_rows, num_lane_rows >= 0, got {num_snapshot_rows}, {num_lane_rows}"
            )
        self.num_slots = num_slots
        self.num_snapshot_rows = num_snapshot_rows
        self.bytes_per_request = model.state_bytes_per_request()
        # Per layer: name -> [num_rows, *shape]; models read and write rows by slot id.
        self.layers: list[LayerState] = model.allocate_state(self.num_rows, device)
        # Second lanes (a repeated layer's second pass, docs/routing.md): per layer, rows 1..num_lane_rows of
        # tensors of their own, given out one layer at a time (engine/scheduler.py's LaneRows). Allocated at the
        # first repeat, so an engine whose requests never repeat a layer holds none.
        self.num_lane_rows = num_lane_rows
        self._model = model
        self._lanes: list[LayerState] | None = None

    @property
    def num_rows(self) -> int:
        return 1 + self.num_slots + self.num_snapshot_rows

    @property
    def snapshot_rows(self) -> list[int]:
        """Row ids reserved for prefix-cache snapshots."""
        return list(range(1 + self.num_slots, self.num_rows))

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    def reset(self, slot_ids: list[int]) -> None:
        """Zero every layer's state in these slots: a new owner never sees the last owner's state."""
        if not slot_ids:
            return
        index = torch.tensor(slot_ids, dtype=torch.int64, device=self._device)
        for layer in self.layers:
            for tensor in layer.values():
                tensor.index_fill_(0, index, 0)

    def copy(self, src_slot: int, dst_slots: list[int]) -> None:
        """Fork: copy every layer's state in src_slot into each of dst_slots."""
        if not dst_slots:
            return
        index = torch.tensor(dst_slots, dtype=torch.int64, device=self._device)
        for layer in self.layers:
            for tensor in layer.values():
                # The source row is cloned: index_copy_ refuses a source that aliases its destination.
                source = tensor[src_slot].clone().unsqueeze(0).expand(len(dst_slots), *tensor.shape[1:])
                tensor.index_copy_(0, index, source)

    def copy_rows(self, pairs: list[tuple[int, int]]) -> None:
        """Copy every layer's state row src -> dst for each (src, dst) pair (prefix loads and saves).

        All sources are read before any destination is written, so a pair may read a row another
        pair of the same call writes."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=self._device)
        dst = torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=self._device)
        if len(set(p[1] for p in pairs)) != len(pairs):
            raise ValueError(f"expected distinct destination rows, got {[p[1] for p in pairs]}")
        for layer in self.layers:
            for tensor in layer.values():
                tensor.index_copy_(0, dst, tensor.index_select(0, src))

    def lanes(self) -> list[LayerState]:
        """The second-lane state of every layer, [1 + num_lane_rows, ...] each (allocated, zeroed, at first use)."""
        if self._lanes is None:
            if not self.num_lane_rows:
                raise ValueError("expected second-lane rows to run a repeated layer (num_lane_rows is 0)")
            self._lanes = self._model.allocate_state(1 + self.num_lane_rows, self._device)
        return self._lanes

    @property
    def lane_bytes(self) -> int:
        """Bytes the second lanes hold now (0 until the first repeat)."""
        return sum(t.numel() * t.element_size() for layer in self._lanes or [] for t in layer.values())

    def reset_lanes(self, rows: list[tuple[int, int]]) -> None:
        """Zero second-lane rows, given as (layer, row) pairs: a new owner never sees the last owner's state."""
        if not rows:
            return
        lanes = self.lanes()
        for layer, row in rows:
            for tensor in lanes[layer].values():
                tensor[row].zero_()

    @property
    def _device(self) -> torch.device:
        return next(iter(self.layers[0].values())).device


class SlotAllocator:
    """The free list of slots 1..num_slots. Held by the scheduler, the only code that allocates."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        # Lowest ids first, so a small batch touches a compact region of the pool.
        self._free: list[int] = list(range(num_slots, 0, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free state slot; the scheduler must check num_free before allocating")
        slot = self._free.pop()
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise RuntimeError(f"slot {slot} is not allocated")
        self._used.remove(slot)
        self._free.append(slot)


class LaneRows:
    """The free second-lane rows of each layer (rows 1..num_rows): a request that repeats layers {l, ...} holds one
    row in each of those layers' lanes, so a repeat costs one layer's state, not a whole slot."""

    def __init__(self, num_layers: int, num_rows: int):
        self.num_layers = num_layers
        self.num_rows = num_rows
        self._free: list[list[int]] = [list(range(num_rows, 0, -1)) for _ in range(num_layers)]

    def can_allocate(self, layers) -> bool:
        return all(self._free[layer] for layer in layers)

    def allocate(self, layers) -> dict[int, int]:
        """One free row in each of `layers` (check can_allocate first): {layer: row}."""
        if not self.can_allocate(layers):
            raise RuntimeError("no free second-lane row; the scheduler must check can_allocate first")
        return {layer: self._free[layer].pop() for layer in sorted(layers)}

    def free(self, rows: dict[int, int]) -> None:
        for layer, row in rows.items():
            self._free[layer].append(row)

    def num_free(self, layer: int) -> int:
        return len(self._free[layer])

    @property
    def num_used(self) -> int:
        """Rows held, summed over the layers."""
        return self.num_rows * self.num_layers - sum(len(free) for free in self._free)

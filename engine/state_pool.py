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


# A request's rows of the pool: one row in every layer (an int: its slot), or one per layer (a tuple; 0: none there).
Rows = int | tuple[int, ...]


def row_in_layer(rows: Rows, layer: int) -> int:
    """The row `rows` names in `layer` (0: none)."""
    return rows if isinstance(rows, int) else rows[layer]


class StatePool:
    """Owns every layer's state tensors, shaped [1 + num_slots + num_snapshot_rows, ...].

    Row 0 is the null slot; rows 1..num_slots are request rows; the rows after them hold prefix-cache
    snapshots, so requests and snapshots are one allocation from one memory budget and a hit or a save is
    a row-to-row copy inside the same tensors. A request without a layer route holds the same row (its slot)
    in every layer; a routed one holds rows layer by layer (RowAllocator), so its operations take Rows. The
    pool only stores and copies; which row belongs to whom is the RowAllocator's and the PrefixCache's
    business.
    """

    def __init__(
        self,
        model: CausalLM,
        num_slots: int,
        device: torch.device,
        num_snapshot_rows: int = 0,
        num_store_rows: int = 0,
    ):
        if num_slots < 1:
            raise ValueError(f"expected num_slots >= 1, got {num_slots}")
        if num_snapshot_rows < 0 or num_store_rows < 0:
            raise ValueError(
                f"expected num_snapshot_rows, num_store_rows >= 0, got {num_snapshot_rows}, {num_store_rows}"
            )
        self.num_slots = num_slots
        self.num_snapshot_rows = num_snapshot_rows
        self.num_store_rows = num_store_rows
        self.bytes_per_request = model.state_bytes_per_request()
        self.state_spec = model.state_spec()
        # Bytes of one row of each layer: what a routed request's state costs follows its route.
        self.layer_bytes = [sum(spec.num_bytes for spec in layer.values()) for layer in self.state_spec]
        # Per layer: name -> [num_rows, *shape]; models read and write rows by slot id.
        self.layers: list[LayerState] = model.allocate_state(self.num_rows, device)

    @property
    def num_rows(self) -> int:
        return 1 + self.num_slots + self.num_snapshot_rows + self.num_store_rows

    @property
    def snapshot_rows(self) -> list[int]:
        """Row ids reserved for prefix-cache snapshots."""
        return list(range(1 + self.num_slots, 1 + self.num_slots + self.num_snapshot_rows))

    @property
    def store_rows(self) -> list[int]:
        """Row ids reserved for stored states' device tier (engine/state_store.py)."""
        return list(range(1 + self.num_slots + self.num_snapshot_rows, self.num_rows))

    def read(self, rows: Rows) -> list[dict[str, torch.Tensor]]:
        """CPU copies of the state in `rows`: per layer, name -> tensor (an empty dict where rows name none)."""
        out = []
        for layer, tensors in enumerate(self.layers):
            row = row_in_layer(rows, layer)
            out.append({name: t[row].to("cpu", copy=True) for name, t in tensors.items()} if row else {})
        return out

    def write(self, rows: Rows, state: list[dict[str, torch.Tensor]]) -> None:
        """Copy a state read by read() (or imported) into `rows`, in each layer where both have one."""
        for layer, tensors in enumerate(self.layers):
            row = row_in_layer(rows, layer)
            if row and state[layer]:
                for name, tensor in tensors.items():
                    tensor[row].copy_(state[layer][name], non_blocking=False)

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    def reset(self, rows: list[Rows]) -> None:
        """Zero every layer's state in these rows: a new owner never sees the last owner's state."""
        if not rows:
            return
        for layer, index in self._per_layer([(r,) for r in rows]):
            for tensor in self.layers[layer].values():
                tensor.index_fill_(0, index[0], 0)

    def copy(self, src: Rows, dsts: list[Rows]) -> None:
        """Fork: copy every layer's state in src into each of dsts."""
        self.copy_rows([(src, dst) for dst in dsts])

    def copy_rows(self, pairs: list[tuple[Rows, Rows]]) -> None:
        """Copy state src -> dst for each (src, dst) pair (prefix loads and saves, forks), in each layer where both
        name a row.

        All sources are read before any destination is written, so a pair may read a row another
        pair of the same call writes."""
        if not pairs:
            return
        for layer, (src, dst) in self._per_layer(pairs):
            for tensor in self.layers[layer].values():
                tensor.index_copy_(0, dst, tensor.index_select(0, src))

    def _per_layer(self, items: list[tuple[Rows, ...]]):
        """(layer, index tensors) for each layer that rows of `items` name, an item counting in a layer where all
        its Rows name a row. Layers with the same rows share their tensors: slots alone build them once."""
        width = len(items[0])
        built: dict[tuple, tuple[torch.Tensor, ...]] = {}
        out = []
        for layer in range(len(self.layers)):
            kept = tuple(item for item in (tuple(row_in_layer(r, layer) for r in it) for it in items) if all(item))
            if not kept:
                continue
            if kept not in built:
                columns = list(zip(*kept))
                if width == 2 and len(set(columns[1])) != len(kept):
                    raise ValueError(f"expected distinct destination rows in layer {layer}, got {list(columns[1])}")
                built[kept] = tuple(torch.tensor(c, dtype=torch.int64, device=self._device) for c in columns)
            out.append((layer, built[kept]))
        return out

    @property
    def _device(self) -> torch.device:
        return next(iter(self.layers[0].values())).device


class RowAllocator:
    """The free request rows 1..num_rows of each layer. Held by the scheduler, the only code that allocates.

    A request without a route holds one row id in every layer (allocate: its slot, what the kernels' slot ids
    and CUDA graphs index). A routed one (allocate_route) holds a row in each layer it executes and a second in
    each it repeats, wherever they are free, and none in a layer it skips: its state memory follows its route,
    and a row one request skips is another's. Routed requests take rows that are already partly held first, so
    whole slots stay free for requests without a route.
    """

    def __init__(self, num_rows: int, num_layers: int = 1):
        if num_rows < 1 or num_layers < 1:
            raise ValueError(f"expected num_rows, num_layers >= 1, got {num_rows}, {num_layers}")
        self.num_rows = num_rows
        self.num_layers = num_layers
        self._free: list[set[int]] = [set(range(1, num_rows + 1)) for _ in range(num_layers)]
        self._uniform: set[int] = set(range(1, num_rows + 1))  # free in every layer
        self._layers_held = [0] * (num_rows + 1)  # per row id, the layers it is held in
        self.num_used = 0  # requests holding rows

    @property
    def num_slots(self) -> int:
        return self.num_rows

    @property
    def num_free(self) -> int:
        """Row ids free in every layer: requests without a route that could start now."""
        return len(self._uniform)

    @property
    def num_rows_used(self) -> int:
        """Rows held, summed over the layers."""
        return self.num_rows * self.num_layers - sum(len(free) for free in self._free)

    def rows_used(self, layer: int) -> int:
        return self.num_rows - len(self._free[layer])

    def allocate(self) -> int:
        """One row id free in every layer, lowest first (a small batch touches a compact region of the pool)."""
        if not self._uniform:
            raise RuntimeError("no free state slot; the scheduler must check num_free before allocating")
        slot = min(self._uniform)
        for layer in range(self.num_layers):
            self._take(layer, slot)
        self.num_used += 1
        return slot

    def can_allocate_route(self, counts: tuple[int, ...], times: int = 1) -> bool:
        """Whether `times` requests with these per-layer row counts (0, 1 or 2) fit now."""
        self._check(counts)
        return all(len(free) >= count * times for free, count in zip(self._free, counts))

    def allocate_route(self, counts: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Rows for per-layer counts (check can_allocate_route first): (first-lane row of each layer, second-lane
        row of each layer), 0 where the count gives none."""
        if not self.can_allocate_route(counts):
            raise RuntimeError("no free state row; the scheduler must check can_allocate_route first")
        first, second = [0] * self.num_layers, [0] * self.num_layers
        for layer, count in enumerate(counts):
            for lane in (first, second)[:count]:
                free = self._free[layer]
                partly = free - self._uniform
                lane[layer] = max(partly) if partly else max(free)
                self._take(layer, lane[layer])
        self.num_used += 1
        return tuple(first), tuple(second)

    def free(self, rows: Rows, *more: Rows) -> None:
        """A request gives back everything it holds: its rows (and a second lane's)."""
        self.release(rows, *more)
        self.num_used -= 1

    def release(self, *rows: Rows) -> None:
        """Give back rows a request holds and keeps going without (a decided route's unused ones)."""
        for held in rows:
            for layer in range(self.num_layers):
                row = row_in_layer(held, layer)
                if row:
                    if row in self._free[layer]:
                        raise RuntimeError(f"row {row} of layer {layer} is not allocated")
                    self._free[layer].add(row)
                    self._layers_held[row] -= 1
                    if not self._layers_held[row]:
                        self._uniform.add(row)

    def _take(self, layer: int, row: int) -> None:
        self._free[layer].remove(row)
        self._layers_held[row] += 1
        self._uniform.discard(row)

    def _check(self, counts: tuple[int, ...]) -> None:
        if len(counts) != self.num_layers or any(c not in (0, 1, 2) for c in counts):
            raise ValueError(f"expected {self.num_layers} per-layer row counts in {{0, 1, 2}}, got {list(counts)}")

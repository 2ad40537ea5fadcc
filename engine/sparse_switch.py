"""Sparse adapters (SHiRA) switched in place: scattered into the live projection weights, restored bit for bit.

Activating adapter X reads the weights' current values at X's indices (saving them), then writes
(saved + delta) there, rounded once to the weights' dtype: what merging X computes (peft's merge_and_unload),
touching nnz elements and copying no weight matrix. Deactivating writes the saved values back, so every base
weight is bit-identical afterwards whatever the dtype (`W - delta` after `W + delta` is not, in bf16).
The weights change in place, so CUDA graphs captured over them replay the active adapter's weights.

The runner owns one SparseSwitch and calls `switch_to` with each step's weight group (the scheduler runs one
group a step). Deltas are copied to the device once and kept for the last `max_resident` adapters (LRU); the
host copies stay in the engine's adapter registry.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from linrec.models.layers import Projection


class SparseSwitch:
    def __init__(self, projections: dict[str, Projection], device: torch.device, max_resident: int):
        if max_resident < 1:
            raise ValueError(f"expected max_resident >= 1, got {max_resident}")
        self.projections = projections
        self.device = device
        self.max_resident = max_resident
        self.active = None  # the SparseWeights scattered now (None: the base weights)
        self.num_switches = 0  # activations and deactivations, for metrics and benches
        # (weight viewed flat, indices [nnz], saved original values [nnz]) of the active adapter, per module
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # uid -> {module: (indices, delta)} on the device, least recently used first
        self._resident: OrderedDict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()

    @torch.no_grad()
    def switch_to(self, weights) -> None:
        """Make `weights` (a SparseWeights, or None for the base) the scattered adapter; no-op when it already is."""
        if weights is self.active or (
            weights is not None and self.active is not None and weights.uid == self.active.uid
        ):
            return
        if self.active is not None:
            self._restore()
        if weights is not None:
            self._scatter(weights)

    def _scatter(self, weights) -> None:
        for name, (indices, delta) in self._on_device(weights).items():
            flat = self.projections[name].weight.data.view(-1)  # nn.Linear weights are contiguous
            saved = flat.index_select(0, indices)
            flat.index_copy_(0, indices, (saved.float() + delta).to(flat.dtype))
            self._saved.append((flat, indices, saved))
        self.active = weights
        self.num_switches += 1

    def _restore(self) -> None:
        for flat, indices, saved in reversed(self._saved):
            flat.index_copy_(0, indices, saved)
        self._saved.clear()
        self.active = None
        self.num_switches += 1

    def _on_device(self, weights) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        resident = self._resident.get(weights.uid)
        if resident is None:
            unknown = [name for name in weights.modules if name not in self.projections]
            if unknown:
                raise ValueError(f"sparse adapter {weights.name!r} targets {unknown[0]!r}, not a projection here")
            resident = {
                name: (indices.to(self.device, torch.int64), delta.to(self.device, torch.float32))
                for name, (indices, delta) in weights.modules.items()
            }
            self._resident[weights.uid] = resident
            while len(self._resident) > self.max_resident:
                self._resident.popitem(last=False)
        self._resident.move_to_end(weights.uid)
        return resident

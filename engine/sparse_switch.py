"""Sparse adapters (SHiRA) on the device: scattered into the live projection weights for a step of one adapter's
requests and restored bit for bit, or added per token in a step that mixes them with others.

Activating adapter X reads the weights' current values at X's indices (saving them), then writes
(saved + delta) there, rounded once to the weights' dtype: what merging X computes (peft's merge_and_unload),
touching nnz elements and copying no weight matrix. Deactivating writes the saved values back, so every base
weight is bit-identical afterwards whatever the dtype (`W - delta` after `W + delta` is not, in bf16).
The weights change in place, so CUDA graphs captured over them replay the active adapter's weights.

For a step that mixes X's requests with others, the weights stay the base's and `addon(slot)` gives X's delta
per projection for the per-token add-on (kernels/sparse): the difference between the weight X's scatter writes
and the base weight, in fp32, so both paths apply the same merged weights.

Sparse adapters live in the engine's device adapter slots, beside LoRA's (the scheduler pins a slot for each
running adapter of either kind): the runner copies an adapter's entries into its slot with `load`, scatters
the slot of a one-adapter step with `switch_to(slot)` and goes back to the base weights with `switch_to(-1)`.
"""

from __future__ import annotations

import torch

from linrec.kernels.sparse import sparse_csr
from linrec.models.layers import Projection

BASE = -1  # switch_to(BASE): the base weights, no adapter scattered


class SparseSwitch:
    def __init__(self, projections: dict[str, Projection], device: torch.device, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"expected num_slots >= 1, got {num_slots}")
        self.projections = projections
        self.device = device
        self.num_slots = num_slots
        self.active = BASE  # the slot whose adapter is scattered now (BASE: the base weights)
        self.num_switches = 0  # activations and deactivations, for metrics and benches
        # (weight viewed flat, indices [nnz], saved original values [nnz]) of the active adapter, per module
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # per slot: the SparseWeights it holds (None: none), {module: (indices, delta)} on the device, and the
        # add-on deltas {Projection: CSR [out, in] fp32}, built at the first mixed step that needs them
        self.weights: list[object | None] = [None] * num_slots
        self._entries: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(num_slots)]
        self._addon: list[dict[Projection, torch.Tensor] | None] = [None] * num_slots

    @torch.no_grad()
    def load(self, slot: int, weights) -> None:
        """Copy a SparseWeights' entries into device slot `slot` (its previous adapter, scattered or not, goes)."""
        unknown = [name for name in weights.modules if name not in self.projections]
        if unknown:
            raise ValueError(f"sparse adapter {weights.name!r} targets {unknown[0]!r}, not a projection here")
        self.clear(slot)
        self._entries[slot] = {
            name: (indices.to(self.device, torch.int64), delta.to(self.device, torch.float32))
            for name, (indices, delta) in weights.modules.items()
        }
        self.weights[slot] = weights

    def clear(self, slot: int) -> None:
        """Empty `slot` (a LoRA adapter takes it, or a sparse one replaces its adapter); restores it first if it
        is scattered."""
        if self.active == slot:
            self.switch_to(BASE)
        self.weights[slot] = None
        self._entries[slot] = {}
        self._addon[slot] = None

    @torch.no_grad()
    def switch_to(self, slot: int) -> None:
        """Make `slot`'s adapter the scattered one (BASE: the base weights); a no-op when it already is."""
        if slot == self.active:
            return
        if slot != BASE and self.weights[slot] is None:
            raise ValueError(f"expected a sparse adapter in device slot {slot} before scattering it")
        if self.active != BASE:
            self._restore()
        if slot != BASE:
            self._scatter(slot)

    @torch.no_grad()
    def addon(self, slot: int) -> dict[Projection, torch.Tensor]:
        """`slot`'s adapter as per-token deltas {Projection: CSR [out, in] fp32}: round(W + delta) - W at its
        entries, W the base weights (the weights must be the base's the first time: the runner restores them
        before a mixed step)."""
        deltas = self._addon[slot]
        if deltas is None:
            if self.weights[slot] is None:
                raise ValueError(f"expected a sparse adapter in device slot {slot} for the add-on")
            if self.active != BASE:
                raise RuntimeError("the add-on's deltas are taken against the base weights: restore them first")
            deltas = {}
            for name, (indices, delta) in self._entries[slot].items():
                projection = self.projections[name]
                base = projection.weight.data.view(-1).index_select(0, indices)
                merged = _merged(base, delta).float()
                deltas[projection] = sparse_csr(
                    indices, merged - base.float(), projection.out_features, projection.in_features
                )
            self._addon[slot] = deltas
        return deltas

    def _scatter(self, slot: int) -> None:
        for name, (indices, delta) in self._entries[slot].items():
            flat = self.projections[name].weight.data.view(-1)  # nn.Linear weights are contiguous
            saved = flat.index_select(0, indices)
            flat.index_copy_(0, indices, _merged(saved, delta))
            self._saved.append((flat, indices, saved))
        self.active = slot
        self.num_switches += 1

    def _restore(self) -> None:
        for flat, indices, saved in reversed(self._saved):
            flat.index_copy_(0, indices, saved)
        self._saved.clear()
        self.active = BASE
        self.num_switches += 1


def _merged(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """An adapter's merged weight values at its entries: base + delta in fp32, rounded once to the base's dtype
    (peft's merge_and_unload). The scatter writes them; the add-on adds their difference from the base."""
    return (base.float() + delta).to(base.dtype)

"""Sparse-adapter add-on for a step whose tokens use several weight groups: y[t] += D[g] x[t] for each token t
whose request runs sparse adapter g, D[g] an [out, in] delta with nnz entries, over the flat batch axis.

A step whose tokens all use one sparse adapter needs none of this: the engine scatters that adapter into the
weights (engine/sparse_switch.py). A step that mixes adapters, or an adapter with base or LoRA requests, keeps
the base weights and adds each adapter's delta to its tokens' outputs here, as LoRA adds its term.

Each delta is a CSR matrix [out, in] in fp32, so that a group of n tokens costs one sparse-dense product over
nnz x n entries (torch.sparse.mm: MKL on the CPU, cuSPARSE on CUDA). The delta is computed in fp32 and added
with one rounding, (y.float() + delta).to(y.dtype); a token without a sparse adapter keeps its row of y bit
for bit, and a step without one launches nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

# Per projection (any hashable key, the engine uses the Projection module), the group's delta: CSR [out, in] fp32.
Deltas = Mapping[Hashable, torch.Tensor]


def sparse_csr(flat_indices: torch.Tensor, values: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """CSR [out, in] fp32 from flat indices (row * in + col, unique, ascending) and their values [nnz]."""
    if flat_indices.dim() != 1 or values.shape != flat_indices.shape:
        raise ValueError(
            f"expected flat indices [nnz] and values [nnz], got {tuple(flat_indices.shape)} and {tuple(values.shape)}"
        )
    flat_indices = flat_indices.to(torch.int64)
    rows = torch.div(flat_indices, in_features, rounding_mode="floor")
    cols = flat_indices - rows * in_features
    counts = torch.bincount(rows, minlength=out_features)
    crow = torch.zeros(out_features + 1, dtype=torch.int64, device=flat_indices.device)
    crow[1:] = counts.cumsum(0)
    with warnings.catch_warnings():  # torch calls CSR "beta" once per process; the ops used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values.float(), (out_features, in_features), check_invariants=False)


@dataclass(frozen=True)
class SparseMapping:
    """The step's tokens in runs of one sparse adapter: (start, end) on the flat token axis and that adapter's
    deltas by projection. Consecutive sequences on one adapter form one run, so a batch ordered by adapter (the
    scheduler orders its decodes so) has one run per adapter and its rows are views: no gather, no scatter."""

    groups: tuple[tuple[int, int, Deltas], ...]
    num_tokens: int

    @classmethod
    def build(cls, seq_lens: Sequence[int], seq_deltas: Sequence[Deltas | None]) -> SparseMapping | None:
        """seq_deltas[b] is sequence b's adapter's deltas (one object per adapter: consecutive sequences sharing
        it form one run), or None for a sequence without a sparse adapter. None when no sequence has one. Runs
        are host ints: nothing goes to the device."""
        if len(seq_lens) != len(seq_deltas):
            raise ValueError(f"expected {len(seq_lens)} sequences' deltas, got {len(seq_deltas)}")
        runs: list[list] = []
        start = 0
        for n, deltas in zip(seq_lens, seq_deltas):
            if deltas is not None:
                if runs and runs[-1][2] is deltas and runs[-1][1] == start:
                    runs[-1][1] = start + n
                else:
                    runs.append([start, start + n, deltas])
            start += n
        if not runs:
            return None
        return cls(tuple((s, e, d) for s, e, d in runs), start)


def sparse_add_(y: torch.Tensor, x: torch.Tensor, key: Hashable, mapping: SparseMapping) -> None:
    """y [T, out] in place: (y.float() + D[g] x[t]).to(y.dtype) for each token t of each group g whose deltas
    hold `key`; other rows untouched. x [T, in]."""
    if x.shape[0] != mapping.num_tokens or y.shape[0] != mapping.num_tokens:
        raise ValueError(
            f"expected x and y over the mapping's {mapping.num_tokens} tokens, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    for start, end, deltas in mapping.groups:
        delta = deltas.get(key)
        if delta is None:  # this adapter leaves the projection alone
            continue
        if delta.shape != (y.shape[1], x.shape[1]):
            raise ValueError(f"expected a delta [{y.shape[1]}, {x.shape[1]}], got {tuple(delta.shape)}")
        d = torch.sparse.mm(delta, x[start:end].float().T.contiguous()).T  # [n, out] fp32
        rows = y[start:end]  # a view: updated in place
        if y.dtype == torch.float32:
            rows.add_(d)  # y + delta in fp32: the one rounding
        else:
            rows.copy_(rows.float() + d)

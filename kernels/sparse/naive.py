"""The fp32 reference of the sparse add-on: each token's dense delta, built from the adapter's (row, col, value)
entries, applied with one matmul per token."""

from __future__ import annotations

import torch


def dense_delta(flat_indices: torch.Tensor, values: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """[out, in] fp32: values at row * in + col, zeros elsewhere (repeated indices sum)."""
    delta = torch.zeros(out_features * in_features, dtype=torch.float32, device=values.device)
    delta.index_add_(0, flat_indices.to(torch.int64), values.float())
    return delta.view(out_features, in_features)


def sparse_add_reference(y: torch.Tensor, x: torch.Tensor, token_deltas: list[torch.Tensor | None]) -> torch.Tensor:
    """A new y: row t is (y[t].float() + token_deltas[t] @ x[t]).to(y.dtype), or y[t] itself where None."""
    out = y.clone()
    for t, delta in enumerate(token_deltas):
        if delta is not None:
            out[t] = (y[t].float() + delta @ x[t].float()).to(y.dtype)
    return out

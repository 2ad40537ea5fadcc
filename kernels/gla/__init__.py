"""Gated linear attention over the flat varlen batch, states read and written in the slot pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from linrec.kernels.gla.naive import naive_recurrent_gla

if TYPE_CHECKING:  # kernels take the batch layout by duck typing; they never import models at run time
    from linrec.models.batch import ForwardBatch


def gla_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    batch: ForwardBatch,
    scale: float = 1.0,
    backend: str = "torch",
) -> torch.Tensor:
    """q [T, H, K]; k, g [T, Hk, K]; v [T, Hk, V]; state [N, Hk, K, V] fp32, rows batch.slot_ids
    updated in place. Returns o [T, H, V] in v's dtype.
    """
    o = q.new_empty(q.shape[0], q.shape[1], v.shape[2], dtype=v.dtype)
    offsets = batch.cu_seqlens.tolist()
    for b, slot in enumerate(batch.slot_ids_host):
        lo, hi = offsets[b], offsets[b + 1]
        o_b, final = naive_recurrent_gla(q[lo:hi], k[lo:hi], v[lo:hi], g[lo:hi], state[slot], scale)
        o[lo:hi] = o_b.to(v.dtype)
        state[slot] = final
    return o

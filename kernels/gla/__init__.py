"""Gated linear attention over the flat varlen batch, states read and written in the slot pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from linrec.kernels.backend import can_run_triton_prefill
from linrec.kernels.gla.chunk import chunk_gla_varlen
from linrec.kernels.gla.decode import gla_decode
from linrec.kernels.gla.prefill import chunk_gla
from linrec.kernels.gla.step import gla_step
from linrec.kernels.varlen import split_single_tokens

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
    if backend not in ("torch", "triton"):
        raise ValueError(f"expected backend 'torch' or 'triton', got {backend!r}")
    if batch.is_decode:
        # triton: the in-place kernel over the pool (on the CPU it needs TRITON_INTERPRET=1)
        step = gla_decode if backend == "triton" else gla_step
        return step(q, k, v, g, state, batch.slot_ids, scale).to(v.dtype)
    o = q.new_empty(q.shape[0], q.shape[1], v.shape[2], dtype=v.dtype)
    split = split_single_tokens(batch)
    if split is not None:  # the 1-token sequences as one step, the longer ones chunked
        for sub, rows in split:
            o[rows] = gla_varlen(q[rows], k[rows], v[rows], g[rows], state, sub, scale, backend)
        return o
    # in place in the pool (on the CPU only under TRITON_INTERPRET=1); a toolchain known to miscompile
    # tensor-core kernels sends prefill to the torch path below
    if backend == "triton" and can_run_triton_prefill(q.device):
        return chunk_gla_varlen(q, k, v, g, state, batch, scale)
    lo = 0
    for n, slot in zip(batch.seq_lens, batch.slot_ids_host):
        hi = lo + n
        slot = max(slot, 0)  # a negative id is the null slot, as in the decode path
        o_b, final = chunk_gla(q[lo:hi], k[lo:hi], v[lo:hi], g[lo:hi], state[slot], scale)
        o[lo:hi] = o_b.to(v.dtype)
        state[slot] = final.to(state.dtype)
        lo = hi
    return o

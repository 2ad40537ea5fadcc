"""The gated delta rule over the flat varlen batch, states read and written in the slot pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from linrec.kernels.backend import can_run_triton_prefill
from linrec.kernels.gated_delta.decode import gated_delta_decode_triton
from linrec.kernels.gated_delta.naive import check_gva
from linrec.kernels.gated_delta.prefill import (
    chunk_gated_delta_varlen,
    fla_chunk_gated_delta_varlen,
    gated_delta_decode,
)
from linrec.kernels.varlen import split_single_tokens

if TYPE_CHECKING:  # kernels take the batch layout by duck typing; they never import models at run time
    from linrec.models.batch import ForwardBatch


def gated_delta_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    batch: ForwardBatch,
    scale: float = 1.0,
    backend: str = "torch",
) -> torch.Tensor:
    """q, k [T, H, K]; v [T, HV, V]; g (log decay) and beta [T, HV]; state [N, HV, K, V] fp32, rows
    batch.slot_ids updated in place. HV == H except for grouped value heads (HV a multiple of H).
    Returns o [T, HV, V] in v's dtype.
    """
    T, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    check_gva(H, HV)
    if k.shape != q.shape or g.shape != (T, HV) or beta.shape != (T, HV) or state.shape[1:] != (HV, K, V):
        raise ValueError(
            f"expected k {tuple(q.shape)}, g and beta {(T, HV)}, state [N, {HV}, {K}, {V}]; got k {tuple(k.shape)}, "
            f"g {tuple(g.shape)}, beta {tuple(beta.shape)}, state {tuple(state.shape)}"
        )
    if backend not in ("torch", "triton"):
        raise ValueError(f"expected backend 'torch' or 'triton', got {backend!r}")
    if batch.is_decode:
        if backend == "triton":  # in place in the pool (on the CPU only under TRITON_INTERPRET=1)
            return gated_delta_decode_triton(q, k, v, g, beta, state, batch.slot_ids, scale)
        return gated_delta_decode(q, k, v, g, beta, state, batch.slot_ids, scale)
    split = split_single_tokens(batch)
    if split is not None:  # the 1-token sequences as one step; only the longer ones padded into chunks
        o = v.new_empty(T, HV, V)
        for sub, rows in split:
            o[rows] = gated_delta_varlen(q[rows], k[rows], v[rows], g[rows], beta[rows], state, sub, scale, backend)
        return o
    # fla-core's chunk kernels on CUDA, unless the toolchain is known to miscompile tensor-core kernels
    if backend == "triton" and q.is_cuda and can_run_triton_prefill(q.device):
        return fla_chunk_gated_delta_varlen(q, k, v, g, beta, state, batch, scale)
    return chunk_gated_delta_varlen(q, k, v, g, beta, state, batch, scale)

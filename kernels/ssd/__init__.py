"""Mamba2's selective state space update over the flat varlen batch, states read and written in the slot pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from linrec.kernels.ssd.decode import ssd_decode_triton
from linrec.kernels.ssd.naive import check_ssd_shapes
from linrec.kernels.ssd.prefill import chunk_ssd, ssd_step
from linrec.kernels.varlen import split_single_tokens

if TYPE_CHECKING:  # kernels take the batch layout by duck typing; they never import models at run time
    from linrec.models.batch import ForwardBatch


def ssd_varlen(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    state: torch.Tensor,
    batch: ForwardBatch,
    backend: str = "torch",
) -> torch.Tensor:
    """x [T, H, P]; dt [T, H] (softplus'ed, biased and clamped by the model); A [H] (< 0); B, C [T, G, N];
    D [H]; state [N_rows, H, P, N] fp32, rows batch.slot_ids updated in place. Returns y [T, H, P] in x's dtype.

    A sequence with a negative slot id starts from a zero state and writes nothing back.
    """
    if backend not in ("torch", "triton"):
        raise ValueError(f"expected a resolved backend 'torch' or 'triton', got {backend!r}")
    # backend="triton" runs decode.py's in-place kernel for the 1-token sequences (all of a decode batch,
    # the decode part of a mixed one); chunked prefill stays on the torch form on every device.
    check_ssd_shapes(x, dt, A, B, C)
    if state.shape[1:] != (*x.shape[1:], B.shape[2]):
        raise ValueError(
            f"expected state of shape [rows, {x.shape[1]}, {x.shape[2]}, {B.shape[2]}], got {tuple(state.shape)}"
        )

    if batch.is_decode and min(batch.slot_ids_host, default=0) >= 0:
        if backend == "triton":  # in place in the pool (on the CPU only under TRITON_INTERPRET=1)
            return ssd_decode_triton(x, dt, A, B, C, D, state, batch.slot_ids)
        # One token per sequence: x's token axis is the sequence axis, so the whole batch is one step.
        y, new_state = ssd_step(x, dt, A, B, C, D, state[batch.slot_ids])
        state[batch.slot_ids] = new_state.to(state.dtype)
        return y.to(x.dtype)

    y = torch.empty_like(x)
    split = None if batch.is_decode else split_single_tokens(batch)
    if split is not None:  # the 1-token sequences as one step, the longer ones chunked
        for sub, rows in split:
            y[rows] = ssd_varlen(x[rows], dt[rows], A, B[rows], C[rows], D, state, sub, backend)
        return y
    offsets = [0]
    for n in batch.seq_lens:  # host copy: no device sync
        offsets.append(offsets[-1] + n)
    for b, slot in enumerate(batch.slot_ids_host):
        lo, hi = offsets[b], offsets[b + 1]
        initial = state[slot] if slot >= 0 else None
        y_b, final = chunk_ssd(x[lo:hi], dt[lo:hi], A, B[lo:hi], C[lo:hi], D, initial)
        y[lo:hi] = y_b.to(x.dtype)
        if slot >= 0:
            state[slot] = final.to(state.dtype)
    return y

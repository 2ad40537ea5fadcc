"""Short causal convolution over the flat varlen batch, state read and written in the slot pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from linrec.kernels.short_conv.naive import naive_short_conv

if TYPE_CHECKING:  # kernels take the batch layout by duck typing; they never import models at run time
    from linrec.models.batch import ForwardBatch


def short_conv_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    batch: ForwardBatch,
    activation: str | None = "silu",
    backend: str = "torch",
) -> torch.Tensor:
    """x [T, D]; weight [D, W]; conv_state [N, D, W-1] (rows batch.slot_ids updated in place).

    Returns y [T, D] in x's dtype.
    """
    y = torch.empty_like(x)
    offsets = batch.cu_seqlens.tolist()
    for b, slot in enumerate(batch.slot_ids_host):
        lo, hi = offsets[b], offsets[b + 1]
        y_b, final = naive_short_conv(x[lo:hi], weight, bias, conv_state[slot], activation)
        y[lo:hi] = y_b.to(x.dtype)
        conv_state[slot] = final.to(conv_state.dtype)
    return y

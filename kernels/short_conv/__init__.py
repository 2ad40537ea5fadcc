"""Short causal convolution over the flat varlen batch, state read and written in the slot pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from linrec.kernels.short_conv.prefill import short_conv_decode, short_conv_prefill

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
    # No Triton kernel yet: both resolved backends run the torch implementation (it is one conv1d).
    if backend not in ("torch", "triton"):
        raise ValueError(f"expected backend 'torch' or 'triton', got {backend!r}")
    if batch.is_decode:
        return short_conv_decode(x, weight, bias, conv_state, batch.slot_ids, activation)
    return short_conv_prefill(x, weight, bias, conv_state, batch, activation)

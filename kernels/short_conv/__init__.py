"""Short causal convolution over the flat varlen batch, state read and written in the slot pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from linrec.kernels.short_conv.decode import short_conv_decode_triton
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
    if backend not in ("torch", "triton"):
        raise ValueError(f"expected backend 'torch' or 'triton', got {backend!r}")
    if batch.is_decode:
        # triton: the in-place kernel over the pool (on the CPU it needs TRITON_INTERPRET=1)
        step = short_conv_decode_triton if backend == "triton" else short_conv_decode
        return step(x, weight, bias, conv_state, batch.slot_ids, activation)
    # Prefill, and the 1-token rows of a mixed step, run the one batched conv1d on both backends: it
    # already covers the whole varlen batch in a single call.
    return short_conv_prefill(x, weight, bias, conv_state, batch, activation)

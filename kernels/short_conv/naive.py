"""Causal depthwise convolution over time with a carried state: the fp32 reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence.

    x [T, D]; weight [D, W]; bias [D]; initial_state [D, W-1] holds the W-1 inputs before x, oldest first.
    y_t = act(bias + sum_j weight[:, j] * x_{t-W+1+j}). Returns y [T, D] fp32 and the final state
    [D, W-1] (the last W-1 inputs, zeros where the sequence is shorter and started from zeros).
    """
    T, D = x.shape
    W = weight.shape[1]
    past = initial_state.float() if initial_state is not None else x.new_zeros(D, W - 1, dtype=torch.float32)
    window = torch.cat([past, x.float().t()], dim=1)  # [D, W-1+T]
    y = torch.empty(T, D, dtype=torch.float32, device=x.device)
    for t in range(T):
        y[t] = (window[:, t : t + W] * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    if activation in ("silu", "swish"):
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"expected activation 'silu' or None, got {activation!r}")
    return y, window[:, window.shape[1] - (W - 1) :].clone()

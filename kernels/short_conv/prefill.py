"""Causal short convolution in torch: the whole varlen batch in one conv1d, and the batched 1-token step."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # kernels take the batch layout by duck typing; they never import models at run time
    from linrec.models.batch import ForwardBatch


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation in ("silu", "swish"):
        return F.silu(y)
    if activation is not None:
        raise ValueError(f"expected activation 'silu', 'swish' or None, got {activation!r}")
    return y


def short_conv_prefill(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    batch: ForwardBatch,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Any varlen batch. x [T, D]; weight [D, W]; conv_state [N, D, W-1], rows batch.slot_ids updated in place.

    Each sequence's carried W-1 inputs are laid before its tokens on one extended axis of length
    T + B*(W-1); a single depthwise conv1d over that axis gives every sequence's outputs (windows that
    straddle two sequences are computed and dropped). Computed in fp32; returns y [T, D] in x's dtype.
    """
    T, D = x.shape
    W = weight.shape[1]
    num_seqs = batch.num_seqs
    device = x.device
    cu = batch.cu_seqlens.to(device)
    seq_lens = cu[1:] - cu[:-1]
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), seq_lens, output_size=T)
    token = torch.arange(T, device=device)
    slots = batch.slot_ids.to(device).clamp_min(0)  # a negative id is the null slot, never the pool's last row

    # sequence b's segment on the extended axis starts at cu[b] + b*(W-1): W-1 carried inputs, then its tokens
    seg_start = cu[:-1] + torch.arange(num_seqs, device=device) * (W - 1)  # [B]
    lag = torch.arange(W - 1, device=device)  # [W-1]
    ext = x.new_empty(T + num_seqs * (W - 1), D, dtype=torch.float32)
    ext[(seg_start[:, None] + lag).reshape(-1)] = conv_state[slots].float().transpose(1, 2).reshape(-1, D)
    ext[token + (seq_of_token + 1) * (W - 1)] = x.float()

    y_ext = F.conv1d(ext.t()[None], weight.float()[:, None, :], bias.float() if bias is not None else None, groups=D)
    y = y_ext[0].t()[token + seq_of_token * (W - 1)]  # output i of a segment sees its inputs i .. i+W-1

    # the last W-1 entries of each segment: carried inputs still count when a sequence is shorter than W-1
    seg_end = cu[1:] + torch.arange(num_seqs, device=device) * (W - 1)  # [B], start of the last W-1 entries
    final = ext[seg_end[:, None] + lag]  # [B, W-1, D]
    conv_state[slots] = final.transpose(1, 2).to(conv_state.dtype)
    return _activate(y, activation).to(x.dtype)


def short_conv_decode(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    slot_ids: torch.Tensor,
    activation: str | None = "silu",
) -> torch.Tensor:
    """One new token per sequence. x [B, D]; weight [D, W]; conv_state [N, D, W-1], rows slot_ids updated.

    Returns y [B, D] in x's dtype (computed in fp32).
    """
    slot_ids = slot_ids.clamp_min(0)  # a negative id is the null slot, never the pool's last row
    window = torch.cat([conv_state[slot_ids].float(), x.float()[:, :, None]], dim=2)  # [B, D, W]
    y = (window * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    conv_state[slot_ids] = window[:, :, 1:].to(conv_state.dtype)
    return _activate(y, activation).to(x.dtype)

"""One-token causal depthwise convolution for a whole decode batch: the Triton kernel over the slot pool.

Used for GLA's and Gated DeltaNet's q/k/v short convolutions and Mamba2's conv1d. Each program owns one
(sequence, block of BD channels): it reads the W-1 carried inputs of its channels from the pool row
slot_ids[b], computes y = act(bias + sum_j weight[:, j] * window[:, j]) over the window [carried, x],
and shifts x into the carried inputs in place. Slot 0 (the null slot) and negative slots are skipped:
their output rows are zeros and no state row is touched. No autotune (the update is in place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 128


@triton.jit
def _short_conv_decode_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    state_ptr,
    slot_ptr,
    y_ptr,
    stride_xb,
    stride_wd,
    stride_ww,
    stride_sn,
    stride_sd,
    stride_sw,
    stride_yb,
    D,
    W: tl.constexpr,
    BD: tl.constexpr,
    BW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)
    o_w = tl.arange(0, BW)
    m_d = o_d < D
    slot = tl.load(slot_ptr + i_b).to(tl.int64)
    if slot > 0:
        b_x = tl.load(x_ptr + i_b * stride_xb + o_d, mask=m_d, other=0.0).to(tl.float32)
        # window column j < W-1 is carried input j (oldest first); column W-1 is the new input
        s_ptrs = state_ptr + slot * stride_sn + o_d[:, None] * stride_sd + o_w[None, :] * stride_sw
        m_carried = m_d[:, None] & (o_w[None, :] < W - 1)
        b_win = tl.load(s_ptrs, mask=m_carried, other=0.0).to(tl.float32)
        b_win = tl.where(o_w[None, :] == W - 1, b_x[:, None], b_win)
        m_w = m_d[:, None] & (o_w[None, :] < W)
        b_w = tl.load(w_ptr + o_d[:, None] * stride_wd + o_w[None, :] * stride_ww, mask=m_w, other=0.0)
        b_y = tl.sum(b_win * b_w.to(tl.float32), axis=1)
        if HAS_BIAS:
            b_y += tl.load(bias_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
        if SILU:
            b_y = b_y * tl.sigmoid(b_y)
        tl.store(y_ptr + i_b * stride_yb + o_d, b_y.to(y_ptr.dtype.element_ty), mask=m_d)
        # the carried inputs move one to the left: new column j = old column j+1, the last one = x
        b_next = tl.load(s_ptrs + stride_sw, mask=m_d[:, None] & (o_w[None, :] < W - 2), other=0.0).to(tl.float32)
        b_next = tl.where(o_w[None, :] == W - 2, b_x[:, None], b_next)
        # Every load of the row completes before any thread overwrites it (threads may hold replicas).
        tl.debug_barrier()
        tl.store(s_ptrs, b_next.to(state_ptr.dtype.element_ty), mask=m_carried)
    else:
        tl.store(y_ptr + i_b * stride_yb + o_d, tl.zeros([BD], dtype=tl.float32).to(y_ptr.dtype.element_ty), mask=m_d)


def short_conv_decode_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    slot_ids: torch.Tensor,
    activation: str | None = "silu",
) -> torch.Tensor:
    """The contract of prefill.short_conv_decode, on the Triton kernel. x [B, D]; weight [D, W]; bias [D]
    or None; conv_state [N, D, W-1] (any dtype), rows slot_ids updated in place; slot_ids [B] int64,
    0 or negative for padding rows (skipped, output zeros). Returns y [B, D] in x's dtype (fp32 math).
    """
    B, D = x.shape
    W = weight.shape[1]
    if weight.shape != (D, W) or conv_state.shape[1:] != (D, W - 1):
        raise ValueError(
            f"expected weight [{D}, W] and conv_state [N, {D}, W-1], got weight {tuple(weight.shape)} and "
            f"conv_state {tuple(conv_state.shape)}"
        )
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"expected bias of shape {(D,)}, got {tuple(bias.shape)}")
    if activation not in ("silu", "swish", None):
        raise ValueError(f"expected activation 'silu', 'swish' or None, got {activation!r}")
    if slot_ids.shape != (B,):
        raise ValueError(f"expected slot_ids of shape {(B,)}, got {tuple(slot_ids.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if B == 0:
        return y
    BD = min(BLOCK_D, triton.next_power_of_2(D))
    _short_conv_decode_kernel[(B, triton.cdiv(D, BD))](
        x,
        weight,
        bias if bias is not None else weight,  # an unused pointer when there is no bias
        conv_state,
        slot_ids.to(torch.int64),
        y,
        x.stride(0),
        weight.stride(0),
        weight.stride(1),
        conv_state.stride(0),
        conv_state.stride(1),
        conv_state.stride(2),
        y.stride(0),
        D,
        W=W,
        BD=BD,
        BW=triton.next_power_of_2(W),
        HAS_BIAS=bias is not None,
        SILU=activation is not None,
        num_warps=4,
    )
    return y

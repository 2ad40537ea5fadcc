"""Mamba2's selective state update (one token) as a Triton kernel that updates the slot pool in place.

One program owns one (sequence b, head h, block of BP head_dim rows): it loads the [BP, N] tile of row
slot_ids[b] of the pool and applies naive.py's step in fp32,
    h = exp(dt * A) h + (dt x) B^T,   y = h C + D x,
then stores the tile back where it lies. Head h reads B and C of group h // (H // G). dt arrives final
(softplus, bias and time_step_limit applied by the model), as for every other form of this op.

Rows whose slot is 0 (the null slot padding uses) or negative read and write no state and output zeros.
Offsets are int64. No autotune (the kernel updates in place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linrec.kernels.ssd.naive import check_ssd_shapes

MAX_TILE = 4096  # elements of the [BP, BN] fp32 tile one program holds


@triton.jit
def _ssd_decode_kernel(
    x,  # [B, H, P]
    dt,  # [B, H]
    A,  # [H]
    Bmat,  # [B, G, N]
    Cmat,  # [B, G, N]
    D,  # [H] (unused without HAS_D)
    state,  # [rows, H, P, N] fp32, updated in place
    slot_ids,  # [B] int64
    y,  # [B, H, P]
    H: tl.constexpr,
    G: tl.constexpr,
    P: tl.constexpr,
    N: tl.constexpr,
    BP: tl.constexpr,
    BN: tl.constexpr,
    HAS_D: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    i_g = i_h // (H // G)

    slot = tl.load(slot_ids + i_b).to(tl.int64)
    is_real = slot > 0
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    mask_p = o_p < P
    mask_n = o_n < N
    # the slot test as a [BP] vector: masks must be block-shaped (the interpreter rejects a scalar operand)
    mask_h = (mask_p & (tl.zeros([BP], dtype=tl.int64) + slot > 0))[:, None] & mask_n[None, :]

    b_x = tl.load(x + (i_b * H + i_h) * P + o_p, mask=mask_p, other=0.0).to(tl.float32)
    b_dt = tl.load(dt + i_b * H + i_h).to(tl.float32)
    b_A = tl.load(A + i_h).to(tl.float32)
    b_B = tl.load(Bmat + (i_b * G + i_g) * N + o_n, mask=mask_n, other=0.0).to(tl.float32)
    b_C = tl.load(Cmat + (i_b * G + i_g) * N + o_n, mask=mask_n, other=0.0).to(tl.float32)

    p_h = state + (slot * H + i_h) * (P * N) + o_p[:, None] * N + o_n[None, :]
    b_h = tl.load(p_h, mask=mask_h, other=0.0).to(tl.float32)  # [BP, BN]
    b_h = b_h * tl.exp(b_dt * b_A) + (b_dt * b_x)[:, None] * b_B[None, :]
    b_y = tl.sum(b_h * b_C[None, :], 1)
    if HAS_D:
        b_y += tl.load(D + i_h).to(tl.float32) * b_x
    tl.store(p_h, b_h, mask=mask_h)
    b_y = tl.where(is_real, b_y, 0.0)
    tl.store(y + (i_b * H + i_h) * P + o_p, b_y.to(y.dtype.element_ty), mask=mask_p)


def ssd_decode_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    block_p: int | None = None,
) -> torch.Tensor:
    """One token of each of B sequences. x [B, H, P]; dt [B, H] (final step size); A [H] (< 0);
    B, C [B, G, N]; D [H] or None; state [rows, H, P, N] fp32, rows slot_ids [B] updated in place (real
    slots distinct; 0 or negative: no state touched, zero output). block_p overrides the head_dim block
    (tests use it to cover several blocks). Returns y [B, H, P] in x's dtype.
    """
    check_ssd_shapes(x, dt, A, B, C)
    batch, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    if state.dtype != torch.float32 or state.shape[1:] != (H, P, N) or not state.is_contiguous():
        raise ValueError(
            f"expected a contiguous fp32 state [rows, {H}, {P}, {N}], got {state.dtype} {tuple(state.shape)}"
        )
    if slot_ids.shape != (batch,):
        raise ValueError(f"expected slot_ids of shape {(batch,)}, got {tuple(slot_ids.shape)}")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if batch == 0:
        return y
    BN = triton.next_power_of_2(N)
    BP = block_p if block_p is not None else min(triton.next_power_of_2(P), max(4, MAX_TILE // BN))
    grid = (triton.cdiv(P, BP), H, batch)
    _ssd_decode_kernel[grid](
        x.contiguous(),
        dt.contiguous(),
        A.contiguous(),
        B.contiguous(),
        C.contiguous(),
        D.contiguous() if D is not None else A,  # a placeholder pointer when there is no D
        state,
        slot_ids.to(torch.int64).contiguous(),
        y,
        H=H,
        G=G,
        P=P,
        N=N,
        BP=BP,
        BN=BN,
        HAS_D=D is not None,
        num_warps=4,
    )
    return y

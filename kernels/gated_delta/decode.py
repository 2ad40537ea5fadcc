"""The gated delta rule's one-token step as a Triton kernel that updates the slot pool in place.

One program owns one (sequence b, value head hv, block of BV value columns): it loads the [K, BV] tile of
row slot_ids[b] of the pool, applies naive.py's step (decay, delta, rank-1 update, read-out) in fp32 and
stores the tile back where it lies. Columns of the state are independent in the delta rule (k S' and the
update are per column), so V splits across programs without any exchange. No gather or scatter copies:
the state is read once and written once, which is all the memory traffic the step needs.

Rows whose slot is 0 (the null slot padding uses) or negative read and write no state and output zeros.
Offsets are int64 (pool rows times the per-row size exceed 2^31 at real sizes). No autotune: the kernel
updates in place, so a benchmark rerun of each config would apply the step several times.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linrec.kernels.gated_delta.naive import check_gva

# A [BK, BV] fp32 tile of at most this many elements per program (registers), whatever K is.
MAX_TILE = 4096


@triton.jit
def _gated_delta_decode_kernel(
    q,  # [B, H, K]
    k,  # [B, H, K]
    v,  # [B, HV, V]
    g,  # [B, HV] log decay
    beta,  # [B, HV]
    state,  # [N, HV, K, V] fp32, updated in place
    slot_ids,  # [B] int64
    o,  # [B, HV, V]
    scale,
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    i_v = tl.program_id(0).to(tl.int64)
    i_hv = tl.program_id(1).to(tl.int64)
    i_b = tl.program_id(2).to(tl.int64)
    i_h = i_hv // (HV // H)  # GVA: consecutive value heads share a query/key head

    slot = tl.load(slot_ids + i_b).to(tl.int64)
    is_real = slot > 0
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    # the slot test as a [BV] vector: masks must be block-shaped (the interpreter rejects a scalar operand)
    mask_h = mask_k[:, None] & (mask_v & (tl.zeros([BV], dtype=tl.int64) + slot > 0))[None, :]

    b_q = tl.load(q + (i_b * H + i_h) * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + (i_b * H + i_h) * K + o_k, mask=mask_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + (i_b * HV + i_hv) * V + o_v, mask=mask_v, other=0.0).to(tl.float32)
    b_g = tl.load(g + i_b * HV + i_hv).to(tl.float32)
    b_beta = tl.load(beta + i_b * HV + i_hv).to(tl.float32)

    p_h = state + (slot * HV + i_hv) * (K * V) + o_k[:, None] * V + o_v[None, :]
    b_h = tl.load(p_h, mask=mask_h, other=0.0).to(tl.float32)  # [BK, BV]
    b_h = b_h * tl.exp(b_g)
    b_u = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))  # the delta: [BV]
    b_h = b_h + b_k[:, None] * b_u[None, :]
    b_o = scale * tl.sum(b_h * b_q[:, None], 0)
    tl.store(p_h, b_h, mask=mask_h)
    b_o = tl.where(is_real, b_o, 0.0)
    tl.store(o + (i_b * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=mask_v)


def gated_delta_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    scale: float = 1.0,
    block_v: int | None = None,
) -> torch.Tensor:
    """One new token per sequence, the same contract as prefill.gated_delta_decode.

    q, k [B, H, K]; v [B, HV, V]; g (log decay), beta [B, HV]; state [N, HV, K, V] fp32, rows slot_ids [B]
    updated in place (real slots distinct; 0 or negative: no state touched, zero output). block_v
    overrides the value-column block (tests use it to cover several blocks). Returns o [B, HV, V] in v's dtype.
    """
    B, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    check_gva(H, HV)
    if state.dtype != torch.float32 or state.shape[1:] != (HV, K, V) or not state.is_contiguous():
        raise ValueError(
            f"expected a contiguous fp32 state [N, {HV}, {K}, {V}], got {state.dtype} {tuple(state.shape)}"
        )
    if k.shape != q.shape or g.shape != (B, HV) or beta.shape != (B, HV) or slot_ids.shape != (B,):
        raise ValueError(
            f"expected k {tuple(q.shape)}, g and beta {(B, HV)}, slot_ids {(B,)}; got k {tuple(k.shape)}, "
            f"g {tuple(g.shape)}, beta {tuple(beta.shape)}, slot_ids {tuple(slot_ids.shape)}"
        )
    o = torch.empty(B, HV, V, dtype=v.dtype, device=v.device)
    if B == 0:
        return o
    BK = triton.next_power_of_2(K)
    BV = block_v if block_v is not None else min(triton.next_power_of_2(V), max(16, MAX_TILE // BK))
    grid = (triton.cdiv(V, BV), HV, B)
    _gated_delta_decode_kernel[grid](
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        g.contiguous(),
        beta.contiguous(),
        state,
        slot_ids.to(torch.int64).contiguous(),
        o,
        float(scale),
        H=H,
        HV=HV,
        K=K,
        V=V,
        BK=BK,
        BV=BV,
        num_warps=4,
    )
    return o

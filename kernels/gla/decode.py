"""One-token gated linear attention for a whole decode batch: the Triton kernel over the slot pool.

Each program owns one (sequence, KV head, block of BV value columns): it reads its [K, BV] tile of the
state from the pool row slot_ids[b] once, decays it, adds k^T v, writes it back in place and answers
every query head of the KV head's group from the same registers. No gather/scatter copy, no autotune
(the update is in place: a rerun would apply it twice). Slot 0 (the null slot) and negative slots are
skipped: their output rows are zeros and no state row is touched.

The decay `g` takes one of three forms:
    [B, Hk, K]  per key channel (GLA's gk: Liger-GLA, fla GLA)
    [B, Hk]     one scalar per head and token (fla's simple GLA gate)
    [Hk]        a constant per head (RetNet-style), or None for no decay
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# value columns per program: K x BV fp32 state tile; 32 keeps a 128 x 32 tile at 32 registers a thread
BLOCK_V = 32

GATE_NONE, GATE_PER_CHANNEL, GATE_PER_HEAD = 0, 1, 2


def num_warps_for(tile_elements: int) -> int:
    """Warps for a program whose largest register tile has this many fp32 elements: about 16 per thread,
    1 to 8 warps. ptxas (sm_90, triton 3.9) puts the 128 x 32 GLA tile at 64 registers a thread with 8
    warps and 166 with 4; chosen from register counts, not from timings (none measured yet)."""
    return max(1, min(8, triton.next_power_of_2(tile_elements) // 512))


@triton.jit
def _gla_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    state_ptr,
    slot_ptr,
    o_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_gb,
    stride_gh,
    stride_sn,
    stride_sh,
    stride_sk,
    stride_ob,
    stride_oh,
    scale,
    K: tl.constexpr,
    V: tl.constexpr,
    GROUP: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_hk = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    slot = tl.load(slot_ptr + i_b).to(tl.int64)
    o_row = o_ptr + i_b * stride_ob + (i_hk * GROUP) * stride_oh + o_v
    if slot > 0:
        m_kv = m_k[:, None] & m_v[None, :]
        s_ptrs = state_ptr + slot * stride_sn + i_hk * stride_sh + o_k[:, None] * stride_sk + o_v[None, :]
        b_s = tl.load(s_ptrs, mask=m_kv, other=0.0).to(tl.float32)
        b_k = tl.load(k_ptr + i_b * stride_kb + i_hk * stride_kh + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v_ptr + i_b * stride_vb + i_hk * stride_vh + o_v, mask=m_v, other=0.0).to(tl.float32)
        if GATE == 1:
            b_g = tl.load(g_ptr + i_b * stride_gb + i_hk * stride_gh + o_k, mask=m_k, other=0.0).to(tl.float32)
            b_s = b_s * tl.exp(b_g)[:, None]
        elif GATE == 2:
            b_g = tl.load(g_ptr + i_b * stride_gb + i_hk * stride_gh).to(tl.float32)
            b_s = b_s * tl.exp(b_g)
        b_s = b_s + b_k[:, None] * b_v[None, :]
        # Every load of the tile completes before any thread overwrites it (threads may hold replicas).
        tl.debug_barrier()
        tl.store(s_ptrs, b_s, mask=m_kv)
        for j in range(GROUP):
            b_q = tl.load(q_ptr + i_b * stride_qb + (i_hk * GROUP + j) * stride_qh + o_k, mask=m_k, other=0.0)
            b_o = tl.sum(b_q.to(tl.float32)[:, None] * b_s, axis=0) * scale
            tl.store(o_row + j * stride_oh, b_o.to(o_ptr.dtype.element_ty), mask=m_v)
    else:
        for j in range(GROUP):
            tl.store(o_row + j * stride_oh, tl.zeros([BV], dtype=tl.float32).to(o_ptr.dtype.element_ty), mask=m_v)


def _gate_layout(g: torch.Tensor | None, B: int, Hk: int, K: int) -> tuple[int, torch.Tensor | None, int, int]:
    """(gate kind, tensor, batch stride, head stride) for the three accepted shapes of g."""
    if g is None:
        return GATE_NONE, None, 0, 0
    if g.shape == (B, Hk, K):
        g = g if g.stride(-1) == 1 else g.contiguous()
        return GATE_PER_CHANNEL, g, g.stride(0), g.stride(1)
    if g.shape == (B, Hk):
        return GATE_PER_HEAD, g, g.stride(0), g.stride(1)
    if g.shape == (Hk,):
        return GATE_PER_HEAD, g, 0, g.stride(0)  # batch stride 0: every sequence reads the same constants
    raise ValueError(f"expected g of shape {(B, Hk, K)}, {(B, Hk)}, {(Hk,)} or None, got {tuple(g.shape)}")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def gla_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """The contract of step.gla_step, on the Triton kernel. q [B, H, K]; k [B, Hk, K]; v [B, Hk, V];
    g [B, Hk, K], [B, Hk], [Hk] or None (log decays); state [N, Hk, K, V] fp32, row slot_ids[b] updated
    in place; slot_ids [B] int64, distinct for real rows, 0 or negative for padding rows (skipped,
    output zeros). Returns o [B, H, V] fp32.
    """
    B, H, K = q.shape
    Hk, V = v.shape[1], v.shape[2]
    if H % Hk:
        raise ValueError(f"expected query heads divisible by key/value heads, got H={H}, Hk={Hk}")
    if k.shape != (B, Hk, K) or v.shape[0] != B or state.shape[1:] != (Hk, K, V):
        raise ValueError(
            f"expected k {(B, Hk, K)}, v [{B}, {Hk}, V], state [N, {Hk}, {K}, V]; got k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}, state {tuple(state.shape)}"
        )
    if state.dtype != torch.float32 or state.stride(-1) != 1:
        raise ValueError(
            f"expected an fp32 state with contiguous rows, got {state.dtype} strides {tuple(state.stride())}"
        )
    if slot_ids.shape != (B,):
        raise ValueError(f"expected slot_ids of shape {(B,)}, got {tuple(slot_ids.shape)}")
    gate, g, stride_gb, stride_gh = _gate_layout(g, B, Hk, K)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    o = q.new_empty(B, H, V, dtype=torch.float32)
    if B == 0:
        return o
    BK, BV = triton.next_power_of_2(K), min(BLOCK_V, triton.next_power_of_2(V))
    grid = (B, Hk, triton.cdiv(V, BV))
    _gla_decode_kernel[grid](
        q,
        k,
        v,
        g if g is not None else state,  # an unused pointer when there is no decay
        state,
        slot_ids.to(torch.int64),
        o,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        stride_gb,
        stride_gh,
        state.stride(0),
        state.stride(1),
        state.stride(2),
        o.stride(0),
        o.stride(1),
        float(scale),
        K=K,
        V=V,
        GROUP=H // Hk,
        BK=BK,
        BV=BV,
        GATE=gate,
        num_warps=num_warps_for(BK * BV),
    )
    return o

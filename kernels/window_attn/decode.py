"""Sliding-window ring attention at decode, alone and fused with Liger's GLA branch: Triton kernels.

The ring layout is the one of window_attn/__init__.py: row slot of ring_k / ring_v [N, W, Hk, D] holds
the key and value of position p at index p % W. A decode token at position p writes its key and value
at p % W and attends over the ring, where index j holds position p - ((p - j) mod W); that position is
negative, so never written, exactly when j > p. The window is W keys INCLUDING the current one.

Each program owns one (sequence, KV head): it reads the ring of that head once into registers, puts the
current key in place of index p % W there (rounded to the ring's dtype, as a later read would see it),
answers every query head of the group from those registers, then writes the current key and value into
the ring in place. Slot 0 (the null slot) and negative slots are skipped: output zeros, nothing written.

liger_attention_decode fuses a whole Liger-GLA attention step into one launch per layer: the ring write,
the window softmax attention, the GLA update of the recurrent state and o = 0.5 * window + 0.5 * GLA.
It does not move fewer bytes than the two kernels apart (the fp32 state [D, D] and the ring [W, D] of
each KV head dominate, and both are read and written once either way); what it saves is the separate
launches and the [B, H, D] intermediates, which count at small batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linrec.kernels.gla.decode import num_warps_for

# value columns per program of the fused kernel (its GLA state tile is [D, BLOCK_V])
BLOCK_V = 32


@triton.jit
def _window_attn_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ring_k_ptr,
    ring_v_ptr,
    slot_ptr,
    pos_ptr,
    o_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_rn,
    stride_rw,
    stride_rh,
    stride_ob,
    stride_oh,
    scale,
    W: tl.constexpr,
    D: tl.constexpr,
    GROUP: tl.constexpr,
    BW: tl.constexpr,
    BD: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_hk = tl.program_id(1).to(tl.int64)
    o_w = tl.arange(0, BW)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    slot = tl.load(slot_ptr + i_b).to(tl.int64)
    o_row = o_ptr + i_b * stride_ob + (i_hk * GROUP) * stride_oh + o_d
    if slot > 0:
        pos = tl.load(pos_ptr + i_b).to(tl.int64)
        cur = pos % W
        is_cur = (o_w == cur)[:, None]
        # ring index j holds a written position iff j <= pos (j < W always)
        visible = (o_w < W) & (o_w <= pos)
        m_ring = (o_w < W)[:, None] & m_d[None, :]
        ring_offs = slot * stride_rn + o_w[:, None] * stride_rw + i_hk * stride_rh + o_d[None, :]
        b_knew = tl.load(k_ptr + i_b * stride_kb + i_hk * stride_kh + o_d, mask=m_d, other=0.0)
        b_vnew = tl.load(v_ptr + i_b * stride_vb + i_hk * stride_vh + o_d, mask=m_d, other=0.0)
        b_knew = b_knew.to(ring_k_ptr.dtype.element_ty)
        b_vnew = b_vnew.to(ring_v_ptr.dtype.element_ty)
        b_keys = tl.load(ring_k_ptr + ring_offs, mask=m_ring, other=0.0).to(tl.float32)
        b_values = tl.load(ring_v_ptr + ring_offs, mask=m_ring, other=0.0).to(tl.float32)
        b_keys = tl.where(is_cur, b_knew.to(tl.float32)[None, :], b_keys)
        b_values = tl.where(is_cur, b_vnew.to(tl.float32)[None, :], b_values)
        for j in range(GROUP):
            b_q = tl.load(q_ptr + i_b * stride_qb + (i_hk * GROUP + j) * stride_qh + o_d, mask=m_d, other=0.0)
            b_s = tl.sum(b_keys * b_q.to(tl.float32)[None, :], axis=1) * scale
            b_s = tl.where(visible, b_s, float("-inf"))
            b_p = tl.exp(b_s - tl.max(b_s, axis=0))
            b_p = tl.where(visible, b_p, 0.0)
            b_o = tl.sum(b_p[:, None] * b_values, axis=0) / tl.sum(b_p, axis=0)
            tl.store(o_row + j * stride_oh, b_o.to(o_ptr.dtype.element_ty), mask=m_d)
        new_offs = slot * stride_rn + cur * stride_rw + i_hk * stride_rh + o_d
        tl.store(ring_k_ptr + new_offs, b_knew, mask=m_d)
        tl.store(ring_v_ptr + new_offs, b_vnew, mask=m_d)
    else:
        for j in range(GROUP):
            tl.store(o_row + j * stride_oh, tl.zeros([BD], dtype=tl.float32).to(o_ptr.dtype.element_ty), mask=m_d)


@triton.jit
def _liger_attention_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    phi_q_ptr,
    phi_k_ptr,
    g_ptr,
    state_ptr,
    ring_k_ptr,
    ring_v_ptr,
    slot_ptr,
    pos_ptr,
    o_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_pqb,
    stride_pqh,
    stride_pkb,
    stride_pkh,
    stride_gb,
    stride_gh,
    stride_sn,
    stride_sh,
    stride_sk,
    stride_rn,
    stride_rw,
    stride_rh,
    stride_ob,
    stride_oh,
    window_scale,
    gla_scale,
    W: tl.constexpr,
    D: tl.constexpr,
    GROUP: tl.constexpr,
    BW: tl.constexpr,
    BD: tl.constexpr,
    BV: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_hk = tl.program_id(1).to(tl.int64)
    i_v = tl.program_id(2)
    o_w = tl.arange(0, BW)
    o_d = tl.arange(0, BD)  # the key dimension: all of it in every program
    o_v = i_v * BV + tl.arange(0, BV)  # this program's block of value columns
    m_d = o_d < D
    m_v = o_v < D
    slot = tl.load(slot_ptr + i_b).to(tl.int64)
    o_row = o_ptr + i_b * stride_ob + (i_hk * GROUP) * stride_oh + o_v
    if slot > 0:
        # window: the ring of this KV head with the current key and value in place of index pos % W
        pos = tl.load(pos_ptr + i_b).to(tl.int64)
        cur = pos % W
        is_cur = (o_w == cur)[:, None]
        visible = (o_w < W) & (o_w <= pos)
        m_w = (o_w < W)[:, None]
        ring_row = slot * stride_rn + o_w[:, None] * stride_rw + i_hk * stride_rh
        b_knew = tl.load(k_ptr + i_b * stride_kb + i_hk * stride_kh + o_d, mask=m_d, other=0.0)
        b_knew = b_knew.to(ring_k_ptr.dtype.element_ty)
        b_v = tl.load(v_ptr + i_b * stride_vb + i_hk * stride_vh + o_v, mask=m_v, other=0.0)
        b_vnew = b_v.to(ring_v_ptr.dtype.element_ty)
        b_keys = tl.load(ring_k_ptr + ring_row + o_d[None, :], mask=m_w & m_d[None, :], other=0.0).to(tl.float32)
        b_values = tl.load(ring_v_ptr + ring_row + o_v[None, :], mask=m_w & m_v[None, :], other=0.0).to(tl.float32)
        b_keys = tl.where(is_cur, b_knew.to(tl.float32)[None, :], b_keys)
        b_values = tl.where(is_cur, b_vnew.to(tl.float32)[None, :], b_values)

        # GLA: S = diag(exp g) S + phi(k)^T v on the [D, BV] tile of the state
        m_kv = m_d[:, None] & m_v[None, :]
        s_ptrs = state_ptr + slot * stride_sn + i_hk * stride_sh + o_d[:, None] * stride_sk + o_v[None, :]
        b_s = tl.load(s_ptrs, mask=m_kv, other=0.0).to(tl.float32)
        b_g = tl.load(g_ptr + i_b * stride_gb + i_hk * stride_gh + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_pk = tl.load(phi_k_ptr + i_b * stride_pkb + i_hk * stride_pkh + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_s = b_s * tl.exp(b_g)[:, None] + b_pk[:, None] * b_v.to(tl.float32)[None, :]
        # Every load of the state tile completes before any thread overwrites it (threads may hold replicas).
        tl.debug_barrier()
        tl.store(s_ptrs, b_s, mask=m_kv)
        new_offs = slot * stride_rn + cur * stride_rw + i_hk * stride_rh
        if i_v == 0:  # the key row is whole in every program; one of them writes it
            tl.store(ring_k_ptr + new_offs + o_d, b_knew, mask=m_d)
        tl.store(ring_v_ptr + new_offs + o_v, b_vnew, mask=m_v)

        for j in range(GROUP):
            h = i_hk * GROUP + j
            b_q = tl.load(q_ptr + i_b * stride_qb + h * stride_qh + o_d, mask=m_d, other=0.0).to(tl.float32)
            b_sc = tl.sum(b_keys * b_q[None, :], axis=1) * window_scale
            b_sc = tl.where(visible, b_sc, float("-inf"))
            b_p = tl.exp(b_sc - tl.max(b_sc, axis=0))
            b_p = tl.where(visible, b_p, 0.0)
            b_window = tl.sum(b_p[:, None] * b_values, axis=0) / tl.sum(b_p, axis=0)
            b_pq = tl.load(phi_q_ptr + i_b * stride_pqb + h * stride_pqh + o_d, mask=m_d, other=0.0).to(tl.float32)
            b_rec = tl.sum(b_pq[:, None] * b_s, axis=0) * gla_scale
            tl.store(o_row + j * stride_oh, (0.5 * b_window + 0.5 * b_rec).to(o_ptr.dtype.element_ty), mask=m_v)
    else:
        for j in range(GROUP):
            tl.store(o_row + j * stride_oh, tl.zeros([BV], dtype=tl.float32).to(o_ptr.dtype.element_ty), mask=m_v)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor) -> None:
    B, H, D = q.shape
    Hk = k.shape[1]
    if H % Hk:
        raise ValueError(f"expected query heads divisible by key/value heads, got H={H}, Hk={Hk}")
    if k.shape != (B, Hk, D) or v.shape != (B, Hk, D):
        raise ValueError(f"expected k and v of shape {(B, Hk, D)}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if ring_k.shape != ring_v.shape or ring_k.shape[2:] != (Hk, D) or ring_k.stride() != ring_v.stride():
        raise ValueError(
            f"expected ring_k and ring_v alike, [N, W, {Hk}, {D}]; got {tuple(ring_k.shape)} strides "
            f"{tuple(ring_k.stride())} and {tuple(ring_v.shape)} strides {tuple(ring_v.stride())}"
        )
    if ring_k.stride(-1) != 1:
        raise ValueError(f"expected rings with contiguous rows, got strides {tuple(ring_k.stride())}")


def window_attn_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    slot_ids: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One token per sequence. q [B, H, D]; k, v [B, Hk, D]; ring_k, ring_v [N, W, Hk, D], rows slot_ids
    updated in place at positions % W; slot_ids [B] int64 (0 or negative: padding, skipped, output zeros);
    positions [B]. Returns o [B, H, D] fp32.
    """
    _check_ring(q, k, v, ring_k, ring_v)
    B, H, D = q.shape
    W, Hk = ring_k.shape[1], ring_k.shape[2]
    # Rounded to the ring's dtype here, where torch rounds to nearest even (the interpreter's in-kernel
    # downcast truncates); a no-op in the models, whose rings hold k and v in their own dtype.
    q, k, v = _rows(q), _rows(k.to(ring_k.dtype)), _rows(v.to(ring_v.dtype))
    o = q.new_empty(B, H, D, dtype=torch.float32)
    if B == 0:
        return o
    BW, BD = triton.next_power_of_2(W), triton.next_power_of_2(D)
    _window_attn_decode_kernel[(B, Hk)](
        q,
        k,
        v,
        ring_k,
        ring_v,
        slot_ids.to(torch.int64),
        positions.to(torch.int64),
        o,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        ring_k.stride(0),
        ring_k.stride(1),
        ring_k.stride(2),
        o.stride(0),
        o.stride(1),
        float(scale),
        W=W,
        D=D,
        GROUP=H // Hk,
        BW=BW,
        BD=BD,
        num_warps=num_warps_for(BW * BD),  # keys and values [BW, BD] each: 143 registers at W=64, D=128
    )
    return o


def liger_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    slot_ids: torch.Tensor,
    positions: torch.Tensor,
    window_scale: float,
    gla_scale: float = 1.0,
) -> torch.Tensor:
    """Liger attention for one token per sequence, in one launch.

    q [B, H, D], k [B, Hk, D] (RoPE'd) and v [B, Hk, D] feed the window over ring_k, ring_v
    [N, W, Hk, D]; phi_q [B, H, D], phi_k [B, Hk, D] (feature-mapped) and g [B, Hk, D] (log decays) with
    v feed the GLA state [N, Hk, D, D] fp32. Rows slot_ids of the rings and the state are updated in
    place; slot 0 or a negative id is padding (skipped, output zeros). Returns 0.5 * window + 0.5 * GLA,
    [B, H, D] fp32.
    """
    _check_ring(q, k, v, ring_k, ring_v)
    B, H, D = q.shape
    W, Hk = ring_k.shape[1], ring_k.shape[2]
    if phi_q.shape != q.shape or phi_k.shape != k.shape or g.shape != k.shape:
        raise ValueError(
            f"expected phi_q {tuple(q.shape)}, phi_k and g {tuple(k.shape)}; got {tuple(phi_q.shape)}, "
            f"{tuple(phi_k.shape)} and {tuple(g.shape)}"
        )
    if state.shape[1:] != (Hk, D, D) or state.dtype != torch.float32 or state.stride(-1) != 1:
        raise ValueError(
            f"expected an fp32 state [N, {Hk}, {D}, {D}] with contiguous rows, got {state.dtype} "
            f"{tuple(state.shape)} strides {tuple(state.stride())}"
        )
    # k only feeds the ring: rounded to its dtype here (see window_attn_decode); v feeds the GLA state too
    # and is rounded in the kernel (a no-op in the model, whose ring holds v in v's dtype).
    q, k, v, phi_q, phi_k, g = (_rows(x) for x in (q, k.to(ring_k.dtype), v, phi_q, phi_k, g))
    o = q.new_empty(B, H, D, dtype=torch.float32)
    if B == 0:
        return o
    BW, BD, BV = triton.next_power_of_2(W), triton.next_power_of_2(D), min(BLOCK_V, triton.next_power_of_2(D))
    _liger_attention_decode_kernel[(B, Hk, triton.cdiv(D, BV))](
        q,
        k,
        v,
        phi_q,
        phi_k,
        g,
        state,
        ring_k,
        ring_v,
        slot_ids.to(torch.int64),
        positions.to(torch.int64),
        o,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        phi_q.stride(0),
        phi_q.stride(1),
        phi_k.stride(0),
        phi_k.stride(1),
        g.stride(0),
        g.stride(1),
        state.stride(0),
        state.stride(1),
        state.stride(2),
        ring_k.stride(0),
        ring_k.stride(1),
        ring_k.stride(2),
        o.stride(0),
        o.stride(1),
        float(window_scale),
        float(gla_scale),
        W=W,
        D=D,
        GROUP=H // Hk,
        BW=BW,
        BD=BD,
        BV=BV,
        # keys [BW, BD], values [BW, BV], state [BD, BV]: 175 registers, no spills at W=64, D=128 (4 warps spill)
        num_warps=num_warps_for(BW * BD + BD * BV),
    )
    return o

"""LoLCATs attention for one token per sequence: the Triton decode kernel over the slot pool.

Same signature and math as step.py's lolcats_step, one launch per layer. Each program owns one (sequence,
KV head) and every query head of its group, because those heads share the ring entry at pos % W: that entry
is first read as the key leaving the window (it enters each head's linear state through that head's feature
map), then stands in for the current key in the window, and is overwritten with the current key and value
only after every head has answered. Per query head h of the group:

    phi      = clamp(cat[softmax(k_old Wk[h]), softmax(-k_old Wk[h])], eps)      if pos >= W, else 0
    S[h]    += phi^T v_old,   z[h] += phi                  (in place in the pool row: [2F, D] and [2F])
    A, B     = sum_j exp(sc_j - m) v_j, sum_j exp(sc_j - m)     over ring entries j <= pos, current included
    o[h]     = (gamma[h] A + phi_q[h] S[h]) / (gamma[h] B + phi_q[h] . z[h])

The 2F feature rows are kept as two [F, D] halves (the softmax and the negated softmax), so neither the
concatenation nor the state needs a power-of-two 2F. The value columns are not split over programs: each
program would need the whole leaving key for phi, and the program writing the current key over it could
run before another had read it. Slot 0 (the null slot) and negative slots are skipped: output zeros,
nothing written (the torch step writes the null row instead).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from linrec.kernels.gla.decode import num_warps_for
from linrec.kernels.window_attn.decode import _check_ring, _rows


@triton.jit
def _phi_half(x, m_f, eps):
    """clamp(softmax(x), eps) over the F valid entries of x [BF]; 0 on the padding ones."""
    x = tl.where(m_f, x, float("-inf"))
    p = tl.exp(x - tl.max(x, axis=0))
    p = tl.where(m_f, p, 0.0)
    return tl.where(m_f, tl.maximum(p / tl.sum(p, axis=0), eps), 0.0)


@triton.jit
def _lolcats_decode_kernel(
    q_ptr,
    phi_q_ptr,
    k_ptr,
    v_ptr,
    wk_ptr,
    gamma_ptr,
    linear_ptr,
    norm_ptr,
    ring_k_ptr,
    ring_v_ptr,
    slot_ptr,
    pos_ptr,
    o_ptr,
    stride_qb,
    stride_qh,
    stride_pqb,
    stride_pqh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_wh,
    stride_wd,
    stride_sn,
    stride_sh,
    stride_sf,
    stride_zn,
    stride_zh,
    stride_rn,
    stride_rw,
    stride_rh,
    stride_ob,
    stride_oh,
    scale,
    eps,
    W: tl.constexpr,
    D: tl.constexpr,
    F: tl.constexpr,
    GROUP: tl.constexpr,
    BW: tl.constexpr,
    BD: tl.constexpr,
    BF: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_hk = tl.program_id(1).to(tl.int64)
    o_w = tl.arange(0, BW)
    o_d = tl.arange(0, BD)
    o_f = tl.arange(0, BF)
    m_d = o_d < D
    m_f = o_f < F
    m_fd = m_f[:, None] & m_d[None, :]
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
        cur_offs = slot * stride_rn + cur * stride_rw + i_hk * stride_rh + o_d
        # the key and value leaving the window (position pos - W) sit where the current ones go
        # (zeros while none has left: an unwritten entry must not reach the state, not even as 0 * nan)
        is_leaving = pos >= W
        b_kold = tl.load(ring_k_ptr + cur_offs, mask=m_d, other=0.0).to(tl.float32)
        b_vold = tl.load(ring_v_ptr + cur_offs, mask=m_d, other=0.0).to(tl.float32)
        b_kold = tl.where(is_leaving, b_kold, 0.0)
        b_vold = tl.where(is_leaving, b_vold, 0.0)
        b_knew = tl.load(k_ptr + i_b * stride_kb + i_hk * stride_kh + o_d, mask=m_d, other=0.0)
        b_vnew = tl.load(v_ptr + i_b * stride_vb + i_hk * stride_vh + o_d, mask=m_d, other=0.0)
        b_knew = b_knew.to(ring_k_ptr.dtype.element_ty)
        b_vnew = b_vnew.to(ring_v_ptr.dtype.element_ty)
        b_keys = tl.load(ring_k_ptr + ring_offs, mask=m_ring, other=0.0).to(tl.float32)
        b_values = tl.load(ring_v_ptr + ring_offs, mask=m_ring, other=0.0).to(tl.float32)
        b_keys = tl.where(is_cur, b_knew.to(tl.float32)[None, :], b_keys)
        b_values = tl.where(is_cur, b_vnew.to(tl.float32)[None, :], b_values)
        for j in range(GROUP):
            h = i_hk * GROUP + j
            # phi of the leaving key under this head's feature map: x = k_old Wk[h] [F]
            w_ptrs = wk_ptr + h * stride_wh + o_d[:, None] * stride_wd + o_f[None, :]
            b_w = tl.load(w_ptrs, mask=m_d[:, None] & m_f[None, :], other=0.0).to(tl.float32)  # [BD, BF]
            b_x = tl.sum(b_kold[:, None] * b_w, axis=0)
            b_phi_pos = tl.where(is_leaving, _phi_half(b_x, m_f, eps), 0.0)
            b_phi_neg = tl.where(is_leaving, _phi_half(-b_x, m_f, eps), 0.0)

            # S[h] [2F, D] as rows 0..F-1 (the softmax half) and F..2F-1 (the negated one); z[h] alike
            s_ptrs = linear_ptr + slot * stride_sn + h * stride_sh + o_f[:, None] * stride_sf + o_d[None, :]
            z_ptrs = norm_ptr + slot * stride_zn + h * stride_zh + o_f
            b_s_pos = tl.load(s_ptrs, mask=m_fd, other=0.0).to(tl.float32)
            b_s_neg = tl.load(s_ptrs + F * stride_sf, mask=m_fd, other=0.0).to(tl.float32)
            b_z_pos = tl.load(z_ptrs, mask=m_f, other=0.0).to(tl.float32)
            b_z_neg = tl.load(z_ptrs + F, mask=m_f, other=0.0).to(tl.float32)
            b_s_pos += b_phi_pos[:, None] * b_vold[None, :]
            b_s_neg += b_phi_neg[:, None] * b_vold[None, :]
            b_z_pos += b_phi_pos
            b_z_neg += b_phi_neg
            # Every load of this head's state completes before any thread overwrites it (threads may hold
            # replicas). While no key has left the window, this writes back the values it read.
            tl.debug_barrier()
            tl.store(s_ptrs, b_s_pos, mask=m_fd)
            tl.store(s_ptrs + F * stride_sf, b_s_neg, mask=m_fd)
            tl.store(z_ptrs, b_z_pos, mask=m_f)
            tl.store(z_ptrs + F, b_z_neg, mask=m_f)

            # window: unnormalised softmax over the ring, its max m only (the linear part is not rescaled)
            b_q = tl.load(q_ptr + i_b * stride_qb + h * stride_qh + o_d, mask=m_d, other=0.0).to(tl.float32)
            b_sc = tl.sum(b_keys * b_q[None, :], axis=1) * scale
            b_sc = tl.where(visible, b_sc, float("-inf"))
            b_p = tl.exp(b_sc - tl.max(b_sc, axis=0))
            b_p = tl.where(visible, b_p, 0.0)
            b_a = tl.sum(b_p[:, None] * b_values, axis=0)
            b_den = tl.sum(b_p, axis=0)

            pq_row = phi_q_ptr + i_b * stride_pqb + h * stride_pqh + o_f
            b_pq_pos = tl.load(pq_row, mask=m_f, other=0.0).to(tl.float32)
            b_pq_neg = tl.load(pq_row + F, mask=m_f, other=0.0).to(tl.float32)
            b_g = tl.load(gamma_ptr + h).to(tl.float32)
            b_num = b_g * b_a + tl.sum(b_pq_pos[:, None] * b_s_pos + b_pq_neg[:, None] * b_s_neg, axis=0)
            b_den = b_g * b_den + tl.sum(b_pq_pos * b_z_pos + b_pq_neg * b_z_neg, axis=0)
            tl.store(o_row + j * stride_oh, (b_num / b_den).to(o_ptr.dtype.element_ty), mask=m_d)
        # every head has read the leaving entry: only now the current key and value take its place
        tl.debug_barrier()
        tl.store(ring_k_ptr + cur_offs, b_knew, mask=m_d)
        tl.store(ring_v_ptr + cur_offs, b_vnew, mask=m_d)
    else:
        for j in range(GROUP):
            tl.store(o_row + j * stride_oh, tl.zeros([BD], dtype=tl.float32).to(o_ptr.dtype.element_ty), mask=m_d)


def lolcats_decode(
    q: torch.Tensor,
    phi_q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_weight: torch.Tensor,
    gamma: torch.Tensor,
    linear: torch.Tensor,
    normalizer: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    slot_ids: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    eps: float,
) -> torch.Tensor:
    """q [B, H, D], k, v [B, Hk, D] (RoPE'd); phi_q [B, H, 2F]; k_weight [H, D, F]; gamma [H]; rows slot_ids of
    linear [N, H, 2F, D], normalizer [N, H, 2F] (fp32), ring_k, ring_v [N, W, Hk, D] updated in place (0 or a
    negative id: padding, skipped, output zeros); positions [B]. Returns o [B, H, D] fp32."""
    _check_ring(q, k, v, ring_k, ring_v)
    B, H, D = q.shape
    N, W, Hk = ring_k.shape[0], ring_k.shape[1], ring_k.shape[2]
    if k_weight.dim() != 3 or k_weight.shape[:2] != (H, D):
        raise ValueError(f"expected k_weight [{H}, {D}, F], got {tuple(k_weight.shape)}")
    F = k_weight.shape[2]
    if phi_q.shape != (B, H, 2 * F):
        raise ValueError(f"expected phi_q of shape {(B, H, 2 * F)}, got {tuple(phi_q.shape)}")
    if gamma.shape != (H,):
        raise ValueError(f"expected gamma of shape {(H,)}, got {tuple(gamma.shape)}")
    if linear.shape != (N, H, 2 * F, D) or linear.dtype != torch.float32 or linear.stride(-1) != 1:
        raise ValueError(
            f"expected an fp32 linear state [{N}, {H}, {2 * F}, {D}] with contiguous rows, got {linear.dtype} "
            f"{tuple(linear.shape)} strides {tuple(linear.stride())}"
        )
    if normalizer.shape != (N, H, 2 * F) or normalizer.dtype != torch.float32 or normalizer.stride(-1) != 1:
        raise ValueError(
            f"expected an fp32 normalizer [{N}, {H}, {2 * F}] with contiguous rows, got {normalizer.dtype} "
            f"{tuple(normalizer.shape)} strides {tuple(normalizer.stride())}"
        )
    if slot_ids.shape != (B,) or positions.shape != (B,):
        raise ValueError(
            f"expected slot_ids and positions of shape {(B,)}, got {tuple(slot_ids.shape)} and {tuple(positions.shape)}"
        )
    # k, v feed only the ring and the window: rounded to the ring's dtype here, where torch rounds to nearest
    # even (see window_attn_decode); a no-op in the model, whose ring holds k and v in their own dtype.
    q, phi_q, k, v = _rows(q), _rows(phi_q), _rows(k.to(ring_k.dtype)), _rows(v.to(ring_v.dtype))
    k_weight, gamma = _rows(k_weight), gamma.contiguous()
    o = q.new_empty(B, H, D, dtype=torch.float32)
    if B == 0:
        return o
    BW, BD, BF = triton.next_power_of_2(W), triton.next_power_of_2(D), triton.next_power_of_2(F)
    _lolcats_decode_kernel[(B, Hk)](
        q,
        phi_q,
        k,
        v,
        k_weight,
        gamma,
        linear,
        normalizer,
        ring_k,
        ring_v,
        slot_ids.to(torch.int64),
        positions.to(torch.int64),
        o,
        q.stride(0),
        q.stride(1),
        phi_q.stride(0),
        phi_q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_weight.stride(0),
        k_weight.stride(1),
        linear.stride(0),
        linear.stride(1),
        linear.stride(2),
        normalizer.stride(0),
        normalizer.stride(1),
        ring_k.stride(0),
        ring_k.stride(1),
        ring_k.stride(2),
        o.stride(0),
        o.stride(1),
        float(scale),
        float(eps),
        W=W,
        D=D,
        F=F,
        GROUP=H // Hk,
        BW=BW,
        BD=BD,
        BF=BF,
        # keys and values [BW, BD] each, the two state halves [BF, BD] and k_weight [BD, BF] of one head
        num_warps=num_warps_for(2 * BW * BD + 3 * BF * BD),
    )
    return o

"""Sliding-window softmax attention over the flat varlen batch, keys of earlier calls kept in a ring.

The window is W keys INCLUDING the current one: query at position p sees keys p-W+1 .. p. (Pitfall:
FlashAttention's window_size=(64, 64), which older transformers passed for sliding_window=64, admits 65
keys, 64 to the left plus the current one. tests/kernels/test_window_attn.py pins ours at 64.)

Each sequence's ring [W, Hk, D] (row slot of ring_k / ring_v) holds the key and value of position p at
index p % W. A sequence at start position p has its last min(p, W) keys there; W-1 of them are all any
query can still see.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from linrec.kernels.gla import gla_varlen
from linrec.kernels.varlen import split_single_tokens
from linrec.kernels.window_attn.decode import liger_attention_decode, window_attn_decode

if TYPE_CHECKING:  # kernels take the batch layout by duck typing; they never import models at run time
    from linrec.models.batch import ForwardBatch

# Queries per block on the prefill path: scores stay [H, BLOCK, BLOCK + W - 1] whatever the chunk length.
QUERY_BLOCK = 256


def window_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
    backend: str = "torch",
) -> torch.Tensor:
    """q [T, H, D]; k, v [T, Hk, D]; ring_k, ring_v [N, W, Hk, D] (rows batch.slot_ids updated in place
    with each sequence's last min(len, W) keys and values). Returns o [T, H, D] in q's dtype.
    """
    if backend not in ("torch", "triton"):
        raise ValueError(f"expected backend 'torch' or 'triton', got {backend!r}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"expected query heads divisible by key/value heads, got H={q.shape[1]}, Hk={k.shape[1]}")
    if batch.is_decode:
        # triton: the in-place ring kernel (on the CPU it needs TRITON_INTERPRET=1)
        decode = window_attn_decode if backend == "triton" else _decode
        return decode(q, k, v, ring_k, ring_v, batch.slot_ids, batch.positions, scale).to(q.dtype)
    o = torch.empty_like(q)
    split = split_single_tokens(batch)
    if split is not None:  # the 1-token sequences as one step, the longer ones per sequence
        for sub, rows in split:
            o[rows] = window_attn_varlen(q[rows], k[rows], v[rows], ring_k, ring_v, sub, scale, backend)
        return o
    lo = 0
    for n, slot, start in zip(batch.seq_lens, batch.slot_ids_host, batch.start_positions):
        hi = lo + n
        o[lo:hi] = _prefill_one(q[lo:hi], k[lo:hi], v[lo:hi], ring_k, ring_v, max(slot, 0), start, scale)
        lo = hi
    return o


def liger_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    batch: ForwardBatch,
    window_scale: float,
    backend: str = "torch",
) -> torch.Tensor:
    """Liger attention: 0.5 * window attention + 0.5 * GLA (scale 1), [T, H, D] fp32.

    q [T, H, D], k [T, Hk, D] (RoPE'd) and v [T, Hk, D] feed the window over ring_k, ring_v [N, W, Hk, D];
    phi_q [T, H, D], phi_k [T, Hk, D] (feature-mapped, pre-RoPE) and g [T, Hk, D] (log decays) with v
    feed the GLA state [N, Hk, D, D] fp32. Rows batch.slot_ids updated in place. A decode step on the
    triton backend runs as one fused kernel; everything else runs the two ops and mixes.
    """
    if backend == "triton" and batch.is_decode:
        return liger_attention_decode(
            q, k, v, phi_q, phi_k, g, state, ring_k, ring_v, batch.slot_ids, batch.positions, window_scale
        )
    window = window_attn_varlen(q, k, v, ring_k, ring_v, batch, window_scale, backend=backend)
    recurrent = gla_varlen(phi_q, phi_k, v.float(), g, state, batch, scale=1.0, backend=backend)
    return 0.5 * window.float() + 0.5 * recurrent


def _prefill_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    slot: int,
    start: int,
    scale: float,
) -> torch.Tensor:
    """One sequence of n tokens at positions start .. start+n-1; reads the ring, then writes it."""
    n, H, D = q.shape
    W, Hk = ring_k.shape[1], ring_k.shape[2]
    group = H // Hk
    num_past = min(start, W - 1)
    past = torch.arange(start - num_past, start, device=q.device) % W
    # The current keys go through the ring's dtype too, so a prefill sees exactly what a later decode reads.
    keys = torch.cat([ring_k[slot, past], k.to(ring_k.dtype)]).float()  # [num_past + n, Hk, D]
    values = torch.cat([ring_v[slot, past], v.to(ring_v.dtype)]).float()
    key_pos = torch.arange(start - num_past, start + n, device=q.device)
    o = torch.empty(n, H, D, dtype=torch.float32, device=q.device)
    for a in range(0, n, QUERY_BLOCK):
        b = min(a + QUERY_BLOCK, n)
        # keys of this block: index num_past + a - (W-1) .. num_past + b - 1 of `keys`
        k_lo, k_hi = max(0, num_past + a - (W - 1)), num_past + b
        query_pos = torch.arange(start + a, start + b, device=q.device)
        offset = query_pos[:, None] - key_pos[None, k_lo:k_hi]  # [b-a, m]
        visible = (offset >= 0) & (offset < W)
        qb = q[a:b].float().reshape(b - a, Hk, group, D).permute(1, 2, 0, 3)  # [Hk, G, b-a, D]
        kb = keys[k_lo:k_hi].permute(1, 2, 0)  # [Hk, D, m]
        scores = scale * (qb @ kb[:, None])  # [Hk, G, b-a, m]
        weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        ob = weights @ values[k_lo:k_hi].transpose(0, 1)[:, None]  # [Hk, G, b-a, D]
        o[a:b] = ob.permute(2, 0, 1, 3).reshape(b - a, H, D)
    keep = min(n, W)
    ring_idx = torch.arange(start + n - keep, start + n, device=q.device) % W
    ring_k[slot, ring_idx] = k[n - keep :].to(ring_k.dtype)
    ring_v[slot, ring_idx] = v[n - keep :].to(ring_v.dtype)
    return o.to(q.dtype)


def _decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    slot_ids: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One token per sequence, all at once: write the new key at position % W, then attend over the ring.

    After the write, ring index j of a sequence at position p holds position p - ((p - j) mod W), the
    window's W most recent positions; entries that would be negative positions were never written.
    Padding rows use slot 0 (a negative id is read as 0). Returns o [B, H, D] fp32.
    """
    B, H, D = q.shape
    W, Hk = ring_k.shape[1], ring_k.shape[2]
    slots = slot_ids.clamp_min(0)
    idx = positions % W
    ring_k.index_put_((slots, idx), k.to(ring_k.dtype))
    ring_v.index_put_((slots, idx), v.to(ring_v.dtype))
    keys = ring_k[slots].float()  # [B, W, Hk, D]
    values = ring_v[slots].float()
    held = positions[:, None] - (positions[:, None] - torch.arange(W, device=q.device)) % W  # [B, W]
    visible = held >= 0
    qb = q.float().reshape(B, Hk, H // Hk, D)
    scores = scale * torch.einsum("bhgd,bwhd->bhgw", qb, keys)
    weights = scores.masked_fill(~visible[:, None, None, :], float("-inf")).softmax(dim=-1)
    return torch.einsum("bhgw,bwhd->bhgd", weights, values).reshape(B, H, D)

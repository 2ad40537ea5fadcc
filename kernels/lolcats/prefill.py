"""LoLCATs attention over one sequence's chunk, in the chunked parallel form (torch, fp32), from and to the pool.

The pool keeps, per sequence: the ring [W, Hk, D] of the last W keys and values (position p at index p % W, as
in window_attn), the linear state S [H, 2F, D] and normaliser z [H, 2F] of every older key. A chunk at positions
start .. start+n-1 reads the ring's last min(start, W) keys: the query at position t enters key t - W into the
linear part before it reads it (exactly what a decode step does), so the linear part is plain causal linear
attention without decay over the "entering" keys start-W .. start+n-1-W, and the window part is softmax
attention over the last W keys, both computed in blocks.
"""

from __future__ import annotations

import torch

from linrec.kernels.lolcats.naive import hedgehog_features

# Queries per block: window scores stay [H, BLOCK, BLOCK + W - 1], linear ones [H, BLOCK, BLOCK].
QUERY_BLOCK = 128


def window_sums(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, num_past: int, window: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised sliding-window softmax over the window max m: q [n, H, D] are the queries of the last n of
    keys, values [num_past + n, Hk, D] fp32. Returns (sum_s exp(sc_s - m) v_s [n, H, D], sum_s exp(sc_s - m) [n, H])."""
    n, H, D = q.shape
    Hk = keys.shape[1]
    group = H // Hk
    num = torch.empty(n, H, D, dtype=torch.float32, device=q.device)
    den = torch.empty(n, H, dtype=torch.float32, device=q.device)
    key_pos = torch.arange(num_past + n, device=q.device)
    for a in range(0, n, QUERY_BLOCK):
        b = min(a + QUERY_BLOCK, n)
        k_lo, k_hi = max(0, num_past + a - (window - 1)), num_past + b
        offset = (num_past + torch.arange(a, b, device=q.device))[:, None] - key_pos[None, k_lo:k_hi]
        visible = (offset >= 0) & (offset < window)  # [b-a, m]
        qb = q[a:b].float().reshape(b - a, Hk, group, D).permute(1, 2, 0, 3)  # [Hk, G, b-a, D]
        scores = scale * (qb @ keys[k_lo:k_hi].permute(1, 2, 0)[:, None])  # [Hk, G, b-a, m]
        scores = scores.masked_fill(~visible, float("-inf"))
        p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # the current key is always visible
        num[a:b] = (p @ values[k_lo:k_hi].transpose(0, 1)[:, None]).permute(2, 0, 1, 3).reshape(b - a, H, D)
        den[a:b] = p.sum(-1).permute(2, 0, 1).reshape(b - a, H)
    return num, den


def linear_sums(
    phi_q: torch.Tensor, phi_e: torch.Tensor, v_e: torch.Tensor, S: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal linear attention without decay: query i reads S, z plus the entering keys 0..i (inclusive).
    phi_q, phi_e [n, H, 2F]; v_e [n, H, D]; S [H, 2F, D], z [H, 2F] fp32. Returns (numerators [n, H, D],
    denominators [n, H], final S, final z)."""
    n, H, D = v_e.shape
    num = torch.empty(n, H, D, dtype=torch.float32, device=v_e.device)
    den = torch.empty(n, H, dtype=torch.float32, device=v_e.device)
    for a in range(0, n, QUERY_BLOCK):
        b = min(a + QUERY_BLOCK, n)
        pq, pe, ve = phi_q[a:b], phi_e[a:b], v_e[a:b]
        causal = torch.ones(b - a, b - a, dtype=torch.bool, device=v_e.device).tril()
        att = torch.einsum("ihf,jhf->hij", pq, pe).masked_fill(~causal, 0.0)  # [H, b-a, b-a]
        num[a:b] = torch.einsum("hij,jhd->ihd", att, ve) + torch.einsum("ihf,hfd->ihd", pq, S)
        den[a:b] = att.sum(-1).T + torch.einsum("ihf,hf->ih", pq, z)
        S = S + torch.einsum("jhf,jhd->hfd", pe, ve)
        z = z + pe.sum(0)
    return num, den, S, z


def lolcats_prefill_one(
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
    slot: int,
    start: int,
    scale: float,
    eps: float,
) -> torch.Tensor:
    """One sequence of n tokens at positions start .. start+n-1. q [n, H, D], k, v [n, Hk, D] (RoPE'd);
    phi_q [n, H, 2F]; k_weight [H, D, F]; gamma [H]; pool rows `slot` of linear [N, H, 2F, D], normalizer
    [N, H, 2F], ring_k, ring_v [N, W, Hk, D] are read, then written. Returns o [n, H, D] fp32."""
    n, H, D = q.shape
    W, Hk = ring_k.shape[1], ring_k.shape[2]
    group = H // Hk
    num_past = min(start, W)
    past = torch.arange(start - num_past, start, device=q.device) % W
    # The chunk's keys go through the ring's dtype too, so a prefill sees exactly what a later decode reads.
    keys = torch.cat([ring_k[slot, past], k.to(ring_k.dtype)]).float()  # [num_past + n, Hk, D]
    values = torch.cat([ring_v[slot, past], v.to(ring_v.dtype)]).float()
    w_num, w_den = window_sums(q, keys, values, num_past, W, scale)

    # Query i (position start+i) enters key start+i-W, index num_past+i-W of `keys`, when that is >= 0.
    first = max(0, W - num_past)  # queries before it have no key entering
    phi_e = torch.zeros(n, H, phi_q.shape[-1], dtype=torch.float32, device=q.device)
    v_e = torch.zeros(n, H, D, dtype=torch.float32, device=q.device)
    if first < n:
        lo, hi = num_past + first - W, num_past + n - W
        phi_e[first:] = hedgehog_features(keys[lo:hi].repeat_interleave(group, dim=1), k_weight, eps)
        v_e[first:] = values[lo:hi].repeat_interleave(group, dim=1)
    l_num, l_den, S, z = linear_sums(phi_q.float(), phi_e, v_e, linear[slot].float(), normalizer[slot].float())
    linear[slot] = S
    normalizer[slot] = z

    keep = min(n, W)
    ring_idx = torch.arange(start + n - keep, start + n, device=q.device) % W
    ring_k[slot, ring_idx] = k[n - keep :].to(ring_k.dtype)
    ring_v[slot, ring_idx] = v[n - keep :].to(ring_v.dtype)
    g = gamma.float()
    return (g[:, None] * w_num + l_num) / (g * w_den + l_den)[..., None]

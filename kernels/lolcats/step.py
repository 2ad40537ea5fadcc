"""LoLCATs attention for one token per sequence, all at once (torch): the decode path of the torch backend.

A token at position p first enters the key that leaves its window, position p - W (ring index p % W, the
entry it then overwrites), into the linear state, then attends over the ring's W most recent keys, its own
included (the released decode's order: evict, then attend).
"""

from __future__ import annotations

import torch

from linrec.kernels.lolcats.naive import hedgehog_features


def lolcats_step(
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
    linear [N, H, 2F, D], normalizer [N, H, 2F], ring_k, ring_v [N, W, Hk, D] updated in place (0 or a
    negative id: padding, which reads and writes the null row 0). Returns o [B, H, D] fp32."""
    B, H, D = q.shape
    W, Hk = ring_k.shape[1], ring_k.shape[2]
    group = H // Hk
    slots = slot_ids.clamp_min(0)
    idx = positions % W
    leaving = (positions >= W).float()[:, None, None]  # [B, 1, 1]: a key leaves the window
    old_k = ring_k[slots, idx].float().repeat_interleave(group, dim=1)  # [B, H, D]
    old_v = ring_v[slots, idx].float().repeat_interleave(group, dim=1)
    phi_old = hedgehog_features(old_k, k_weight, eps) * leaving  # [B, H, 2F]
    F2 = phi_old.shape[-1]
    pq = phi_q.float()
    # The state is the largest thing a step moves (per query head: [H, 2F, D] fp32), so it is gathered once, read
    # by the queries before the update (S_new . phi_q = S . phi_q + (phi_old . phi_q) old_v), updated in place on
    # the gathered copy and written back once, instead of gather + outer product + add + scatter.
    S = linear.index_select(0, slots)  # [B, H, 2F, D]
    lin_num = torch.bmm(pq.reshape(B * H, 1, F2), S.view(B * H, F2, D)).view(B, H, D)
    lin_num = lin_num + (pq * phi_old).sum(-1, keepdim=True) * old_v
    S.view(B * H, F2, D).baddbmm_(phi_old.reshape(B * H, F2, 1), old_v.reshape(B * H, 1, D))
    linear.index_copy_(0, slots, S)
    z = normalizer.index_select(0, slots) + phi_old
    normalizer.index_copy_(0, slots, z)

    ring_k.index_put_((slots, idx), k.to(ring_k.dtype))
    ring_v.index_put_((slots, idx), v.to(ring_v.dtype))
    keys = ring_k.index_select(0, slots).float()  # [B, W, Hk, D]
    values = ring_v.index_select(0, slots).float()
    held = positions[:, None] - (positions[:, None] - torch.arange(W, device=q.device)) % W  # [B, W]
    qb = q.float().reshape(B, Hk, group, D)
    scores = scale * torch.einsum("bhgd,bwhd->bhgw", qb, keys)
    scores = scores.masked_fill(~(held >= 0)[:, None, None, :], float("-inf"))
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    w_num = torch.einsum("bhgw,bwhd->bhgd", p, values).reshape(B, H, D)
    w_den = p.sum(-1).reshape(B, H)
    g = gamma.float()
    num = g[:, None] * w_num + lin_num
    den = g * w_den + torch.einsum("bhf,bhf->bh", pq, z)
    return num / den[..., None]

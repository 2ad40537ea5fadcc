"""LoLCATs attention (arXiv 2410.10254): softmax over a sliding window plus Hedgehog linear attention over every
older key, with one shared normaliser. The fp32 token-by-token reference.

Per query head h (KV head h // (H // Hk)), query at position t, keys at positions s <= t:
    phi(x)   = clamp(cat[softmax(x W), softmax(-x W)], eps)          W [D, F] per head: phi(x) [2F]
    window   = {s : t - window < s <= t}      (64 keys INCLUDING the current one)
    linear   = {s : s <= t - window}           (every key that has left the window)
    sc_s     = scale * q_t . k_s,  m = max_{s in window} sc_s
    a_s      = gamma * exp(sc_s - m)          for s in window
             = phi(q_t) . phi(k_s)             for s in linear    (phi with W_q for q, W_k for k)
    o_t      = sum_s a_s v_s / sum_s a_s
gamma = sigmoid(window factor) per head. m is the window's max only: the linear terms are not rescaled by it,
so it is part of the math (a different stabiliser would weigh the two parts differently), as in the released
code. These are the released sliding-window (`_sw`) semantics, which the released decode computes.
"""

from __future__ import annotations

import torch


def hedgehog_features(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H, D], weight [H, D, F] -> phi(x) [..., H, 2F] fp32: cat[softmax(xW), softmax(-xW)], clamped."""
    y = torch.einsum("...hd,hdf->...hf", x.float(), weight.float())
    return torch.cat([y.softmax(dim=-1), (-y).softmax(dim=-1)], dim=-1).clamp_min(eps)


def naive_lolcats_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    gamma: torch.Tensor,
    window: int,
    scale: float,
    eps: float,
    linear: torch.Tensor | None = None,
    normalizer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence. q [T, H, D] are the queries of the LAST T positions of k, v [P+T, Hk, D] (RoPE'd; P
    earlier keys first, none of them in the initial state yet); q_weight, k_weight [H, D, F]; gamma [H];
    linear [H, 2F, D] and normalizer [H, 2F] the initial state (the keys before k's first, zeros if None).
    Returns o [T, H, D] fp32 and the final linear state and normaliser (every key but the last `window`).
    """
    T, H, D = q.shape
    num_keys, Hk = k.shape[0], k.shape[1]
    if H % Hk:
        raise ValueError(f"expected query heads divisible by key/value heads, got H={H}, Hk={Hk}")
    if num_keys < T:
        raise ValueError(f"expected at least as many keys as queries, got {num_keys} keys for {T} queries")
    group = H // Hk
    F2 = 2 * q_weight.shape[-1]
    S = torch.zeros(H, F2, D) if linear is None else linear.float().clone()
    z = torch.zeros(H, F2) if normalizer is None else normalizer.float().clone()
    keys = k.float().repeat_interleave(group, dim=1)  # [P+T, H, D]
    values = v.float().repeat_interleave(group, dim=1)
    phi_q = hedgehog_features(q, q_weight, eps)  # [T, H, 2F]
    phi_k = hedgehog_features(keys, k_weight, eps)  # [P+T, H, 2F]
    g = gamma.float()[:, None]  # [H, 1]
    num_past = num_keys - T
    o = q.new_empty(T, H, D, dtype=torch.float32)
    for t in range(T):
        pos = num_past + t
        lo = max(0, pos - window + 1)  # first key of the window; keys before it are linear
        scores = scale * torch.einsum("hd,nhd->hn", q[t].float(), keys[lo : pos + 1])  # [H, n]
        a_window = g * torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        a_linear = torch.einsum("hf,nhf->hn", phi_q[t], phi_k[:lo])  # [H, lo]
        num = torch.einsum("hn,nhd->hd", a_window, values[lo : pos + 1]) + torch.einsum(
            "hn,nhd->hd", a_linear, values[:lo]
        )
        num = num + torch.einsum("hf,hfd->hd", phi_q[t], S)
        den = a_window.sum(-1) + a_linear.sum(-1) + torch.einsum("hf,hf->h", phi_q[t], z)
        o[t] = num / den[:, None]
    done = max(0, num_keys - window)  # keys that left the last query's window
    S = S + torch.einsum("nhf,nhd->hfd", phi_k[:done], values[:done])
    z = z + phi_k[:done].sum(0)
    return o, S, z

"""Sliding-window softmax attention with grouped KV heads: the fp32 token-by-token reference.

Query t attends to the last `window` keys up to and including its own position:
    o_t = sum_{t-window < s <= t} softmax_s(scale * q_t . k_s) v_s
Liger uses window = 64. (FlashAttention's window_size=(64, 64), which older transformers passed for
sliding_window=64, admits 65 keys: 64 to the left plus the current one. Ours is 64 keys in all.)
"""

from __future__ import annotations

import torch


def naive_window_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float,
) -> torch.Tensor:
    """One sequence. q [T, H, D] are the queries of the LAST T positions of k, v [P+T, Hk, D]
    (P earlier keys first); query head h reads KV head h // (H // Hk). Returns o [T, H, D] fp32.
    """
    T, H, D = q.shape
    num_keys, Hk = k.shape[0], k.shape[1]
    if H % Hk:
        raise ValueError(f"expected query heads divisible by key/value heads, got H={H}, Hk={Hk}")
    if num_keys < T:
        raise ValueError(f"expected at least as many keys as queries, got {num_keys} keys for {T} queries")
    if window < 1:
        raise ValueError(f"expected window >= 1, got {window}")
    group = H // Hk
    num_past = num_keys - T
    o = q.new_empty(T, H, D, dtype=torch.float32)
    for t in range(T):
        pos = num_past + t
        lo = max(0, pos - window + 1)
        keys = k[lo : pos + 1].float().repeat_interleave(group, dim=1)  # [n, H, D]
        values = v[lo : pos + 1].float().repeat_interleave(group, dim=1)
        weights = torch.softmax(scale * torch.einsum("hd,nhd->hn", q[t].float(), keys), dim=-1)
        o[t] = torch.einsum("hn,nhd->hd", weights, values)
    return o

"""Gated linear attention with grouped states: the fp32 token-by-token reference.

S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t
One state per key/value head serves its group of H // Hk query heads (Liger-GLA keeps the
k, v and gates of the KV heads; fla GLA has H == Hk).
"""

from __future__ import annotations

import torch


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence. q [T, H, K]; k, g [T, Hk, K]; v [T, Hk, V]; g is the log decay (<= 0);
    initial_state [Hk, K, V]. Returns o [T, H, V] fp32 and the final state [Hk, K, V] fp32.
    """
    T, H, K = q.shape
    Hk, V = v.shape[1], v.shape[2]
    if H % Hk:
        raise ValueError(f"expected query heads divisible by key/value heads, got H={H}, Hk={Hk}")
    group = H // Hk
    S = initial_state.float().clone() if initial_state is not None else q.new_zeros(Hk, K, V, dtype=torch.float32)
    o = q.new_empty(T, H, V, dtype=torch.float32)
    for t in range(T):
        S = S * g[t].float().exp()[..., None] + k[t].float()[..., None] * v[t].float()[:, None, :]
        S_per_query_head = S.repeat_interleave(group, dim=0)  # [H, K, V]
        o[t] = scale * torch.einsum("hk,hkv->hv", q[t].float(), S_per_query_head)
    return o, S

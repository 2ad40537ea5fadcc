"""The gated delta rule (Gated DeltaNet, Yang et al. 2024): the fp32 token-by-token reference.

State layout [HV, K, V] (key-first; fla's state_v_first layout is its transpose). Per value head:
    S' = exp(g_t) S_{t-1}                       decay
    u_t = beta_t (v_t - k_t S')                 the delta: what S' predicts for k_t, corrected towards v_t
    S_t = S' + k_t^T u_t                        i.e. S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t
    o_t = scale * q_t S_t
Grouped value heads (GVA, fla's num_v_heads > num_heads): value head j reads query/key head j // (HV // H).
"""

from __future__ import annotations

import torch


def check_gva(num_heads: int, num_v_heads: int) -> int:
    """Value heads per query/key head; raises unless num_v_heads is a multiple of num_heads."""
    if num_v_heads % num_heads:
        raise ValueError(f"expected num_v_heads a multiple of num_heads, got HV={num_v_heads}, H={num_heads}")
    return num_v_heads // num_heads


def naive_recurrent_gated_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence. q, k [T, H, K]; v [T, HV, V]; g (log decay, <= 0), beta [T, HV];
    initial_state [HV, K, V]. Returns o [T, HV, V] fp32 and the final state [HV, K, V] fp32.
    """
    T, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    group = check_gva(H, HV)
    q = q.float().repeat_interleave(group, dim=1)  # [T, HV, K]
    k = k.float().repeat_interleave(group, dim=1)
    S = initial_state.float().clone() if initial_state is not None else q.new_zeros(HV, K, V)
    o = q.new_empty(T, HV, V)
    for t in range(T):
        S = S * g[t].float().exp()[:, None, None]
        prediction = torch.einsum("hk,hkv->hv", k[t], S)
        u = beta[t].float()[:, None] * (v[t].float() - prediction)
        S = S + k[t][:, :, None] * u[:, None, :]
        o[t] = scale * torch.einsum("hk,hkv->hv", q[t], S)
    return o, S

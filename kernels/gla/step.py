"""One-token gated linear attention step for a whole decode batch: the torch decode path.

The Triton decode kernel (decode.py, kernels issue) updates the pool in place; this path gathers the
batch's rows, updates them and scatters them back.
"""

from __future__ import annotations

import torch


def gla_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """q [B, H, K]; k, g [B, Hk, K]; v [B, Hk, V]; state [N, Hk, K, V] fp32; slot_ids [B].

    Row slot_ids[b] of `state` advances by one token. Real slots must be distinct; padding rows use
    slot 0 (the null slot) and a negative id is read as 0, so neither touches a request's state.
    Returns o [B, H, V] fp32.
    """
    B, H, K = q.shape
    Hk, V = v.shape[1], v.shape[2]
    if H % Hk:
        raise ValueError(f"expected query heads divisible by key/value heads, got H={H}, Hk={Hk}")
    slots = slot_ids.clamp_min(0)
    S = state.index_select(0, slots).float()  # [B, Hk, K, V]
    S = S * g.float().exp()[..., None] + k.float()[..., None] * v.float()[..., None, :]
    o = scale * (q.float().reshape(B, Hk, H // Hk, K) @ S)  # [B, Hk, G, V]
    state.index_copy_(0, slots, S.to(state.dtype))
    return o.reshape(B, H, V)

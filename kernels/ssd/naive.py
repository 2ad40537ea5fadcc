"""Mamba2's selective state space update (SSD) for one sequence: the fp32 token-by-token reference.

Per head h, with a state h_t [P, N] (P = headdim, N = dstate):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T
    y_t = h_t C_t + D * x_t

Heads share B and C within a group as grouped-query attention shares keys: head h reads group
h // (H // G). dt arrives ready to use: the model applies softplus(dt + dt_bias) and the
time_step_limit clamp, so every implementation of this op (naive, chunked, Triton) sees one step size
and none of them repeats the model's parametrization.
"""

from __future__ import annotations

import torch


def check_ssd_shapes(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> int:
    """Validate x [T, H, P], dt [T, H], A [H], B and C [T, G, N]; return heads per group H // G."""
    T, H, _ = x.shape
    if dt.shape != (T, H):
        raise ValueError(f"expected dt of shape {(T, H)} to match x {tuple(x.shape)}, got {tuple(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"expected A of shape {(H,)}, got {tuple(A.shape)}")
    if B.dim() != 3 or B.shape[0] != T or B.shape != C.shape:
        raise ValueError(f"expected B and C of shape [T={T}, G, N], got {tuple(B.shape)} and {tuple(C.shape)}")
    G = B.shape[1]
    if H % G:
        raise ValueError(f"expected heads divisible by groups, got H={H}, G={G}")
    return H // G


def naive_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence. x [T, H, P]; dt [T, H] (> 0, final step size); A [H] (< 0); B, C [T, G, N];
    D [H] or None; initial_state [H, P, N]. Returns y [T, H, P] fp32 and the final state [H, P, N] fp32.
    """
    heads_per_group = check_ssd_shapes(x, dt, A, B, C)
    T, H, P = x.shape
    N = B.shape[2]
    h = (
        initial_state.float().clone()
        if initial_state is not None
        else torch.zeros(H, P, N, dtype=torch.float32, device=x.device)
    )
    y = torch.empty(T, H, P, dtype=torch.float32, device=x.device)
    for t in range(T):
        x_t, dt_t = x[t].float(), dt[t].float()  # [H, P], [H]
        B_t = B[t].float().repeat_interleave(heads_per_group, dim=0)  # [H, N]
        C_t = C[t].float().repeat_interleave(heads_per_group, dim=0)  # [H, N]
        decay = torch.exp(dt_t * A.float())  # [H]
        h = decay[:, None, None] * h + (dt_t[:, None] * x_t)[:, :, None] * B_t[:, None, :]
        y[t] = torch.einsum("hpn,hn->hp", h, C_t)
        if D is not None:
            y[t] += D.float()[:, None] * x_t
    return y, h

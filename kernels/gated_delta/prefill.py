"""The gated delta rule in chunks (WY / UT transform, fp32 torch), and the batched single-token step.

Within a chunk of C tokens starting from state S0, with gamma_i = g_1 + ... + g_i (chunk-local
cumulative log decay), unrolling the recurrence of naive.py gives, for the deltas u_j:
    u_i + beta_i sum_{j<i} exp(gamma_i - gamma_j) (k_i . k_j) u_j = beta_i v_i - beta_i exp(gamma_i) k_i S0
a unit lower-triangular system (I + A) U = beta V - (beta exp(gamma) K) S0. Solving it once per chunk
for both right-hand sides (the UT transform) gives U = U_v - W S0 with U_v, W independent of S0, so
    O     = scale * ( (exp(gamma) Q) S0 + (Q K^T * D) U ),   D_ij = exp(gamma_i - gamma_j) for j <= i, else 0
    S_C   = exp(gamma_C) S0 + (exp(gamma_C - gamma) K)^T U
Every exponent is <= 0 (decays are log values <= 0), so nothing overflows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from linrec.kernels.gated_delta.naive import check_gva

if TYPE_CHECKING:  # kernels take the batch layout by duck typing; they never import models at run time
    from linrec.models.batch import ForwardBatch

CHUNK_SIZE = 64


def chunk_gated_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor,
    scale: float = 1.0,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B right-padded sequences of length L. q, k [B, L, H, K]; v [B, L, HV, V]; g, beta [B, L, HV];
    initial_state [B, HV, K, V]. Padding tokens must have beta = 0 and g = 0: they then leave the state
    unchanged. Returns o [B, L, HV, V] fp32 and the final states [B, HV, K, V] fp32.
    """
    B, L, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    group = check_gva(H, HV)
    # head-major fp32: [B, HV, L, *]
    q = q.float().repeat_interleave(group, dim=2).transpose(1, 2)
    k = k.float().repeat_interleave(group, dim=2).transpose(1, 2)
    v = v.float().transpose(1, 2)
    g = g.float().transpose(1, 2)
    beta = beta.float().transpose(1, 2)
    S = initial_state.float().clone()
    o = q.new_empty(B, HV, L, V)
    for lo in range(0, L, chunk_size):
        hi = min(lo + chunk_size, L)
        C = hi - lo
        qc, kc, vc, bc = q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], beta[:, :, lo:hi]
        gamma = g[:, :, lo:hi].cumsum(-1)  # [B, HV, C]
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        diff = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf"))
        decay = diff.exp()  # D: [B, HV, C, C], zero above the diagonal

        strictly_lower = (kc @ kc.transpose(-1, -2)) * decay * bc[..., :, None]
        system = strictly_lower.tril(-1) + torch.eye(C, device=q.device)
        rhs = torch.cat([bc[..., None] * vc, (bc * gamma.exp())[..., None] * kc], dim=-1)  # [B, HV, C, V+K]
        solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        u = solved[..., :V] - solved[..., V:] @ S  # U = U_v - W S0: [B, HV, C, V]

        o[:, :, lo:hi] = scale * ((qc * gamma.exp()[..., None]) @ S + ((qc @ kc.transpose(-1, -2)) * decay) @ u)
        gamma_last = gamma[..., -1:]  # [B, HV, 1]
        S = gamma_last.exp()[..., None] * S + (kc * (gamma_last - gamma).exp()[..., None]).transpose(-1, -2) @ u
    return o.transpose(1, 2), S


def chunk_gated_delta_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    batch: ForwardBatch,
    scale: float = 1.0,
) -> torch.Tensor:
    """Any varlen batch, in one padded chunked pass. q, k [T, H, K]; v [T, HV, V]; g, beta [T, HV];
    state [N, HV, K, V] fp32, rows batch.slot_ids updated in place. Returns o [T, HV, V] in v's dtype.
    """
    T = q.shape[0]
    num_seqs = batch.num_seqs
    device = q.device
    slots = batch.slot_ids.to(device)
    initial = state[slots]
    if num_seqs == 1:
        o, final = chunk_gated_delta(q[None], k[None], v[None], g[None], beta[None], initial, scale)
        state[slots] = final.to(state.dtype)
        return o[0].to(v.dtype)

    cu = batch.cu_seqlens.to(device)
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), cu[1:] - cu[:-1], output_size=T)
    local = torch.arange(T, device=device) - cu[seq_of_token]
    L = batch.max_seqlen

    def pad(x: torch.Tensor) -> torch.Tensor:
        # zeros past each sequence's end: beta = 0 and g = 0 there, so padding leaves the state as it was
        out = x.new_zeros(num_seqs, L, *x.shape[1:])
        out[seq_of_token, local] = x
        return out

    o, final = chunk_gated_delta(pad(q), pad(k), pad(v), pad(g), pad(beta), initial, scale)
    state[slots] = final.to(state.dtype)
    return o[seq_of_token, local].to(v.dtype)


def gated_delta_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """One new token per sequence. q, k [B, H, K]; v [B, HV, V]; g, beta [B, HV];
    state [N, HV, K, V] fp32, rows slot_ids updated in place. Returns o [B, HV, V] in v's dtype.
    A negative slot id is the null slot 0 (as in every other path), never the pool's last row.
    """
    slot_ids = slot_ids.clamp_min(0)
    group = check_gva(q.shape[1], v.shape[1])
    q = q.float().repeat_interleave(group, dim=1)
    k = k.float().repeat_interleave(group, dim=1)
    S = state[slot_ids].float() * g.float().exp()[..., None, None]  # [B, HV, K, V]
    u = beta.float()[..., None] * (v.float() - torch.einsum("bhk,bhkv->bhv", k, S))
    S = S + k[..., None] * u[..., None, :]
    state[slot_ids] = S.to(state.dtype)
    return (scale * torch.einsum("bhk,bhkv->bhv", q, S)).to(v.dtype)


def fla_chunk_gated_delta_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    batch: ForwardBatch,
    scale: float = 1.0,
) -> torch.Tensor:
    """fla-core's Triton chunk kernel (CUDA): initial states gathered from the pool, final states scattered back.

    Same arguments and result as chunk_gated_delta_varlen. fla's key-first state layout is ours.
    """
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # lazy: fla-core is only needed on a GPU

    slots = batch.slot_ids
    o, final = chunk_gated_delta_rule(
        q=q[None].to(v.dtype),
        k=k[None].to(v.dtype),
        v=v[None],
        g=g[None].float(),
        beta=beta[None].to(v.dtype),
        scale=scale,
        initial_state=state[slots].float().contiguous(),
        output_final_state=True,
        cu_seqlens=batch.cu_seqlens,
    )
    state[slots] = final.to(state.dtype)
    return o[0].to(v.dtype)

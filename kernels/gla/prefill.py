"""Gated linear attention in the chunked parallel form: the torch prefill path.

Within a chunk of C tokens, with b_t = sum_{r <= t} g_r the cumulative log decay from the chunk start:
    o_t = scale * q_t ( diag(exp b_t) S_0 + sum_{s <= t} diag(exp(b_t - b_s)) k_s^T v_s )
    S_C = diag(exp b_C) S_0 + sum_s diag(exp(b_C - b_s)) k_s^T v_s
The factorised form q_t exp(b_t) . k_s exp(-b_s) would overflow once a chunk's decays sum below about
-88, so every exponent here is a difference that is <= 0. The chunk is cut into sub-chunks of c tokens:
a query sub-chunk i starting at p_i meets the keys before it through the reference point r_i = b_{p_i - 1},
    exp(b_t - b_s) = exp(b_t - r_i) * exp(r_i - b_s),   both <= 0 for s < p_i <= t,
which makes those blocks one matmul per sub-chunk; only the c x c diagonal blocks need the per-channel
[c, c, K] decay tensor. Elementwise work per chunk falls from C*C*K to C*c*K + C*C/c*K.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # kernels take the batch layout by duck typing; they never import models at run time
    from linrec.models.batch import ForwardBatch

CHUNK_SIZE = 64
SUB_CHUNK_SIZE = 16


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float = 1.0,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, the contract of naive_recurrent_gla: q [T, H, K]; k, g [T, Hk, K]; v [T, Hk, V];
    initial_state [Hk, K, V]; query head h reads state h // (H // Hk).

    Returns o [T, H, V] fp32 and the final state [Hk, K, V] fp32.
    """
    T, H, K = q.shape
    Hk, V = v.shape[1], v.shape[2]
    if H % Hk:
        raise ValueError(f"expected query heads divisible by key/value heads, got H={H}, Hk={Hk}")
    if chunk_size < 1:
        raise ValueError(f"expected chunk_size >= 1, got {chunk_size}")
    group = H // Hk
    # Query head h = hk * group + j, so viewing H as [Hk, group] puts each query group beside its state.
    qf = q.float().reshape(T, Hk, group, K).permute(1, 2, 0, 3)  # [Hk, G, T, K]
    kf = k.float().transpose(0, 1)  # [Hk, T, K]
    vf = v.float().transpose(0, 1)  # [Hk, T, V]
    gf = g.float().transpose(0, 1)  # [Hk, T, K]
    if initial_state is not None:
        S = initial_state.float().clone()
    else:
        S = q.new_zeros(Hk, K, V, dtype=torch.float32)
    o = q.new_empty(Hk, group, T, V, dtype=torch.float32)
    for lo in range(0, T, chunk_size):
        hi = min(lo + chunk_size, T)
        qc, kc, vc = qf[:, :, lo:hi], kf[:, lo:hi], vf[:, lo:hi]
        b = gf[:, lo:hi].cumsum(dim=1)  # [Hk, C, K]
        scores = _intra_chunk_scores(qc, kc, b)  # [Hk, G, C, C], zero above the diagonal
        o_intra = scores @ vc[:, None]  # [Hk, G, C, V]
        o_inter = (qc * b.exp()[:, None]) @ S[:, None]  # [Hk, G, C, V]
        o[:, :, lo:hi] = scale * (o_inter + o_intra)
        b_last = b[:, -1]  # [Hk, K]
        S = S * b_last.exp()[..., None] + (kc * (b_last[:, None] - b).exp()).transpose(1, 2) @ vc
    return o.permute(2, 0, 1, 3).reshape(T, H, V), S


def _intra_chunk_scores(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A[t, s] = sum_k q_tk k_sk exp(b_tk - b_sk) for s <= t, else 0. q [Hk, G, C, K]; k, b [Hk, C, K]."""
    Hk, G, C, K = q.shape
    c = min(SUB_CHUNK_SIZE, C)
    n = -(-C // c)
    if n * c != C:  # the last chunk of a sequence: pad to whole sub-chunks with zero keys and no decay
        pad = n * c - C
        q = torch.nn.functional.pad(q, (0, 0, 0, pad))
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        b = torch.cat([b, b[:, -1:].expand(Hk, pad, K)], dim=1)
    L = n * c
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    # Diagonal blocks: [Hk, n, c(t), c(s), K], the mask before exp where b_t - b_s > 0 for s > t.
    bd = b.reshape(Hk, n, c, K)
    log_decay = (bd[:, :, :, None] - bd[:, :, None]).masked_fill(~causal[None, None, :, :, None], float("-inf"))
    diag = torch.einsum("hgntk,hnsk,hntsk->hgnts", q.reshape(Hk, G, n, c, K), k.reshape(Hk, n, c, K), log_decay.exp())
    scores = q.new_zeros(Hk, G, n, c, L)
    for i in range(n):
        scores[:, :, i, :, i * c : (i + 1) * c] = diag[:, :, i]
    if n > 1:
        # Off-diagonal blocks: sub-chunk i against every key before p_i = i * c, through r_i = b[p_i - 1].
        ref = b[:, c - 1 : L - 1 : c]  # [Hk, n - 1, K]: r_1 .. r_{n-1}
        q_off = q[:, :, c:].reshape(Hk, G, n - 1, c, K) * (bd[:, None, 1:] - ref[:, None, :, None]).exp()
        before = torch.arange(L, device=q.device)[None, :] < torch.arange(1, n, device=q.device)[:, None] * c
        # exp(r_i - b_s) for s < p_i (<= 0); the other keys get exponent -inf, i.e. a zero weight.
        k_exp = (ref[:, :, None] - b[:, None]).masked_fill(~before[None, :, :, None], float("-inf")).exp()
        k_off = k[:, None] * k_exp  # [Hk, n - 1, L, K]
        scores[:, :, 1:] += q_off @ k_off[:, None].transpose(-1, -2)  # [Hk, G, n - 1, c, L]
    return scores.reshape(Hk, G, L, L)[:, :, :C, :C]


def fla_chunk_gla_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
    batch: ForwardBatch,
    scale: float = 1.0,
) -> torch.Tensor:
    """fla-core's Triton chunk kernel over the whole varlen batch (CUDA): initial states gathered from the
    pool by slot, final states scattered back. The arguments of gla_varlen; returns o [T, H, V] in v's dtype.
    A peer for tests and benchmarks only: requests run linrec's own kernel (chunk.py), which needs no
    autotuning, no gather/scatter and no fla-core.

    fla keeps one state per query head: k, v, g and the initial states are repeated over each query group
    (the group's states then stay equal, and the first of each is written back). fla's state layout,
    key-first [N, H, K, V], is ours.
    """
    from fla.ops.gla import chunk_gla as fla_chunk_gla  # lazy: fla-core is only needed on a GPU

    H, Hk = q.shape[1], k.shape[1]
    if H % Hk:
        raise ValueError(f"expected query heads divisible by key/value heads, got H={H}, Hk={Hk}")
    group = H // Hk
    per_query_head = (lambda x: x.repeat_interleave(group, dim=1)) if group > 1 else (lambda x: x)
    slots = batch.slot_ids.clamp_min(0)  # a negative id is the null slot, as in the torch path
    o, final = fla_chunk_gla(
        q=q[None].to(v.dtype),
        k=per_query_head(k)[None].to(v.dtype),
        v=per_query_head(v)[None],
        g=per_query_head(g)[None].float(),
        scale=scale,
        initial_state=per_query_head(state[slots].float()).contiguous(),
        output_final_state=True,
        cu_seqlens=batch.cu_seqlens,
        cu_seqlens_cpu=torch.tensor(_offsets(batch.seq_lens), dtype=torch.int64),
    )
    state[slots] = final[:, ::group].to(state.dtype)
    return o[0].to(v.dtype)


def _offsets(seq_lens: tuple[int, ...]) -> list[int]:
    offsets = [0]
    for n in seq_lens:
        offsets.append(offsets[-1] + n)
    return offsets

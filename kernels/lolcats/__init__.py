"""LoLCATs attention (sliding-window softmax + Hedgehog linear attention, one shared normaliser) over the flat
varlen batch, each sequence's ring, linear state and normaliser read and written in the slot pool.

naive.py is the fp32 reference (and the feature map), prefill.py the chunked form, step.py the torch decode
step, decode.py the Triton decode kernel that updates the pool in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from linrec.kernels.lolcats.naive import hedgehog_features
from linrec.kernels.lolcats.prefill import lolcats_prefill_one
from linrec.kernels.lolcats.step import lolcats_step
from linrec.kernels.varlen import split_single_tokens

if TYPE_CHECKING:  # kernels take the batch layout by duck typing; they never import models at run time
    from linrec.models.batch import ForwardBatch

__all__ = ["hedgehog_features", "lolcats_attn_varlen"]


def lolcats_attn_varlen(
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
    batch: ForwardBatch,
    scale: float,
    eps: float,
    backend: str = "torch",
) -> torch.Tensor:
    """q [T, H, D], k, v [T, Hk, D] (RoPE'd); phi_q [T, H, 2F] (the queries' features); k_weight [H, D, F] (the
    keys' feature map, applied to each key as it leaves the window); gamma [H] = sigmoid(window factors);
    linear [N, H, 2F, D] and normalizer [N, H, 2F] fp32, ring_k, ring_v [N, W, Hk, D]: rows batch.slot_ids
    updated in place. Returns o [T, H, D] fp32."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"expected backend 'torch' or 'triton', got {backend!r}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"expected query heads divisible by key/value heads, got H={q.shape[1]}, Hk={k.shape[1]}")
    if batch.is_decode:
        if backend == "triton":
            from linrec.kernels.lolcats.decode import lolcats_decode

            step = lolcats_decode
        else:
            step = lolcats_step
        return step(
            q, phi_q, k, v, k_weight, gamma, linear, normalizer, ring_k, ring_v, batch.slot_ids, batch.positions,
            scale, eps,
        )  # fmt: skip
    o = q.new_empty(q.shape, dtype=torch.float32)
    split = split_single_tokens(batch)
    if split is not None:  # the 1-token sequences as one step, the longer ones per sequence
        for sub, rows in split:
            o[rows] = lolcats_attn_varlen(
                q[rows], phi_q[rows], k[rows], v[rows], k_weight, gamma, linear, normalizer, ring_k, ring_v, sub,
                scale, eps, backend,
            )  # fmt: skip
        return o
    lo = 0
    for n, slot, start in zip(batch.seq_lens, batch.slot_ids_host, batch.start_positions):
        hi = lo + n
        o[lo:hi] = lolcats_prefill_one(
            q[lo:hi], phi_q[lo:hi], k[lo:hi], v[lo:hi], k_weight, gamma, linear, normalizer, ring_k, ring_v,
            max(slot, 0), start, scale, eps,
        )  # fmt: skip
        lo = hi
    return o

"""Splitting a mixed varlen batch into its 1-token sequences and its longer ones.

A continuous-batching step holds many 1-token decodes beside a few prefill chunks. The ops run the
decodes as one batched step and only the longer sequences through the chunked path, instead of looping
over every sequence (or padding every decode to the longest chunk).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # kernels take the batch layout by duck typing; they never import models at run time
    from linrec.models.batch import ForwardBatch

# Rows of the flat token axis: a slice when the sequences' tokens lie back to back, else an index tensor.
TokenRows = slice | torch.Tensor


def split_single_tokens(batch: ForwardBatch) -> tuple[tuple[Any, TokenRows], tuple[Any, TokenRows]] | None:
    """((decode_batch, rows), (prefill_batch, rows)) for a batch with both 1-token and longer sequences,
    else None. Each sub-batch is the same batch class over its sequences (in their order); `rows` picks
    their tokens out of the flat axis. Built from the host copies: no device sync.
    """
    seq_lens = batch.seq_lens
    single = [b for b, n in enumerate(seq_lens) if n == 1]
    if not single or len(single) == len(seq_lens):
        return None
    multi = [b for b, n in enumerate(seq_lens) if n != 1]
    offsets = [0]
    for n in seq_lens:
        offsets.append(offsets[-1] + n)
    return _sub_batch(batch, single, offsets), _sub_batch(batch, multi, offsets)


def _sub_batch(batch: ForwardBatch, seqs: list[int], offsets: list[int]) -> tuple[Any, TokenRows]:
    device = batch.cu_seqlens.device
    lens = [batch.seq_lens[b] for b in seqs]
    token_ids = [t for b in seqs for t in range(offsets[b], offsets[b + 1])]
    if token_ids[-1] - token_ids[0] + 1 == len(token_ids):
        rows: TokenRows = slice(token_ids[0], token_ids[-1] + 1)
    else:
        rows = torch.tensor(token_ids, dtype=torch.int64, device=device)
    sub_offsets = [0]
    for n in lens:
        sub_offsets.append(sub_offsets[-1] + n)
    slots = tuple(batch.slot_ids_host[b] for b in seqs)
    sub = dataclasses.replace(
        batch,
        cu_seqlens=torch.tensor(sub_offsets, dtype=torch.int64, device=device),
        positions=batch.positions[rows],
        slot_ids=torch.tensor(slots, dtype=torch.int64, device=device),
        seq_lens=tuple(lens),
        start_positions=tuple(batch.start_positions[b] for b in seqs),
        slot_ids_host=slots,
    )
    return sub, rows

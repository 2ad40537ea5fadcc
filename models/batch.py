"""The batch description a model forward takes: how the flat token axis splits into sequences."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from linrec.kernels.lora import LoraMapping
from linrec.kernels.sparse import SparseMapping


@dataclass
class ForwardBatch:
    """Varlen layout of one forward call; built by the engine's runner (or by tests).

    Tokens of all sequences lie back to back on one flat axis of length T. Sequence b owns tokens
    cu_seqlens[b]:cu_seqlens[b+1] and reads and writes row slot_ids[b] of every state tensor.
    A prefill chunk and a 1-token decode are the same thing here: a sequence of some length that
    resumes from the state in its slot.

    Per request, besides its tokens: the device slot of its LoRA adapter (one per token, so the LoRA
    kernels group tokens by adapter), its sparse adapter's add-on in a step that mixes weights, and its layer
    route. A batch where no sequence has an adapter carries lora=None and sparse=None and costs the projections
    nothing; layer_route None means every layer executes once.
    """

    cu_seqlens: torch.Tensor  # [B+1] int64, token offsets of each sequence on the flat axis
    positions: torch.Tensor  # [T] int64, absolute position of each token in its sequence (RoPE, window ring)
    slot_ids: torch.Tensor  # [B] int64, state row of each sequence; 0 is the null slot padding rows use
    seq_lens: tuple[int, ...]  # host copy of the B lengths, so torch paths loop without a device sync
    start_positions: tuple[int, ...]  # host copy of each sequence's first position (tokens already in its state)
    slot_ids_host: tuple[int, ...]  # host copy of slot_ids
    # The tokens' LoRA adapters: adapter_ids [T] int64, the device adapter slot of each token (-1 none), grouped
    # by slot for the shrink/expand kernels. None when no token of the batch has an adapter.
    lora: LoraMapping | None = None
    # The tokens of sparse adapters that are not scattered into the weights this step, grouped by adapter, with
    # each adapter's deltas (kernels/sparse). None when no token needs the add-on.
    sparse: SparseMapping | None = None
    # Per sequence, its layer route: one count per layer, 0 skip, 1 execute, 2 repeat (host tuples; None for a
    # sequence that runs every layer once). None: no sequence has a route (the loop runs every layer on all).
    layer_route: tuple[tuple[int, ...] | None, ...] | None = None
    # Per routed sequence, its state row in each layer (0: it skips the layer), or None for a sequence whose row
    # is slot_ids[b] in every layer; and its second-lane row in each layer (the second pass of a repeated layer,
    # in the same state tensors; 0: none), or None. The pool hands out both (engine/state_pool.py's RowAllocator).
    layer_rows: tuple[tuple[int, ...] | None, ...] | None = None
    lane_rows: tuple[tuple[int, ...] | None, ...] | None = None
    # Per sequence whose route the model's routers decide in this forward (layer_route "auto"), the bias added
    # to the skip logit; None for the others. The forward writes each decided route into decided_routes
    # (sequence index -> counts).
    auto_route: tuple[float | None, ...] | None = None
    decided_routes: dict[int, tuple[int, ...]] | None = None
    # Host copies to rebuild the add-ons over a subset of the sequences (select): each sequence's LoRA slot
    # (-1 none) and the number of slots; each sequence's sparse deltas (None: none).
    adapter_slots_host: tuple[int, ...] | None = None
    num_adapter_slots: int = 0
    sparse_deltas: tuple | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence advances by exactly one token (the case the decode kernels serve)."""
        return all(n == 1 for n in self.seq_lens)

    @property
    def max_seqlen(self) -> int:
        return max(self.seq_lens, default=0)

    @cached_property
    def token_offsets(self) -> tuple[int, ...]:
        """Host copy of cu_seqlens: sequence b owns tokens token_offsets[b]:token_offsets[b+1]."""
        return tuple(itertools.accumulate(self.seq_lens, initial=0))

    @classmethod
    def build(
        cls,
        seq_lens: Sequence[int],
        start_positions: Sequence[int] | None = None,
        slot_ids: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        adapter_slots: Sequence[int] | None = None,
        num_adapter_slots: int = 0,
        sparse_deltas: Sequence | None = None,
    ) -> ForwardBatch:
        """Lay out B sequences of the given lengths.

        start_positions[b] is how many tokens sequence b already has in its state (0 for a fresh
        prompt); slot_ids default to 1..B (row 0 is the null slot). adapter_slots[b] is the device slot of
        sequence b's LoRA adapter in [0, num_adapter_slots), or -1 for none (the default for all).
        sparse_deltas[b] is sequence b's sparse adapter's add-on deltas in a step that mixes weights, or None.
        """
        seq_lens = tuple(int(n) for n in seq_lens)
        if any(n < 1 for n in seq_lens):
            raise ValueError(f"expected every sequence length >= 1, got {list(seq_lens)}")
        num_seqs = len(seq_lens)
        starts = tuple(int(p) for p in start_positions) if start_positions is not None else (0,) * num_seqs
        slots = tuple(int(s) for s in slot_ids) if slot_ids is not None else tuple(range(1, num_seqs + 1))
        if len(starts) != num_seqs or len(slots) != num_seqs:
            raise ValueError(f"expected {num_seqs} start positions and slot ids, got {len(starts)} and {len(slots)}")
        positions = [p for start, n in zip(starts, seq_lens) for p in range(start, start + n)]
        lora = None
        if adapter_slots is not None:
            if len(adapter_slots) != num_seqs:
                raise ValueError(f"expected {num_seqs} adapter slots, got {len(adapter_slots)}")
            if any(int(a) >= 0 for a in adapter_slots):
                token_slots = [int(a) for a, n in zip(adapter_slots, seq_lens) for _ in range(n)]
                lora = LoraMapping.build(token_slots, num_adapter_slots, device)
        batch = cls(
            cu_seqlens=torch.tensor(list(itertools.accumulate(seq_lens, initial=0)), dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slot_ids=torch.tensor(slots, dtype=torch.int64, device=device),
            seq_lens=seq_lens,
            start_positions=starts,
            slot_ids_host=slots,
            lora=lora,
            adapter_slots_host=tuple(int(a) for a in adapter_slots) if adapter_slots is not None else None,
            num_adapter_slots=num_adapter_slots,
        )
        if sparse_deltas is not None:
            batch.sparse_deltas = tuple(sparse_deltas)
            batch.sparse = SparseMapping.build(seq_lens, batch.sparse_deltas)
        return batch

    def select(self, seq_indices: Sequence[int], slot_ids: Sequence[int]) -> tuple[ForwardBatch, torch.Tensor]:
        """The batch of sequences `seq_indices` (in that order) reading and writing rows `slot_ids`, and the
        indices [t] of their tokens on this batch's flat axis: how a routed layer runs on the rows that
        execute it (models/base.py)."""
        device = self.cu_seqlens.device
        offsets = self.token_offsets
        tokens = [t for b in seq_indices for t in range(offsets[b], offsets[b + 1])]
        adapter_slots = None
        if self.adapter_slots_host is not None:
            adapter_slots = [self.adapter_slots_host[b] for b in seq_indices]
        sub = ForwardBatch.build(
            [self.seq_lens[b] for b in seq_indices],
            [self.start_positions[b] for b in seq_indices],
            slot_ids,
            device=device,
            adapter_slots=adapter_slots,
            num_adapter_slots=self.num_adapter_slots,
            sparse_deltas=[self.sparse_deltas[b] for b in seq_indices] if self.sparse_deltas is not None else None,
        )
        return sub, torch.tensor(tokens, dtype=torch.int64, device=device)

    def last_token_indices(self) -> torch.Tensor:
        """[B] index on the flat axis of each sequence's last token (where its next token is sampled)."""
        return self.cu_seqlens[1:] - 1


@dataclass
class ForwardContext:
    """What every layer of one forward call sees besides its input and its own state: the batch layout,
    the kernel implementation resolved for the input's device, and what the family computes once per call
    for all its layers (RoPE's cos and sin [T, D] for Liger-GLA; None elsewhere)."""

    batch: ForwardBatch
    backend: str  # "triton" | "torch" (kernels/backend.resolve_backend)
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None

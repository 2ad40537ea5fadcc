"""LoRA add-on for a batch that serves many adapters at once: y[t] += B[s] (A[s] x[t]) for each token with
an adapter slot s, over the flat batch axis, and the one place that picks Triton or torch.

Adapters are stacked per projection: lora_a [S, R, in], lora_b [S, out, R] (S device slots, R the largest
rank, a smaller rank zero-padded, the scaling alpha / r folded into lora_b). The delta is computed in fp32
and added with one rounding, (y.float() + delta).to(y.dtype); a token without an adapter keeps its row of
y bit for bit (never even + 0.0), and a batch without one launches nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

BACKENDS = ("triton", "torch")


@dataclass(frozen=True)
class LoraMapping:
    """Which adapter slot each token of the flat batch uses, and the tokens grouped by slot."""

    token_slots: torch.Tensor  # [T] int64, the token's adapter slot, -1 for none
    sorted_token_ids: torch.Tensor  # [T] int64, token indices by slot ascending (stable), unadapted last
    slot_starts: torch.Tensor  # [S+1] int64, slot s owns sorted_token_ids[slot_starts[s]:slot_starts[s+1]]
    num_slots: int  # S, the device adapter slots (first dim of lora_a and lora_b)
    groups: tuple[tuple[int, torch.Tensor], ...] | None  # host-known (slot, token indices [n] int64) for
    # each slot with tokens, for the torch path; None when built on the device
    has_lora: bool  # whether any token has an adapter; True when unknown (built on the device)

    @classmethod
    def build(cls, token_slots: Sequence[int], num_slots: int, device: torch.device | str) -> LoraMapping:
        """From host ints, as the runner has them after scheduling: exact groups and has_lora."""
        slots = [int(s) for s in token_slots]
        bad = [s for s in slots if not -1 <= s < num_slots]
        if bad:
            raise ValueError(f"expected token slots in [-1, {num_slots}) (num_slots={num_slots}), got {bad[0]}")
        by_slot: list[list[int]] = [[] for _ in range(num_slots + 1)]  # the last list: unadapted tokens
        for t, s in enumerate(slots):
            by_slot[s if s >= 0 else num_slots].append(t)
        starts = [0]
        for tokens in by_slot[:num_slots]:
            starts.append(starts[-1] + len(tokens))

        def ints(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return cls(
            token_slots=ints(slots),
            sorted_token_ids=ints([t for tokens in by_slot for t in tokens]),
            slot_starts=ints(starts),
            num_slots=num_slots,
            groups=tuple((s, ints(tokens)) for s, tokens in enumerate(by_slot[:num_slots]) if tokens),
            has_lora=starts[-1] > 0,
        )

    @cached_property
    def padded_groups(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        """For the torch path, the groups padded to one size m so that all adapters run as one batched matmul:
        (slots [k], gather [k*m] token index per padded row (pads read token 0), valid [n] positions of the
        real rows in group order, m). None without host groups, or when padding would more than double the
        rows (a long prefill beside short decodes): the path loops over the groups then. Computed once per
        mapping, which every projection of a step shares."""
        if self.groups is None or len(self.groups) < 2:
            return None
        sizes = [tokens.numel() for _, tokens in self.groups]
        m, n = max(sizes), sum(sizes)
        if m * len(sizes) > 2 * n:
            return None
        device = self.token_slots.device
        gather = torch.zeros(len(sizes), m, dtype=torch.int64, device=device)
        valid = []
        for g, ((_, tokens), size) in enumerate(zip(self.groups, sizes)):
            gather[g, :size] = tokens
            valid.extend(range(g * m, g * m + size))
        slots = torch.tensor([s for s, _ in self.groups], dtype=torch.int64, device=device)
        return slots, gather.view(-1), torch.tensor(valid, dtype=torch.int64, device=device), m

    @classmethod
    def from_device(cls, token_slots: torch.Tensor, num_slots: int) -> LoraMapping:
        """From a [T] int64 tensor already on the device, with torch ops only: no host sync and no shape that
        depends on values, so a CUDA graph can capture it. Slots are not validated (that would read them on
        the host); one outside [-1, num_slots) is an out-of-bounds index."""
        token_slots = token_slots.to(torch.int64)
        key = torch.where(token_slots < 0, num_slots, token_slots)  # -1 sorts after every slot
        sorted_token_ids = torch.argsort(key, stable=True)
        counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=key.device)
        counts.scatter_add_(0, key, torch.ones_like(key))
        slot_starts = torch.zeros_like(counts)
        slot_starts[1:] = counts[:num_slots].cumsum(0)
        return cls(token_slots, sorted_token_ids, slot_starts, num_slots, groups=None, has_lora=True)


def _check(backend: str, mapping: LoraMapping, num_tokens: int, lora: torch.Tensor, name: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"expected backend in {BACKENDS}, got {backend!r}")
    if mapping.token_slots.shape != (num_tokens,):
        raise ValueError(
            f"expected a mapping over {num_tokens} tokens, got token_slots {tuple(mapping.token_slots.shape)}"
        )
    if lora.dim() != 3 or lora.shape[0] != mapping.num_slots:
        raise ValueError(f"expected {name} [{mapping.num_slots}, ., .] (num_slots first), got {tuple(lora.shape)}")


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, mapping: LoraMapping, backend: str) -> torch.Tensor:
    """x [T, in]; lora_a [S, R, in]. Returns shrunk [T, R] fp32: A[s] x[t] on adapted rows, zeros elsewhere."""
    _check(backend, mapping, x.shape[0], lora_a, "lora_a")
    if x.dim() != 2 or lora_a.shape[2] != x.shape[1]:
        raise ValueError(
            f"expected x [T, in] and lora_a [S, R, in], got x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}"
        )
    T, R = x.shape[0], lora_a.shape[1]
    if not mapping.has_lora:
        return x.new_zeros(T, R, dtype=torch.float32)
    if backend == "triton":  # on the CPU under TRITON_INTERPRET=1
        from linrec.kernels.lora.punica import triton_lora_shrink  # triton loads only where it runs

        return triton_lora_shrink(x, lora_a, mapping)
    # every token gathers its slot's A (slot 0 for unadapted ones), then is masked: no host data, so a CUDA
    # graph can capture it (lora_add_ takes a grouped path where the mapping has host groups)
    is_adapted = mapping.token_slots >= 0
    a = lora_a[mapping.token_slots.clamp(min=0)].float()  # [T, R, in]
    shrunk = torch.bmm(a, x.float()[:, :, None])[:, :, 0]
    return torch.where(is_adapted[:, None], shrunk, 0.0)


def lora_expand_(
    y: torch.Tensor, shrunk: torch.Tensor, lora_b: torch.Tensor, mapping: LoraMapping, backend: str
) -> None:
    """y [T, out] in place: (y.float() + B[s] shrunk[t]).to(y.dtype) on adapted rows, other rows untouched.
    shrunk [T, R] fp32 (from lora_shrink); lora_b [S, out, R]."""
    _check(backend, mapping, y.shape[0], lora_b, "lora_b")
    T, N, R = y.shape[0], lora_b.shape[1], lora_b.shape[2]
    if y.dim() != 2 or y.shape[1] != N or shrunk.shape != (T, R) or shrunk.dtype != torch.float32:
        raise ValueError(
            f"expected y [T, {N}] and shrunk [T, {R}] fp32 for lora_b {tuple(lora_b.shape)}, "
            f"got y {tuple(y.shape)}, shrunk {tuple(shrunk.shape)} {shrunk.dtype}"
        )
    if not mapping.has_lora:
        return
    if backend == "triton":
        from linrec.kernels.lora.punica import triton_lora_expand_

        triton_lora_expand_(y, shrunk, lora_b, mapping)
        return
    is_adapted = mapping.token_slots >= 0
    b = lora_b[mapping.token_slots.clamp(min=0)].float()  # [T, out, R]
    updated = (y.float() + torch.bmm(b, shrunk[:, :, None])[:, :, 0]).to(y.dtype)
    y.copy_(torch.where(is_adapted[:, None], updated, y))  # unadapted rows: y's own bits, -0.0 included


def lora_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    mapping: LoraMapping,
    backend: str,
) -> None:
    """y [T, out] += B[s] (A[s] x[t]) in place for the tokens with an adapter slot s (the delta in fp32, one
    rounding to y's dtype); other rows untouched. x [T, in]; lora_a [S, R, in]; lora_b [S, out, R]."""
    if not mapping.has_lora:  # checked first: a batch without adapters launches nothing
        return
    if backend == "torch" and mapping.groups is not None:
        _check(backend, mapping, x.shape[0], lora_a, "lora_a")
        _check(backend, mapping, y.shape[0], lora_b, "lora_b")
        _torch_segments_add_(y, x, lora_a, lora_b, mapping)
        return
    lora_expand_(y, lora_shrink(x, lora_a, mapping, backend), lora_b, mapping, backend)


def _torch_segments_add_(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, mapping: LoraMapping
) -> None:
    """The torch path with host-known groups, in few ops whatever the number of adapters: the adapted rows are
    gathered once in slot order; groups of similar sizes run as one padded bmm per half (padded_groups), others
    as two matmuls per adapter into views of one buffer; the sums go back in one scatter (SGMV's shape, in
    torch). The same fp32 math as lora_shrink + lora_expand_."""
    sizes = [tokens.numel() for _, tokens in mapping.groups]
    num_adapted = sum(sizes)
    is_whole = len(sizes) == 1 and num_adapted == x.shape[0]  # one adapter for every token: no gather at all
    rows = mapping.sorted_token_ids[:num_adapted]  # adapted tokens, grouped by slot
    padded = mapping.padded_groups
    if padded is not None:  # groups of similar sizes (decode): one bmm for all adapters, not two mm per adapter
        slots, gather, valid, m = padded
        xs = x.index_select(0, gather).float().view(len(sizes), m, -1)  # [k, m, in]
        shrunk = torch.bmm(xs, lora_a.index_select(0, slots).float().transpose(1, 2))  # [k, m, R]
        delta = torch.bmm(shrunk, lora_b.index_select(0, slots).float().transpose(1, 2))  # [k, m, out]
        delta = delta.view(-1, delta.shape[-1]).index_select(0, valid)  # [n, out], rows' order
    else:
        xs = x.float() if is_whole else x.index_select(0, rows).float()
        shrunk = xs.new_empty(num_adapted, lora_a.shape[1])
        delta = xs.new_empty(num_adapted, lora_b.shape[1])
        start = 0
        for (slot, _), size in zip(mapping.groups, sizes):
            end = start + size
            torch.mm(xs[start:end], lora_a[slot].float().T, out=shrunk[start:end])
            torch.mm(shrunk[start:end], lora_b[slot].float().T, out=delta[start:end])
            start = end
    if is_whole:
        y.copy_(y.float() + delta) if y.dtype != torch.float32 else y.add_(delta)
    elif y.dtype == torch.float32:
        y.index_add_(0, rows, delta)  # y + delta in fp32: the one rounding
    else:
        y.index_copy_(0, rows, (y.index_select(0, rows).float() + delta).to(y.dtype))

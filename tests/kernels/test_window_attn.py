"""Sliding-window attention: the naive reference against torch SDPA with an explicit banded mask, the
ring path (any chunking, varlen, decode) against one full pass, and the window pinned at 64 keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linrec.kernels.window_attn import window_attn_varlen
from linrec.kernels.window_attn.naive import naive_window_attn
from linrec.models.batch import ForwardBatch

W = 64


def make_qkv(T, H, Hk, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(T, H, D, generator=gen),
        torch.randn(T, Hk, D, generator=gen),
        torch.randn(T, Hk, D, generator=gen),
    )


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def sdpa_banded(q, k, v, window, scale):
    """Independent computation: SDPA with a [T, P+T] mask, key j visible to query i iff i+P-window < j <= i+P."""
    T, H, _ = q.shape
    num_past, Hk = k.shape[0] - T, k.shape[1]
    i = torch.arange(T)[:, None] + num_past
    j = torch.arange(k.shape[0])[None, :]
    mask = (j <= i) & (j > i - window)
    rep = lambda x: x.repeat_interleave(H // Hk, dim=1).transpose(0, 1)[None]  # [1, H, n, D]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], rep(k), rep(v), attn_mask=mask, scale=scale)
    return o[0].transpose(0, 1)


@pytest.mark.parametrize(
    "T,num_past,window,H,Hk", [(130, 0, 64, 4, 2), (40, 25, 64, 4, 4), (17, 9, 5, 6, 2), (1, 0, 64, 2, 1)]
)
def test_naive_matches_sdpa_banded(T, num_past, window, H, Hk):
    D = 16
    q, _, _ = make_qkv(T, H, Hk, D)
    _, k, v = make_qkv(num_past + T, H, Hk, D, seed=1)
    o = naive_window_attn(q, k, v, window, D**-0.5)
    o_ref = sdpa_banded(q, k, v, window, D**-0.5)
    d = max_diff(o, o_ref)
    print(f"naive window attn vs SDPA banded (T={T}, P={num_past}, W={window}): max|do|={d:.2e}")
    assert d < 1e-5


def run_chunks(q, k, v, chunks, ring_k, ring_v, slot, scale):
    """Feed one sequence through window_attn_varlen chunk by chunk (1-token chunks take the decode path)."""
    outs, start = [], 0
    for n in chunks:
        batch = ForwardBatch.build([n], start_positions=[start], slot_ids=[slot])
        s = slice(start, start + n)
        outs.append(window_attn_varlen(q[s], k[s], v[s], ring_k, ring_v, batch, scale))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize(
    "chunks",
    [[150], [1] * 70 + [80], [7, 63, 1, 1, 64, 14], [65, 1, 64, 20], [3, 130, 1, 1, 15], [64, 64, 22]],
)
def test_ring_chunks_equal_full_pass(chunks):
    T, H, Hk, D = sum(chunks), 4, 2, 16
    q, k, v = make_qkv(T, H, Hk, D)
    scale = D**-0.5
    o_ref = naive_window_attn(q, k, v, W, scale)
    ring_k, ring_v = torch.zeros(3, W, Hk, D), torch.zeros(3, W, Hk, D)
    o = run_chunks(q, k, v, chunks, ring_k, ring_v, slot=2, scale=scale)
    d = max_diff(o, o_ref)
    print(f"ring chunks {chunks[:6]}... vs naive full pass: max|do|={d:.2e}")
    assert d < 1e-5
    # The ring holds the last W positions at index position % W; other rows are untouched.
    idx = torch.arange(T - W, T) % W
    assert torch.equal(ring_k[2, idx], k[T - W :]) and torch.equal(ring_v[2, idx], v[T - W :])
    assert not ring_k[1].any() and not ring_k[0].any()


def test_query_blocks_equal_one_block(monkeypatch):
    # Long chunks run in query blocks; blocks of 16 (keys from the ring and the chunk) change nothing.
    T, H, Hk, D = 150, 4, 2, 16
    q, k, v = make_qkv(T, H, Hk, D)
    rings = [(torch.zeros(2, W, Hk, D), torch.zeros(2, W, Hk, D)) for _ in range(2)]
    o_one = run_chunks(q, k, v, [37, 113], *rings[0], slot=1, scale=0.25)
    monkeypatch.setattr("linrec.kernels.window_attn.QUERY_BLOCK", 16)
    o_blocked = run_chunks(q, k, v, [37, 113], *rings[1], slot=1, scale=0.25)
    assert max_diff(o_blocked, o_one) < 1e-6
    assert torch.equal(rings[0][0], rings[1][0])


def test_varlen_batch_out_of_order_slots_and_decode_with_padding():
    H, Hk, D = 4, 2, 16
    lens = {5: 150, 1: 70, 3: 9}  # slot -> total length
    data = {slot: make_qkv(n, H, Hk, D, seed=slot) for slot, n in lens.items()}
    ring_k, ring_v = torch.randn(6, W, Hk, D), torch.randn(6, W, Hk, D)  # stale garbage must never be read
    spare_k = ring_k[4].clone()
    scale = 0.3
    # chunk plans per slot; every step runs all sequences in one varlen call
    plans = {5: [100, 30, 1, 1, 18], 1: [3, 64, 1, 1, 1], 3: [1, 5, 1, 1, 1]}
    outs = {slot: [] for slot in lens}
    starts = dict.fromkeys(lens, 0)
    for step in range(5):
        order = [5, 1, 3] if step % 2 else [3, 5, 1]
        seq_lens = [plans[s][step] for s in order]
        slots = order + [0]  # a padding row on the null slot
        batch = ForwardBatch.build(seq_lens + [1], start_positions=[starts[s] for s in order] + [0], slot_ids=slots)
        parts = [[x[starts[s] : starts[s] + plans[s][step]] for x in data[s]] for s in order]
        q, k, v = (torch.cat([p[i] for p in parts] + [torch.randn(1, *parts[0][i].shape[1:])]) for i in range(3))
        o = window_attn_varlen(q, k, v, ring_k, ring_v, batch, scale)
        lo = 0
        for s, n in zip(order, seq_lens):
            outs[s].append(o[lo : lo + n])
            lo += n
            starts[s] += n
    for slot, (q, k, v) in data.items():
        d = max_diff(torch.cat(outs[slot]), naive_window_attn(q, k, v, W, scale))
        print(f"varlen ring slot {slot}: max|do|={d:.2e}")
        assert d < 1e-5
    assert torch.equal(ring_k[4], spare_k)


@pytest.mark.parametrize("chunks", [[100], [90, 1, 9], [27, 63, 10]])
def test_window_is_64_keys_including_the_current_one(chunks):
    # Pins the window: the key/value at p-63 is inside the window of query p, the one at p-64 is not.
    # (FlashAttention's window (64, 64) would let p-64 in: 65 keys.)
    T, H, Hk, D, p = 100, 2, 1, 16, 90
    q, k, v = make_qkv(T, H, Hk, D)

    def output_at_p(k, v):
        ring = torch.zeros(2, W, Hk, D), torch.zeros(2, W, Hk, D)
        return run_chunks(q, k, v, chunks, *ring, slot=1, scale=D**-0.5)[p]

    base = output_at_p(k, v)
    for offset, expect_change in [(63, True), (64, False), (0, True), (70, False)]:
        k2, v2 = k.clone(), v.clone()
        k2[p - offset] += 3.0
        v2[p - offset] += 3.0
        changed = not torch.equal(output_at_p(k2, v2), base)
        assert changed == expect_change, f"key at p-{offset} {'should' if expect_change else 'should not'} matter"


def test_dtypes_follow_q_and_ring():
    H, Hk, D = 2, 1, 16
    q, k, v = (x.bfloat16() for x in make_qkv(10, H, Hk, D))
    ring_k, ring_v = torch.zeros(2, W, Hk, D, dtype=torch.bfloat16), torch.zeros(2, W, Hk, D, dtype=torch.bfloat16)
    o = window_attn_varlen(q, k, v, ring_k, ring_v, ForwardBatch.build([10]), D**-0.5)
    assert o.dtype == torch.bfloat16
    o_ref = naive_window_attn(q, k, v, W, D**-0.5)
    assert max_diff(o, o_ref) < 2e-2


def test_rejects_unknown_backend():
    q, k, v = make_qkv(3, 2, 1, 16)
    ring = torch.zeros(2, W, 1, 16)
    with pytest.raises(ValueError, match="backend"):
        window_attn_varlen(q, k, v, ring, ring.clone(), ForwardBatch.build([3]), 1.0, backend="flash")

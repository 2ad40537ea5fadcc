"""LoLCATs attention: the naive reference against an independent masked quadratic form (SDPA with a banded mask
for the window's weighted sum), and the pool paths (any chunking, varlen, decode, nonzero initial states) against
the naive reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linrec.kernels.lolcats import lolcats_attn_varlen
from linrec.kernels.lolcats.naive import hedgehog_features, naive_lolcats_attn
from linrec.models.batch import ForwardBatch

EPS = 1e-12


def make_inputs(T, H, Hk, D, F_, num_past=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D, generator=gen)
    k = torch.randn(num_past + T, Hk, D, generator=gen)
    v = torch.randn(num_past + T, Hk, D, generator=gen)
    wq = torch.randn(H, D, F_, generator=gen) * 0.5
    wk = torch.randn(H, D, F_, generator=gen) * 0.5
    gamma = torch.sigmoid(torch.randn(H, generator=gen))
    return q, k, v, wq, wk, gamma


def quadratic_reference(q, k, v, wq, wk, gamma, window, scale):
    """The masked quadratic form, independent of the reference's loop: the window's weighted sum from torch SDPA
    with a banded mask (times its own sum of exp(s - m)), the linear part from a lower-banded mask."""
    T, H, D = q.shape
    n, Hk = k.shape[0], k.shape[1]
    rep = lambda x: x.repeat_interleave(H // Hk, dim=1)  # noqa: E731
    kk, vv = rep(k), rep(v)
    i = torch.arange(T)[:, None] + (n - T)
    j = torch.arange(n)[None, :]
    in_window = (j <= i) & (j > i - window)
    in_linear = j <= i - window
    o_window = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], kk.transpose(0, 1)[None], vv.transpose(0, 1)[None], attn_mask=in_window, scale=scale
    )[0].transpose(0, 1)  # [T, H, D]: normalised over the window
    s = scale * torch.einsum("thd,nhd->htn", q, kk).masked_fill(~in_window, float("-inf"))
    window_sum = torch.exp(s - s.amax(-1, keepdim=True)).sum(-1).T  # [T, H]
    a = torch.einsum("thf,nhf->htn", hedgehog_features(q, wq, EPS), hedgehog_features(kk, wk, EPS))
    a = a * in_linear
    num = gamma[:, None] * window_sum[..., None] * o_window + torch.einsum("htn,nhd->thd", a, vv)
    den = gamma * window_sum + a.sum(-1).T
    return num / den[..., None]


@pytest.mark.parametrize("T,window,H,Hk", [(150, 64, 4, 2), (23, 5, 6, 2), (1, 4, 2, 1), (9, 16, 2, 2)])
def test_naive_matches_quadratic_form(T, window, H, Hk):
    D, F_ = 8, 4
    q, k, v, wq, wk, gamma = make_inputs(T, H, Hk, D, F_)
    o, S, z = naive_lolcats_attn(q, k, v, wq, wk, gamma, window, D**-0.5, EPS)
    o_ref = quadratic_reference(q, k, v, wq, wk, gamma, window, D**-0.5)
    assert (o - o_ref).abs().max() < 1e-5
    # the final state holds exactly the keys that left the last window
    kk = k.repeat_interleave(H // Hk, dim=1)
    done = max(0, T - window)
    phi = hedgehog_features(kk[:done], wk, EPS)
    assert torch.allclose(z, phi.sum(0), atol=1e-5)
    assert torch.allclose(S, torch.einsum("nhf,nhd->hfd", phi, v.repeat_interleave(H // Hk, dim=1)[:done]), atol=1e-5)


def test_feature_map_is_two_softmaxes_clamped():
    x = torch.tensor([[[100.0, -100.0]]])  # [1, H=1, D=2]
    w = torch.eye(2)[None]  # [H, D, F=2]
    phi = hedgehog_features(x, w, EPS)
    # softmax([100, -100]) = [1, ~0] clamps to eps; each half sums to 1
    assert phi.shape == (1, 1, 4)
    assert torch.allclose(phi[..., :2].sum(-1), torch.ones(1, 1)) and torch.allclose(
        phi[..., 2:].sum(-1), torch.ones(1, 1)
    )
    assert phi.min().item() == pytest.approx(EPS)


def empty_pool(N, H, Hk, D, F_, W, dtype=torch.float32):
    return (
        torch.zeros(N, H, 2 * F_, D),
        torch.zeros(N, H, 2 * F_),
        torch.zeros(N, W, Hk, D, dtype=dtype),
        torch.zeros(N, W, Hk, D, dtype=dtype),
    )


def run_chunks(q, k, v, wq, wk, gamma, chunks, pool, slot, scale, backend="torch"):
    """One sequence through lolcats_attn_varlen chunk by chunk (1-token chunks take the decode path)."""
    linear, normalizer, ring_k, ring_v = pool
    outs, start = [], 0
    for n in chunks:
        batch = ForwardBatch.build([n], start_positions=[start], slot_ids=[slot])
        sl = slice(start, start + n)
        phi_q = hedgehog_features(q[sl], wq, EPS)
        outs.append(
            lolcats_attn_varlen(
                q[sl], phi_q, k[sl], v[sl], wk, gamma, linear, normalizer, ring_k, ring_v, batch, scale, EPS, backend
            )
        )
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize(
    "chunks,W", [([150], 64), ([70, 1, 1, 30, 1], 64), ([1] * 12, 4), ([3, 5, 1, 7], 4), ([64, 64, 1], 64)]
)
def test_chunked_and_decode_match_naive(chunks, W):
    H, Hk, D, F_ = 4, 2, 8, 4
    T = sum(chunks)
    q, k, v, wq, wk, gamma = make_inputs(T, H, Hk, D, F_, seed=3)
    o_ref, S_ref, z_ref = naive_lolcats_attn(q, k, v, wq, wk, gamma, W, D**-0.5, EPS)
    pool = empty_pool(3, H, Hk, D, F_, W)
    o = run_chunks(q, k, v, wq, wk, gamma, chunks, pool, slot=2, scale=D**-0.5)
    assert (o - o_ref).abs().max() < 1e-4
    assert torch.allclose(pool[0][2], S_ref, atol=1e-4) and torch.allclose(pool[1][2], z_ref, atol=1e-4)
    assert pool[0][[0, 1]].abs().sum() == 0 and pool[2][[0, 1]].abs().sum() == 0  # other rows untouched


def test_nonzero_initial_state_and_varlen_batch():
    """Two sequences in one varlen call, each resuming from a ring and a nonzero state, slots out of order."""
    H, Hk, D, F_, W = 4, 2, 8, 4, 8
    pool = empty_pool(4, H, Hk, D, F_, W)
    linear, normalizer, ring_k, ring_v = pool
    cases = []  # (slot, start, n)
    for slot, start, n, seed in ((3, 13, 9, 5), (1, 5, 1, 6), (2, 2, 6, 7)):
        q, k, v, wq, wk, gamma = make_inputs(n, H, Hk, D, F_, num_past=start, seed=seed)
        if cases:  # one feature map per layer: the first sequence's
            wq, wk, gamma = cases[0][4]
        # the state before `start`: keys 0..start-W-1 in S, z (random positive, as a real one), the rest in the ring
        S0 = torch.rand(H, 2 * F_, D)
        z0 = torch.rand(H, 2 * F_) + 1.0
        num_in_ring = min(start, W)
        linear[slot], normalizer[slot] = S0, z0
        for p in range(start - num_in_ring, start):
            ring_k[slot, p % W], ring_v[slot, p % W] = k[p], v[p]
        o_ref, S_ref, z_ref = naive_lolcats_attn(
            q, k[start - num_in_ring :], v[start - num_in_ring :], wq, wk, gamma, W, D**-0.5, EPS, S0, z0
        )
        cases.append((slot, start, n, (q, k[start:], v[start:], o_ref, S_ref, z_ref), (wq, wk, gamma)))
    wq, wk, gamma = cases[0][4]
    batch = ForwardBatch.build(
        [c[2] for c in cases], start_positions=[c[1] for c in cases], slot_ids=[c[0] for c in cases]
    )
    q = torch.cat([c[3][0] for c in cases])
    k = torch.cat([c[3][1] for c in cases])
    v = torch.cat([c[3][2] for c in cases])
    o = lolcats_attn_varlen(
        q, hedgehog_features(q, wq, EPS), k, v, wk, gamma, linear, normalizer, ring_k, ring_v, batch, D**-0.5, EPS
    )
    lo = 0
    for slot, _, n, (_, _, _, o_ref, S_ref, z_ref), _ in cases:
        assert (o[lo : lo + n] - o_ref).abs().max() < 1e-4
        assert torch.allclose(linear[slot], S_ref, atol=1e-4) and torch.allclose(normalizer[slot], z_ref, atol=1e-4)
        lo += n


def test_decode_batch_with_padding_rows():
    """A decode step of three sequences and a padding row (slot -1) equals each sequence alone."""
    H, Hk, D, F_, W = 4, 2, 8, 4, 4
    T = 11
    seqs = [make_inputs(T, H, Hk, D, F_, seed=s) for s in (10, 11, 12)]
    wq, wk, gamma = seqs[0][3], seqs[0][4], seqs[0][5]
    pool = empty_pool(5, H, Hk, D, F_, W)
    refs = []
    for i, (q, k, v, *_) in enumerate(seqs):
        lens = [T - 1 - i, 1]  # prefill all but the last token, each to a different length
        o = run_chunks(q[: T - i], k[: T - i], v[: T - i], wq, wk, gamma, [T - 1 - i], pool, 4 - i, D**-0.5)
        ref, _, _ = naive_lolcats_attn(q[: T - i], k[: T - i], v[: T - i], wq, wk, gamma, W, D**-0.5, EPS)
        assert (o - ref[:-1]).abs().max() < 1e-4 and lens
        refs.append(ref[-1])
    rows = [(4 - i, T - 1 - i, seqs[i]) for i in range(3)]
    batch = ForwardBatch.build(
        [1, 1, 1, 1], start_positions=[r[1] for r in rows] + [0], slot_ids=[r[0] for r in rows] + [-1]
    )
    pick = lambda j: torch.stack([r[2][j][r[1]] for r in rows] + [torch.zeros_like(rows[0][2][j][0])])  # noqa: E731
    q, k, v = pick(0), pick(1), pick(2)
    o = lolcats_attn_varlen(q, hedgehog_features(q, wq, EPS), k, v, wk, gamma, *pool, batch, D**-0.5, EPS)
    for i in range(3):
        assert (o[i] - refs[i]).abs().max() < 1e-4

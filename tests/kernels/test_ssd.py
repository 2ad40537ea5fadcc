"""SSD (Mamba2's state space update): chunked and batched-step forms against the token-by-token
reference, the varlen slot-pool wrapper against per-sequence references, and the reference against
transformers' own torch implementation of the recurrence."""

from __future__ import annotations

import pytest
import torch

from linrec.kernels.ssd import ssd_varlen
from linrec.kernels.ssd.naive import naive_ssd
from linrec.kernels.ssd.prefill import chunk_ssd, ssd_step
from linrec.models.batch import ForwardBatch

H, P, N = 4, 8, 16


def make_inputs(T: int, G: int = 2, decay_scale: float = 1.0, seed: int = 0, dtype=torch.float32):
    """x [T, H, P], dt [T, H] in (0.01, 0.6), A [H] < 0, B and C [T, G, N], D [H]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, P, generator=gen).to(dtype)
    dt = (torch.rand(T, H, generator=gen) * 0.6 + 0.01).to(dtype)
    A = -(torch.rand(H, generator=gen) * 2 + 0.1) * decay_scale
    B = torch.randn(T, G, N, generator=gen).to(dtype)
    C = torch.randn(T, G, N, generator=gen).to(dtype)
    D = torch.randn(H, generator=gen)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("T", [1, 2, 7, 16, 17, 63, 64, 65, 130])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_chunked_matches_naive(T: int, G: int):
    x, dt, A, B, C, D = make_inputs(T, G, seed=T)
    h0 = torch.randn(H, P, N, generator=torch.Generator().manual_seed(1))
    y_ref, s_ref = naive_ssd(x, dt, A, B, C, D, h0)
    for chunk_size in (1, 5, 16, 64):
        y, s = chunk_ssd(x, dt, A, B, C, D, h0, chunk_size=chunk_size)
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("decay_scale", [0.0, 30.0])
def test_chunked_extreme_decay(decay_scale: float):
    # A = 0 (no decay: the state only accumulates) and A ~ -60 (the state forgets within a few tokens,
    # running log decays reach the thousands inside a chunk)
    x, dt, A, B, C, D = make_inputs(150, 2, decay_scale=decay_scale, seed=3)
    h0 = torch.randn(H, P, N, generator=torch.Generator().manual_seed(2))
    y_ref, s_ref = naive_ssd(x, dt, A, B, C, D, h0)
    y, s = chunk_ssd(x, dt, A, B, C, D, h0, chunk_size=64)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    torch.testing.assert_close(y, y_ref, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(s, s_ref, atol=2e-4, rtol=2e-4)


def test_zero_initial_state_is_default():
    x, dt, A, B, C, D = make_inputs(9)
    y0, s0 = naive_ssd(x, dt, A, B, C, D)
    y1, s1 = chunk_ssd(x, dt, A, B, C, D, torch.zeros(H, P, N), chunk_size=4)
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-5)


def test_step_matches_naive():
    num_seqs = 5
    x, dt, A, B, C, D = make_inputs(num_seqs, seed=4)  # the token axis serves as the batch axis here
    states = torch.randn(num_seqs, H, P, N, generator=torch.Generator().manual_seed(5))
    before = states.clone()
    y, new_states = ssd_step(x, dt, A, B, C, D, states)
    torch.testing.assert_close(states, before, atol=0, rtol=0)  # pure: the caller writes back
    for b in range(num_seqs):
        y_ref, s_ref = naive_ssd(x[b : b + 1], dt[b : b + 1], A, B[b : b + 1], C[b : b + 1], D, states[b])
        torch.testing.assert_close(y[b], y_ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(new_states[b], s_ref, atol=1e-5, rtol=1e-5)


def _check_varlen(seq_lens: list[int], slot_ids: list[int], num_rows: int = 9):
    T = sum(seq_lens)
    x, dt, A, B, C, D = make_inputs(T, 2, seed=len(seq_lens) + T)
    pool = torch.randn(num_rows, H, P, N, generator=torch.Generator().manual_seed(6))
    initial = pool.clone()
    batch = ForwardBatch.build(seq_lens, slot_ids=slot_ids)
    y = ssd_varlen(x, dt, A, B, C, D, pool, batch)
    lo = 0
    for n, slot in zip(seq_lens, slot_ids):
        start = initial[slot] if slot >= 0 else None
        y_ref, s_ref = naive_ssd(x[lo : lo + n], dt[lo : lo + n], A, B[lo : lo + n], C[lo : lo + n], D, start)
        torch.testing.assert_close(y[lo : lo + n], y_ref, atol=1e-4, rtol=1e-4)
        if slot >= 0:
            torch.testing.assert_close(pool[slot], s_ref, atol=1e-4, rtol=1e-4)
        lo += n
    untouched = [r for r in range(num_rows) if r not in slot_ids]
    torch.testing.assert_close(pool[untouched], initial[untouched], atol=0, rtol=0)


def test_varlen_prefill_out_of_order_slots():
    _check_varlen([5, 1, 70, 64, 3], [4, 2, 7, 1, 5])


def test_varlen_decode_out_of_order_slots():
    _check_varlen([1, 1, 1, 1], [6, 2, 8, 3])


def test_varlen_negative_slot_reads_zeros_and_writes_nothing():
    _check_varlen([1, 1, 1], [3, -1, 5])
    _check_varlen([4, 2], [-1, 7])


def test_varlen_keeps_dtypes():
    x, dt, A, B, C, D = make_inputs(6, dtype=torch.bfloat16)
    pool = torch.zeros(3, H, P, N)
    y = ssd_varlen(x, dt, A, B, C, D, pool, ForwardBatch.build([4, 2], slot_ids=[2, 1]))
    assert y.dtype == torch.bfloat16 and pool.dtype == torch.float32
    with pytest.raises(ValueError, match="expected state of shape"):
        ssd_varlen(x, dt, A, B, C, D, torch.zeros(3, H, P, N + 1), ForwardBatch.build([6]))


# -- against transformers' torch implementation ---------------------------------------------------


def test_naive_matches_transformers_chunk_scan():
    hf = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    T, G = 45, 2
    x, dt, A, B, C, D = make_inputs(T, G, seed=7)
    h0 = torch.randn(H, P, N, generator=torch.Generator().manual_seed(8))
    y_ref, s_ref = naive_ssd(x, dt, A, B, C, D, h0)
    # dt is already final here, so no bias, no softplus; the default limit (0, inf) leaves it alone.
    y_hf, s_hf = hf.mamba2_chunk_scan(
        x[None], dt[None], A, B[None], C[None], chunk_size=16, D=D, initial_states=h0[None], return_final_states=True
    )
    print(
        f"naive vs transformers mamba2_chunk_scan: y {(y_hf[0] - y_ref).abs().max():.2e}, "
        f"state {(s_hf[0] - s_ref).abs().max():.2e}"
    )
    torch.testing.assert_close(y_hf[0], y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_hf[0], s_ref, atol=1e-4, rtol=1e-4)


def test_naive_matches_transformers_selective_state_update():
    hf = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    T, G = 12, 2
    x, dt, A, B, C, D = make_inputs(T, G, seed=9)
    h0 = torch.randn(H, P, N, generator=torch.Generator().manual_seed(10))
    y_ref, s_ref = naive_ssd(x, dt, A, B, C, D, h0)
    state = h0[None].clone()
    ys = []
    for t in range(T):  # transformers' decode step, fed per-(head, headdim) dt, A and D as its mixer does
        ys.append(
            hf.mamba2_selective_state_update(
                state,
                x[t][None],
                dt[t][None, :, None].expand(1, H, P),
                A[:, None, None].expand(H, P, N),
                B[t][None],
                C[t][None],
                D[:, None].expand(H, P),
            )[0]
        )
    y_hf = torch.stack(ys)
    print(
        f"naive vs transformers selective_state_update: y {(y_hf - y_ref).abs().max():.2e}, "
        f"state {(state[0] - s_ref).abs().max():.2e}"
    )
    torch.testing.assert_close(y_hf, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[0], s_ref, atol=1e-5, rtol=1e-5)

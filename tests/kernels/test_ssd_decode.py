"""Mamba2's Triton selective-state-update kernel (under TRITON_INTERPRET=1 without CUDA) against naive.py and
transformers' own torch decode step: odd shapes, groups, slots out of order, padding rows, several steps."""

from __future__ import annotations

import pytest
import torch

from linrec.kernels.ssd import ssd_varlen
from linrec.kernels.ssd.decode import ssd_decode_triton
from linrec.kernels.ssd.naive import naive_ssd
from linrec.models.batch import ForwardBatch

ATOL = 1e-5


def _step_inputs(B, H, P, G, N, seed, dtype=torch.float32):
    """x [B, H, P], dt [B, H] in (0.01, 0.61), A [H] < 0, B and C [B, G, N], D [H]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, P, generator=gen).to(dtype)
    dt = torch.rand(B, H, generator=gen) * 0.6 + 0.01
    A = -(torch.rand(H, generator=gen) * 2 + 0.1)
    Bm = torch.randn(B, G, N, generator=gen).to(dtype)
    Cm = torch.randn(B, G, N, generator=gen).to(dtype)
    D = torch.randn(H, generator=gen)
    return x, dt, A, Bm, Cm, D


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize(
    "H,P,G,N,slots,block_p,use_d",
    [
        (1, 16, 1, 16, [1], None, True),  # T=1, one sequence, one head
        (4, 6, 2, 5, [5, 0, 2, -1, 3], 4, True),  # odd P over two blocks, odd N, groups, padding rows 0 and -1
        (3, 5, 3, 16, [4, 1], None, False),  # one head per group, no D skip
    ],
)
def test_decode_steps_match_naive(H, P, G, N, slots, block_p, use_d):
    num_rows, num_steps = 7, 3
    state0 = torch.randn(num_rows, H, P, N, generator=torch.Generator().manual_seed(1))  # nonzero everywhere
    state, ref = state0.clone(), state0.clone()
    slot_ids = torch.tensor(slots)
    for step in range(num_steps):  # several steps in a row on the same pool
        x, dt, A, Bm, Cm, D = _step_inputs(len(slots), H, P, G, N, seed=10 * step + H)
        D = D if use_d else None
        y = ssd_decode_triton(x, dt, A, Bm, Cm, D, state, slot_ids, block_p=block_p)
        for b, s in enumerate(slots):
            if s <= 0:
                assert not y[b].any(), f"padding row {b} (slot {s}) must output zeros"
                continue
            sl = slice(b, b + 1)
            y_ref, ref[s] = naive_ssd(x[sl], dt[sl], A, Bm[sl], Cm[sl], D, ref[s])
            assert _max_diff(y[b], y_ref[0]) < ATOL, f"step {step} row {b}"
    print(f"triton ssd decode vs naive H={H} P={P} G={G} N={N}: state {_max_diff(state, ref):.2e}")
    assert _max_diff(state, ref) < ATOL
    untouched = [r for r in range(num_rows) if r not in slots or r == 0]
    assert torch.equal(state[untouched], state0[untouched]), "the null slot and unused rows must stay as they were"


def test_decode_matches_transformers_selective_state_update():
    """Against transformers' torch decode step (fed per-(head, headdim) dt, A and D as its mixer does)."""
    hf = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    H, P, G, N = 4, 6, 2, 5
    x, dt, A, Bm, Cm, D = _step_inputs(2, H, P, G, N, seed=3)
    pool = torch.randn(4, H, P, N, generator=torch.Generator().manual_seed(4))
    slots = [3, 1]
    hf_state = pool[slots].clone()
    y_hf = hf.mamba2_selective_state_update(
        hf_state,
        x,
        dt[:, :, None].expand(2, H, P),
        A[:, None, None].expand(H, P, N),
        Bm,
        Cm,
        D[:, None].expand(H, P),
    )
    y = ssd_decode_triton(x, dt, A, Bm, Cm, D, pool, torch.tensor(slots))
    y_err, state_err = _max_diff(y, y_hf), _max_diff(pool[slots], hf_state)
    print(f"triton ssd decode vs transformers: y {y_err:.2e}, state {state_err:.2e}")
    assert y_err < ATOL and state_err < ATOL


def test_bf16_inputs_return_bf16_and_keep_fp32_state():
    H, P, G, N = 2, 8, 1, 8
    x, dt, A, Bm, Cm, D = _step_inputs(2, H, P, G, N, seed=5, dtype=torch.bfloat16)
    state = torch.randn(3, H, P, N, generator=torch.Generator().manual_seed(6))
    ref = state.clone()
    y = ssd_decode_triton(x, dt, A, Bm, Cm, D, state, torch.tensor([2, 1]))
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    for b, s in enumerate([2, 1]):
        sl = slice(b, b + 1)
        y_ref, ref[s] = naive_ssd(x[sl], dt[sl], A, Bm[sl], Cm[sl], D, ref[s])
        torch.testing.assert_close(y[b].float(), y_ref[0], rtol=1e-2, atol=1e-2)  # bf16 rounding of the output
    assert _max_diff(state, ref) < 1e-5


def test_rejects_a_state_it_cannot_update_in_place():
    x, dt, A, Bm, Cm, D = _step_inputs(1, 2, 4, 1, 4, seed=7)
    with pytest.raises(ValueError, match="fp32 state"):
        ssd_decode_triton(x, dt, A, Bm, Cm, D, torch.zeros(2, 2, 4, 4, dtype=torch.bfloat16), torch.tensor([1]))
    with pytest.raises(ValueError, match="slot_ids"):
        ssd_decode_triton(x, dt, A, Bm, Cm, D, torch.zeros(2, 2, 4, 4), torch.tensor([1, 0]))


def test_triton_backend_mixed_batch_matches_torch():
    """backend="triton" on a mixed step: the 1-token sequences through the kernel, the rest chunked."""
    H, P, G, N = 2, 4, 1, 8
    batch = ForwardBatch.build([1, 6, 1], start_positions=[9, 0, 4], slot_ids=[3, 1, 2])
    x, dt, A, Bm, Cm, D = _step_inputs(batch.num_tokens, H, P, G, N, seed=8)
    state0 = torch.randn(4, H, P, N, generator=torch.Generator().manual_seed(9))
    results = {}
    for backend in ("torch", "triton"):
        state = state0.clone()
        results[backend] = (ssd_varlen(x, dt, A, Bm, Cm, D, state, batch, backend), state)
    assert _max_diff(results["triton"][0], results["torch"][0]) < 1e-4
    assert _max_diff(results["triton"][1], results["torch"][1]) < 1e-4

"""The gated delta rule's Triton decode kernel (under TRITON_INTERPRET=1 without CUDA) against naive.py and
fla-core's naive recurrence: odd shapes, grouped value heads, slots out of order, padding rows, several steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linrec.kernels.gated_delta import gated_delta_varlen
from linrec.kernels.gated_delta.decode import gated_delta_decode_triton
from linrec.kernels.gated_delta.naive import naive_recurrent_gated_delta
from linrec.models.batch import ForwardBatch

ATOL = 2e-5


def _step_inputs(B, H, HV, K, V, seed, dtype=torch.float32):
    """One token per sequence: q, k [B, H, K] (k L2-normed, as the model feeds it), v [B, HV, V], g, beta [B, HV]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, K, generator=gen)
    k = F.normalize(torch.randn(B, H, K, generator=gen), dim=-1)
    v = torch.randn(B, HV, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, HV, generator=gen) + 2.0)
    beta = torch.rand(B, HV, generator=gen)
    return [x.to(dtype) for x in (q, k, v, g, beta)]


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize(
    "H,HV,K,V,slots,block_v",
    [
        (1, 1, 16, 16, [1], None),  # T=1, K=V=16, one sequence
        (2, 4, 16, 12, [5, 0, 2, -1, 3], 8),  # GVA, V not a power of two over two blocks, padding rows 0 and -1
        (1, 3, 12, 20, [4, 1], 16),  # K not a power of two (masked lanes), three value heads on one key head
    ],
)
def test_decode_steps_match_naive(H, HV, K, V, slots, block_v):
    num_rows, scale, num_steps = 7, K**-0.5, 3
    state0 = torch.randn(num_rows, HV, K, V, generator=torch.Generator().manual_seed(1))  # nonzero everywhere
    state, ref = state0.clone(), state0.clone()
    slot_ids = torch.tensor(slots)
    real = [b for b, s in enumerate(slots) if s > 0]
    for step in range(num_steps):  # several steps in a row on the same pool
        q, k, v, g, beta = _step_inputs(len(slots), H, HV, K, V, seed=10 * step + HV)
        o = gated_delta_decode_triton(q, k, v, g, beta, state, slot_ids, scale, block_v=block_v)
        for b in real:
            s = slots[b]
            o_ref, ref[s] = naive_recurrent_gated_delta(
                q[b : b + 1], k[b : b + 1], v[b : b + 1], g[b : b + 1], beta[b : b + 1], ref[s], scale
            )
            assert _max_diff(o[b], o_ref[0]) < ATOL, f"step {step} row {b}"
        padding = [b for b in range(len(slots)) if slots[b] <= 0]
        assert not o[padding].any(), "padding rows (slot 0 or negative) must output zeros"
    print(f"triton decode vs naive H={H} HV={HV} K={K} V={V}: state {_max_diff(state, ref):.2e}")
    assert _max_diff(state, ref) < ATOL
    untouched = [r for r in range(num_rows) if r not in slots or r == 0]
    assert torch.equal(state[untouched], state0[untouched]), "the null slot and unused rows must stay as they were"


def test_decode_matches_fla_naive_recurrence():
    """Token by token through the kernel == fla-core's naive_recurrent_gated_delta_rule over the sequence."""
    fla_naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    T, H, K, V, scale = 4, 2, 16, 16, 0.37
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(T, H, K, generator=gen)
    k = F.normalize(torch.randn(T, H, K, generator=gen), dim=-1)
    v = torch.randn(T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(T, H, generator=gen) + 2.0)
    beta = torch.rand(T, H, generator=gen)
    h0 = torch.randn(H, K, V, generator=gen)
    pool = torch.zeros(3, H, K, V)
    pool[2] = h0
    slot = torch.tensor([2])
    o = torch.stack([gated_delta_decode_triton(q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1],
                                               beta[t : t + 1], pool, slot, scale)[0] for t in range(T)])  # fmt: skip
    # fla: [B, T, H, *] tensors, key-first [B, H, K, V] states (ours), scale given explicitly
    o_ref, final_ref = fla_naive.naive_recurrent_gated_delta_rule(
        q[None], k[None], v[None], beta[None], g[None], scale=scale, initial_state=h0[None], output_final_state=True
    )
    print(f"triton decode vs fla naive: out {_max_diff(o, o_ref[0]):.2e}, state {_max_diff(pool[2], final_ref[0]):.2e}")
    assert _max_diff(o, o_ref[0]) < ATOL and _max_diff(pool[2], final_ref[0]) < ATOL
    assert not pool[[0, 1]].any()


def test_bf16_inputs_return_bf16_and_keep_fp32_state():
    q, k, v, g, beta = _step_inputs(2, 2, 2, 16, 16, seed=5, dtype=torch.bfloat16)
    state = torch.randn(3, 2, 16, 16, generator=torch.Generator().manual_seed(6))
    ref = state.clone()
    slots = torch.tensor([2, 1])
    o = gated_delta_decode_triton(q, k, v, g, beta, state, slots, 0.25)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    for b, s in enumerate(slots.tolist()):
        o_ref, ref[s] = naive_recurrent_gated_delta(q[b : b + 1], k[b : b + 1], v[b : b + 1], g[b : b + 1],
                                                    beta[b : b + 1], ref[s], 0.25)  # fmt: skip
        assert _max_diff(o[b], o_ref[0]) < 3e-2
    assert _max_diff(state, ref) < 1e-5  # the state sees the same bf16 inputs, in fp32


def test_rejects_a_state_it_cannot_update_in_place():
    q, k, v, g, beta = _step_inputs(1, 1, 1, 16, 16, seed=7)
    slots = torch.tensor([1])
    with pytest.raises(ValueError, match="fp32 state"):
        gated_delta_decode_triton(q, k, v, g, beta, torch.zeros(2, 1, 16, 16, dtype=torch.bfloat16), slots)
    with pytest.raises(ValueError, match="contiguous fp32 state"):
        gated_delta_decode_triton(q, k, v, g, beta, torch.zeros(2, 1, 16, 32)[..., ::2], slots)


def test_triton_backend_mixed_batch_matches_torch():
    """backend="triton" on a mixed step: the 1-token sequences through the kernel, the rest chunked."""
    H, HV, K, V = 1, 2, 16, 16
    batch = ForwardBatch.build([1, 5, 1], start_positions=[9, 0, 4], slot_ids=[3, 1, 2])
    gen = torch.Generator().manual_seed(8)
    T = batch.num_tokens
    q = torch.randn(T, H, K, generator=gen)
    k = F.normalize(torch.randn(T, H, K, generator=gen), dim=-1)
    v = torch.randn(T, HV, V, generator=gen)
    g = F.logsigmoid(torch.randn(T, HV, generator=gen) + 2.0)
    beta = torch.rand(T, HV, generator=gen)
    state0 = torch.randn(4, HV, K, V, generator=gen)
    results = {}
    for backend in ("torch", "triton"):
        state = state0.clone()
        results[backend] = (gated_delta_varlen(q, k, v, g, beta, state, batch, 0.25, backend), state)
    assert _max_diff(results["triton"][0], results["torch"][0]) < ATOL
    assert _max_diff(results["triton"][1], results["torch"][1]) < ATOL

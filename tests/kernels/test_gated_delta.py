"""Gated delta rule: naive vs fla-core's references, chunked and decode paths vs naive, on odd shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linrec.kernels.gated_delta import gated_delta_varlen
from linrec.kernels.gated_delta.naive import naive_recurrent_gated_delta
from linrec.kernels.gated_delta.prefill import chunk_gated_delta
from linrec.models.batch import ForwardBatch

ATOL = 2e-5


def _inputs(T, H, HV, K, V, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, K, generator=gen)
    k = F.normalize(torch.randn(T, H, K, generator=gen), dim=-1)  # the delta rule is stable for |k| <= 1
    v = torch.randn(T, HV, V, generator=gen)
    g = F.logsigmoid(torch.randn(T, HV, generator=gen) + 2.0)
    beta = torch.rand(T, HV, generator=gen)
    return [x.to(dtype) for x in (q, k, v, g, beta)]


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def fla_naive():
    naive = pytest.importorskip("fla.ops.gated_delta_rule.naive")
    return naive


@pytest.mark.parametrize("T,H,K,V", [(1, 2, 16, 16), (9, 2, 16, 16), (70, 3, 8, 12)])
def test_naive_matches_fla_naive(fla_naive, T, H, K, V):
    q, k, v, g, beta = _inputs(T, H, H, K, V, seed=T)
    h0 = torch.randn(H, K, V, generator=torch.Generator().manual_seed(7))
    scale = 0.37
    o, final = naive_recurrent_gated_delta(q, k, v, g, beta, h0, scale)
    # fla: [B, T, H, *] tensors, key-first [B, H, K, V] states, scale given explicitly
    o_ref, final_ref = fla_naive.naive_recurrent_gated_delta_rule(
        q[None], k[None], v[None], beta[None], g[None], scale=scale, initial_state=h0[None], output_final_state=True
    )
    o_chunk_ref, final_chunk_ref = fla_naive.naive_chunk_gated_delta_rule(
        q[None], k[None], v[None], g[None], beta[None], chunk_size=16, scale=scale,
        initial_state=h0[None], output_final_state=True,
    )  # fmt: skip
    errs = [
        _max_diff(o, o_ref[0]),
        _max_diff(final, final_ref[0]),
        _max_diff(o, o_chunk_ref[0]),
        _max_diff(final, final_chunk_ref[0]),
    ]
    print(f"naive vs fla naive T={T} H={H} K={K} V={V}: recurrent out/state {errs[0]:.2e}/{errs[1]:.2e}, "
          f"chunk out/state {errs[2]:.2e}/{errs[3]:.2e}")  # fmt: skip
    assert max(errs) < ATOL


def test_fla_naive_default_scale_is_inverse_sqrt_k(fla_naive):
    """fla's default scale is K^-0.5: pre-scaling q and asking fla for scale 1 must agree with scale None."""
    q, k, v, g, beta = _inputs(5, 2, 2, 16, 16, seed=3)
    o, _ = naive_recurrent_gated_delta(q, k, v, g, beta, None, scale=16**-0.5)
    o_ref, _ = fla_naive.naive_recurrent_gated_delta_rule(q[None], k[None], v[None], beta[None], g[None])
    assert _max_diff(o, o_ref[0]) < ATOL


def test_gva_maps_value_heads_to_consecutive_groups():
    """HV = 2H: value heads 2h and 2h+1 read query/key head h (fla's i_h = i_hv // (HV // H))."""
    q, k, v, g, beta = _inputs(6, 2, 4, 16, 16, seed=4)
    o, final = naive_recurrent_gated_delta(q, k, v, g, beta, None, 0.5)
    for hv in range(4):
        h = hv // 2
        o_h, final_h = naive_recurrent_gated_delta(
            q[:, h : h + 1], k[:, h : h + 1], v[:, hv : hv + 1], g[:, hv : hv + 1], beta[:, hv : hv + 1], None, 0.5
        )
        assert _max_diff(o[:, hv], o_h[:, 0]) < ATOL
        assert _max_diff(final[hv], final_h[0]) < ATOL


@pytest.mark.parametrize("T,chunk", [(1, 64), (5, 4), (64, 64), (70, 16), (130, 64)])
@pytest.mark.parametrize("H,HV", [(2, 2), (1, 3)])
def test_chunked_matches_naive(T, chunk, H, HV):
    K, V = 16, 8
    q, k, v, g, beta = _inputs(T, H, HV, K, V, seed=T + HV)
    h0 = torch.randn(HV, K, V, generator=torch.Generator().manual_seed(11))
    o_ref, final_ref = naive_recurrent_gated_delta(q, k, v, g, beta, h0, 0.25)
    o, final = chunk_gated_delta(q[None], k[None], v[None], g[None], beta[None], h0[None], 0.25, chunk_size=chunk)
    err, state_err = _max_diff(o[0], o_ref), _max_diff(final[0], final_ref)
    print(f"chunked vs naive T={T} chunk={chunk} H={H} HV={HV}: out {err:.2e}, state {state_err:.2e}")
    assert err < ATOL and state_err < ATOL


def _run_naive(q, k, v, g, beta, state, batch, scale):
    state = state.clone()
    o = torch.empty(q.shape[0], v.shape[1], v.shape[2])
    offsets = batch.cu_seqlens.tolist()
    for b, slot in enumerate(batch.slot_ids_host):
        lo, hi = offsets[b], offsets[b + 1]
        o[lo:hi], state[slot] = naive_recurrent_gated_delta(
            q[lo:hi], k[lo:hi], v[lo:hi], g[lo:hi], beta[lo:hi], state[slot], scale
        )
    return o, state


@pytest.mark.parametrize(
    "seq_lens,slots",
    [
        ([1], [2]),  # T=1: the decode step
        ([1, 1, 1], [5, 1, 3]),  # decode-only batch, slots out of order
        ([7, 1, 70, 3], [4, 2, 6, 1]),  # varlen prefill with a 1-token sequence and one longer than a chunk
        ([33], [3]),
    ],
)
@pytest.mark.parametrize("H,HV", [(2, 2), (2, 4)])
def test_varlen_matches_naive(seq_lens, slots, H, HV):
    K = V = 16
    num_rows = 7
    batch = ForwardBatch.build(seq_lens, slot_ids=slots)
    q, k, v, g, beta = _inputs(batch.num_tokens, H, HV, K, V, seed=sum(seq_lens))
    state0 = torch.randn(num_rows, HV, K, V, generator=torch.Generator().manual_seed(5))  # nonzero everywhere
    o_ref, state_ref = _run_naive(q, k, v, g, beta, state0, batch, K**-0.5)
    state = state0.clone()
    o = gated_delta_varlen(q, k, v, g, beta, state, batch, scale=K**-0.5)
    err, state_err = _max_diff(o, o_ref), _max_diff(state, state_ref)
    print(f"varlen vs naive {seq_lens} slots {slots} H={H} HV={HV}: out {err:.2e}, state {state_err:.2e}")
    assert err < ATOL and state_err < ATOL
    untouched = [r for r in range(num_rows) if r not in slots]
    assert torch.equal(state[untouched], state0[untouched])


def test_chunked_prefill_then_decode_equals_whole():
    K = V = 16
    q, k, v, g, beta = _inputs(23, 2, 2, K, V, seed=8)
    whole = torch.zeros(2, 2, K, V)
    o_whole = gated_delta_varlen(q, k, v, g, beta, whole, ForwardBatch.build([23]), scale=0.3)
    state, outs, start = torch.zeros(2, 2, K, V), [], 0
    for n in (10, 7, 1, 1, 4):
        sl = slice(start, start + n)
        outs.append(
            gated_delta_varlen(q[sl], k[sl], v[sl], g[sl], beta[sl], state, ForwardBatch.build([n], [start]), 0.3)
        )
        start += n
    assert _max_diff(torch.cat(outs), o_whole) < ATOL
    assert _max_diff(state, whole) < ATOL


def test_decode_negative_slot_is_the_null_slot():
    q, k, v, g, beta = _inputs(2, 2, 2, 16, 16)
    state = torch.randn(4, 2, 16, 16)
    before = state.clone()
    batch = ForwardBatch.build([1, 1], [5, 5], [2, -1])
    gated_delta_varlen(q, k, v, g, beta, state, batch, backend="torch")
    assert torch.equal(state[3], before[3]) and torch.equal(state[1], before[1])  # last row untouched
    assert not torch.equal(state[2], before[2])


def test_bf16_inputs_return_bf16():
    K = V = 16
    q, k, v, g, beta = _inputs(9, 2, 2, K, V, seed=9, dtype=torch.bfloat16)
    batch = ForwardBatch.build([6, 3])
    state = torch.zeros(3, 2, K, V)
    o = gated_delta_varlen(q, k, v, g, beta, state, batch, scale=0.25)
    o_ref, state_ref = _run_naive(q, k, v, g, beta, torch.zeros(3, 2, K, V), batch, 0.25)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert _max_diff(o, o_ref) < 3e-2 and _max_diff(state, state_ref) < 1e-4


def test_rejects_mismatched_shapes():
    q, k, v, g, beta = _inputs(4, 2, 3, 16, 16)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        gated_delta_varlen(q, k, v, g, beta, torch.zeros(2, 3, 16, 16), ForwardBatch.build([4]))
    q, k, v, g, beta = _inputs(4, 2, 2, 16, 16)
    with pytest.raises(ValueError, match="state"):
        gated_delta_varlen(q, k, v, g, beta, torch.zeros(2, 2, 16, 8), ForwardBatch.build([4]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("H,HV", [(2, 2), (2, 4)])
def test_triton_backend_matches_torch_on_cuda(H, HV):
    K = V = 64
    batch = ForwardBatch.build([100, 1, 37, 5], slot_ids=[3, 1, 4, 2], device="cuda")
    q, k, v, g, beta = (x.cuda() for x in _inputs(batch.num_tokens, H, HV, K, V, seed=12))
    state0 = torch.randn(5, HV, K, V, device="cuda") * 0.1
    results = {}
    for backend in ("torch", "triton"):
        state = state0.clone()
        o = gated_delta_varlen(q, k, v, g, beta, state, batch, scale=K**-0.5, backend=backend)
        results[backend] = (o, state)
    err = _max_diff(results["triton"][0], results["torch"][0])
    state_err = _max_diff(results["triton"][1], results["torch"][1])
    print(f"fla chunk (triton) vs torch chunked on CUDA H={H} HV={HV}: out {err:.2e}, state {state_err:.2e}")
    assert err < 2e-3 and state_err < 2e-3

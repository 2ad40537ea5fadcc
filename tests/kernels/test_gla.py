"""GLA ops: our naive reference against fla-core's, the chunked form and the varlen/decode dispatch
against our naive, on odd shapes, grouped heads, out-of-order slots and nonzero initial states."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linrec.kernels.gla import gla_varlen
from linrec.kernels.gla.naive import naive_recurrent_gla
from linrec.kernels.gla.prefill import chunk_gla
from linrec.kernels.gla.step import gla_step
from linrec.models.batch import ForwardBatch


def make_inputs(T, H, Hk, K, V, decay=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, K, generator=gen)
    k = torch.randn(T, Hk, K, generator=gen)
    v = torch.randn(T, Hk, V, generator=gen)
    # log decays in (-inf, 0); `decay` scales how fast the state forgets
    g = F.logsigmoid(torch.randn(T, Hk, K, generator=gen) * decay + 1.0) * decay
    s0 = torch.randn(Hk, K, V, generator=gen)
    return q, k, v, g, s0


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("H,Hk,K,V", [(2, 2, 16, 16), (4, 2, 8, 12), (6, 3, 16, 16)])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_naive_matches_fla_core_naive(H, Hk, K, V, scale):
    from fla.ops.gla.naive import naive_recurrent_gla as fla_naive

    T = 9
    q, k, v, g, s0 = make_inputs(T, H, Hk, K, V)
    o, s = naive_recurrent_gla(q, k, v, g, s0, scale)

    # fla-core has one state per query head: repeat each KV head over its query group. It hard-codes
    # scale K^-0.5, so q is pre-scaled to turn that into ours.
    group = H // Hk
    rep = lambda x: x.repeat_interleave(group, dim=1)[None]  # [1, T, H, *]
    q_fla = (q * scale * K**0.5)[None]
    o_ref, s_ref = fla_naive(
        q_fla, rep(k), rep(v), rep(g), initial_state=s0.repeat_interleave(group, 0)[None], output_final_state=True
    )
    d_o, d_s = max_diff(o, o_ref[0]), max_diff(s.repeat_interleave(group, 0), s_ref[0])
    print(f"naive vs fla-core naive H={H} Hk={Hk} K={K} V={V}: max|do|={d_o:.2e} max|dS|={d_s:.2e}")
    assert d_o < 1e-4 and d_s < 1e-4


@pytest.mark.parametrize("T", [1, 7, 64, 65, 130])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunk_matches_naive(T, chunk_size):
    H, Hk, K, V = 4, 2, 16, 16
    q, k, v, g, s0 = make_inputs(T, H, Hk, K, V, seed=T)
    o_ref, s_ref = naive_recurrent_gla(q, k, v, g, s0, 0.5)
    o, s = chunk_gla(q, k, v, g, s0, 0.5, chunk_size=chunk_size)
    d_o, d_s = max_diff(o, o_ref), max_diff(s, s_ref)
    print(f"chunk vs naive T={T} C={chunk_size}: max|do|={d_o:.2e} max|dS|={d_s:.2e}")
    assert d_o < 1e-4 and d_s < 1e-4


def test_chunk_is_stable_under_strong_decay():
    # A chunk's decays sum to about -500 here: exp(-b_s) alone would overflow fp32 to inf.
    T, H, Hk, K, V = 70, 2, 1, 16, 16
    q, k, v, _, s0 = make_inputs(T, H, Hk, K, V)
    g = torch.full((T, Hk, K), -8.0)
    g[:, :, ::2] = -0.01
    o_ref, s_ref = naive_recurrent_gla(q, k, v, g, s0)
    o, s = chunk_gla(q, k, v, g, s0)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    d_o, d_s = max_diff(o, o_ref), max_diff(s, s_ref)
    print(f"chunk vs naive, strong decay: max|do|={d_o:.2e} max|dS|={d_s:.2e}")
    assert d_o < 1e-4 and d_s < 1e-4


def test_chunk_without_initial_state_starts_from_zeros():
    q, k, v, g, _ = make_inputs(20, 2, 2, 16, 16)
    o, s = chunk_gla(q, k, v, g)
    o_ref, s_ref = naive_recurrent_gla(q, k, v, g, torch.zeros(2, 16, 16))
    assert max_diff(o, o_ref) < 1e-4 and max_diff(s, s_ref) < 1e-4


def run_reference(q, k, v, g, state, batch, scale):
    """Per sequence naive recurrence from a copy of the pool; returns o and the updated pool."""
    state = state.clone()
    o = torch.empty(q.shape[0], q.shape[1], v.shape[2])
    lo = 0
    for n, slot in zip(batch.seq_lens, batch.slot_ids_host):
        o[lo : lo + n], state[slot] = naive_recurrent_gla(
            q[lo : lo + n], k[lo : lo + n], v[lo : lo + n], g[lo : lo + n], state[slot], scale
        )
        lo += n
    return o, state


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_varlen_prefill_matches_naive(backend):
    H, Hk, K, V = 4, 2, 16, 16
    seq_lens, slots = [5, 1, 70, 3], [3, 1, 5, 2]
    T = sum(seq_lens)
    q, k, v, g, _ = make_inputs(T, H, Hk, K, V)
    state = torch.randn(7, Hk, K, V)  # rows 4 and 6 belong to no sequence and must not change
    batch = ForwardBatch.build(seq_lens, start_positions=[0, 9, 2, 0], slot_ids=slots)
    o_ref, state_ref = run_reference(q, k, v, g, state, batch, 0.25)
    o = gla_varlen(q, k, v, g, state, batch, scale=0.25, backend=backend)
    d_o, d_s = max_diff(o, o_ref), max_diff(state, state_ref)
    print(f"gla_varlen prefill vs naive: max|do|={d_o:.2e} max|dS|={d_s:.2e}")
    assert d_o < 1e-4 and d_s < 1e-4
    assert torch.equal(state[4], state_ref[4]) and torch.equal(state[6], state_ref[6])


def test_varlen_decode_matches_naive_with_padding_row():
    H, Hk, K, V = 4, 2, 16, 16
    slots = [4, 1, 0, 3]  # out of order; row 2 of the batch is padding on the null slot
    q, k, v, g, _ = make_inputs(len(slots), H, Hk, K, V)
    state = torch.randn(6, Hk, K, V)
    batch = ForwardBatch.build([1] * len(slots), start_positions=[7, 3, 0, 12], slot_ids=slots)
    assert batch.is_decode
    o_ref, state_ref = run_reference(q, k, v, g, state, batch, 1.0)
    o = gla_varlen(q, k, v, g, state, batch)
    real = [0, 1, 3]
    d_o = max_diff(o[real], o_ref[real])
    d_s = max_diff(state[1:], state_ref[1:])
    print(f"gla_varlen decode vs naive: max|do|={d_o:.2e} max|dS|={d_s:.2e}")
    assert d_o < 1e-5 and d_s < 1e-5
    assert torch.equal(state[2], state_ref[2]) and torch.equal(state[5], state_ref[5])


def test_decode_steps_equal_one_prefill():
    # 1-token steps through gla_step chain into the same state as one chunked pass
    H, Hk, K, V, T = 6, 3, 16, 16, 11
    q, k, v, g, s0 = make_inputs(T, H, Hk, K, V)
    state = torch.zeros(3, Hk, K, V)
    state[2] = s0
    slot = torch.tensor([2])
    outs = [gla_step(q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1], state, slot) for t in range(T)]
    o_ref, s_ref = chunk_gla(q, k, v, g, s0)
    assert max_diff(torch.cat(outs), o_ref) < 1e-4 and max_diff(state[2], s_ref) < 1e-4
    assert torch.equal(state[1], torch.zeros(Hk, K, V))


def test_output_dtype_follows_v_and_state_stays_fp32():
    H, Hk, K, V = 2, 1, 16, 16
    q, k, v, g, _ = make_inputs(6, H, Hk, K, V)
    state = torch.zeros(2, Hk, K, V)
    batch = ForwardBatch.build([6])
    o = gla_varlen(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, state, batch)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32


def test_rejects_ungrouped_heads_and_unknown_backend():
    q, k, v, g, _ = make_inputs(3, 3, 2, 16, 16)
    with pytest.raises(ValueError, match="divisible"):
        chunk_gla(q, k, v, g)
    with pytest.raises(ValueError, match="backend"):
        gla_varlen(q, k, v, g, torch.zeros(2, 2, 16, 16), ForwardBatch.build([3]), backend="cuda")

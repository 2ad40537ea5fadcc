"""GLA decode kernel (Triton; under TRITON_INTERPRET=1 without a GPU) against the naive recurrence and the
torch step: grouped heads, odd K and V, every decay form, slots out of order, padding rows, several steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linrec.kernels.gla import gla_varlen
from linrec.kernels.gla.decode import gla_decode
from linrec.kernels.gla.naive import naive_recurrent_gla
from linrec.kernels.gla.step import gla_step
from linrec.models.batch import ForwardBatch

# batch rows -> pool rows: out of order, with a null-slot row and a negative-slot row as padding
SLOTS = [5, 2, 0, 3, -1]
REAL = [0, 1, 3]
NUM_ROWS = 7  # rows 1, 4 and 6 belong to no sequence


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def make_step(B, H, Hk, K, V, gate, gen, dtype=torch.float32):
    q = torch.randn(B, H, K, generator=gen).to(dtype)
    k = torch.randn(B, Hk, K, generator=gen).to(dtype)
    v = torch.randn(B, Hk, V, generator=gen).to(dtype)
    g = {
        "channel": F.logsigmoid(torch.randn(B, Hk, K, generator=gen) + 1.0),
        "head": F.logsigmoid(torch.randn(B, Hk, generator=gen) + 1.0),
        "constant": F.logsigmoid(torch.randn(Hk, generator=gen) + 1.0),
        "none": None,
    }[gate]
    return q, k, v, g


def per_channel(g, B, Hk, K):
    """Any accepted decay form as the [B, Hk, K] log decays the naive reference takes."""
    if g is None:
        return torch.zeros(B, Hk, K)
    if g.dim() == 1:
        return g[None, :, None].expand(B, Hk, K)
    if g.dim() == 2:
        return g[:, :, None].expand(B, Hk, K)
    return g


@pytest.mark.parametrize("H,Hk,K,V", [(2, 2, 16, 16), (4, 2, 16, 16), (6, 2, 12, 20), (3, 1, 16, 40)])
@pytest.mark.parametrize("gate", ["channel", "head", "constant", "none"])
def test_decode_steps_match_naive(H, Hk, K, V, gate):
    """Three steps in a row over a pool with nonzero states; each real row against the naive recurrence
    run over its sequence so far, padding rows and unowned pool rows bit-for-bit untouched."""
    gen = torch.Generator().manual_seed(H * 100 + K)
    B, num_steps, scale = len(SLOTS), 3, 0.37
    state = torch.randn(NUM_ROWS, Hk, K, V, generator=gen)
    initial = state.clone()
    steps = [make_step(B, H, Hk, K, V, gate, gen) for _ in range(num_steps)]
    slot_ids = torch.tensor(SLOTS)
    outs = [gla_decode(q, k, v, g, state, slot_ids, scale) for q, k, v, g in steps]

    d_o = d_s = 0.0
    for b in REAL:
        seq = [torch.stack([s[i][b] for s in steps]) for i in range(3)]  # q, k, v over the steps
        g_seq = torch.stack([per_channel(s[3], B, Hk, K)[b] for s in steps])
        o_ref, s_ref = naive_recurrent_gla(*seq, g_seq, initial[SLOTS[b]], scale)
        d_o = max(d_o, max_diff(torch.stack([o[b] for o in outs]), o_ref))
        d_s = max(d_s, max_diff(state[SLOTS[b]], s_ref))
    print(f"gla_decode vs naive H={H} Hk={Hk} K={K} V={V} gate={gate}: max|do|={d_o:.2e} max|dS|={d_s:.2e}")
    assert d_o < 1e-5 and d_s < 1e-5
    for row in (0, 1, 4, 6):  # the null slot, and rows no sequence owns
        assert torch.equal(state[row], initial[row])
    for o in outs:
        assert torch.equal(o[[2, 4]], torch.zeros(2, H, V))  # padding rows answer zeros
    assert all(o.dtype == torch.float32 and o.shape == (B, H, V) for o in outs)


@pytest.mark.parametrize("H,Hk,K,V", [(4, 2, 16, 16), (6, 3, 12, 20)])
def test_decode_matches_torch_step(H, Hk, K, V):
    """Same contract as gla_step (the torch decode path) on the rows both define: the real ones."""
    gen = torch.Generator().manual_seed(7)
    B = len(SLOTS)
    state = torch.randn(NUM_ROWS, Hk, K, V, generator=gen)
    state_torch = state.clone()
    q, k, v, g = make_step(B, H, Hk, K, V, "channel", gen)
    o = gla_decode(q, k, v, g, state, torch.tensor(SLOTS), 0.5)
    o_torch = gla_step(q, k, v, g, state_torch, torch.tensor(SLOTS), 0.5)
    d_o, d_s = max_diff(o[REAL], o_torch[REAL]), max_diff(state[1:], state_torch[1:])
    print(f"gla_decode vs gla_step: max|do|={d_o:.2e} max|dS|={d_s:.2e}")
    assert d_o < 1e-5 and d_s < 1e-5


def test_half_precision_inputs_update_the_fp32_state():
    gen = torch.Generator().manual_seed(3)
    H, Hk, K, V = 4, 2, 16, 16
    state = torch.randn(NUM_ROWS, Hk, K, V, generator=gen)
    initial = state.clone()
    q, k, v, g = make_step(len(SLOTS), H, Hk, K, V, "channel", gen, dtype=torch.bfloat16)
    o = gla_decode(q, k, v, g, state, torch.tensor(SLOTS))
    d_o = d_s = 0.0
    for b in REAL:
        o_ref, s_ref = naive_recurrent_gla(q[b : b + 1], k[b : b + 1], v[b : b + 1], g[b : b + 1], initial[SLOTS[b]])
        d_o, d_s = max(d_o, max_diff(o[b], o_ref[0])), max(d_s, max_diff(state[SLOTS[b]], s_ref))
    print(f"gla_decode, bf16 q/k/v: max|do|={d_o:.2e} max|dS|={d_s:.2e}")
    assert d_o < 1e-5 and d_s < 1e-5 and state.dtype == torch.float32


def test_varlen_dispatch_runs_the_kernel_at_decode_and_in_mixed_steps():
    """backend="triton" through gla_varlen: a decode step and a mixed step (the 1-token sequence on the
    kernel, the others chunked) against the naive recurrence."""
    gen = torch.Generator().manual_seed(11)
    H, Hk, K, V = 4, 2, 12, 20
    seq_lens, slots = [1, 4, 1], [3, 1, 4]
    T = sum(seq_lens)
    q, k, v, g = make_step(T, H, Hk, K, V, "channel", gen)
    state = torch.randn(6, Hk, K, V, generator=gen)
    expected = state.clone()
    o_ref = torch.empty(T, H, V)
    lo = 0
    for n, slot in zip(seq_lens, slots):
        o_ref[lo : lo + n], expected[slot] = naive_recurrent_gla(
            q[lo : lo + n], k[lo : lo + n], v[lo : lo + n], g[lo : lo + n], expected[slot]
        )
        lo += n
    o = gla_varlen(q, k, v, g, state, ForwardBatch.build(seq_lens, [5, 0, 2], slots), backend="triton")
    d_mixed = max(max_diff(o, o_ref), max_diff(state, expected))
    # then one decode step for the same three sequences
    q, k, v, g = make_step(3, H, Hk, K, V, "channel", gen)
    o_step = gla_varlen(q, k, v, g, state, ForwardBatch.build([1, 1, 1], [6, 4, 3], slots), backend="triton")
    d_step = 0.0
    for b, slot in enumerate(slots):
        o_b, expected[slot] = naive_recurrent_gla(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], g[b : b + 1], expected[slot]
        )
        d_step = max(d_step, max_diff(o_step[b], o_b[0]))
    d_step = max(d_step, max_diff(state, expected))
    print(f"gla_varlen triton: mixed step max|d|={d_mixed:.2e}, decode step max|d|={d_step:.2e}")
    assert d_mixed < 1e-4 and d_step < 1e-5


def test_rejects_bad_decay_shape_and_non_fp32_state():
    gen = torch.Generator().manual_seed(0)
    q, k, v, _ = make_step(2, 4, 2, 16, 16, "none", gen)
    slots = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="expected g of shape"):
        gla_decode(q, k, v, torch.zeros(2, 16), torch.zeros(3, 2, 16, 16), slots)
    with pytest.raises(ValueError, match="fp32 state"):
        gla_decode(q, k, v, None, torch.zeros(3, 2, 16, 16, dtype=torch.bfloat16), slots)

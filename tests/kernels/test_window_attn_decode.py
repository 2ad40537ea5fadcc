"""Window-ring decode kernel and the fused Liger decode kernel (Triton; under TRITON_INTERPRET=1 without a
GPU) against the naive window attention and GLA recurrence over whole sequences: rings before and after
wrapping, grouped heads, odd head dims, slots out of order, padding rows, several steps in a row."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linrec.kernels.gla.naive import naive_recurrent_gla
from linrec.kernels.window_attn import liger_attention_varlen, window_attn_varlen
from linrec.kernels.window_attn.decode import liger_attention_decode, window_attn_decode
from linrec.kernels.window_attn.naive import naive_window_attn
from linrec.models.batch import ForwardBatch

NUM_ROWS = 7
PADDING = [0, -1]  # batch rows after the real ones: the null slot and a negative id


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def make_sequences(history, num_steps, H, Hk, D, seed):
    """Per real sequence: RoPE'd-like q, k, v and GLA inputs (softmax feature maps, log decays) over
    its history plus the decode steps."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for n in history:
        T = n + num_steps
        q, k, v = (
            torch.randn(T, H, D, generator=gen),
            torch.randn(T, Hk, D, generator=gen),
            torch.randn(T, Hk, D, generator=gen),
        )
        phi_q = torch.randn(T, H, D, generator=gen).softmax(-1)
        phi_k = torch.randn(T, Hk, D, generator=gen).softmax(-1)
        g = F.logsigmoid(torch.randn(T, Hk, D, generator=gen)) / 16
        seqs.append({"q": q, "k": k, "v": v, "phi_q": phi_q, "phi_k": phi_k, "g": g, "len": n})
    return seqs


def fill_rings(seqs, slots, ring_k, ring_v):
    """Each sequence's history into its ring through the torch prefill path."""
    for seq, slot in zip(seqs, slots):
        n = seq["len"]
        if n:
            batch = ForwardBatch.build([n], slot_ids=[slot])
            window_attn_varlen(seq["q"][:n], seq["k"][:n], seq["v"][:n], ring_k, ring_v, batch, 1.0)


def step_inputs(seqs, t, H, Hk, D, names):
    """Batch of decode step t: the real rows, then padding rows of random values."""
    gen = torch.Generator().manual_seed(100 + t)
    out = {}
    for name in names:
        real = torch.stack([s[name][s["len"] + t] for s in seqs])
        out[name] = torch.cat([real, torch.randn(len(PADDING), *real.shape[1:], generator=gen)])
    out["positions"] = torch.tensor([s["len"] + t for s in seqs] + [3] * len(PADDING))
    return out


@pytest.mark.parametrize("W,history", [(64, [70, 0, 3]), (5, [9, 2, 0])])
@pytest.mark.parametrize("H,Hk,D", [(4, 2, 16), (6, 2, 12)])
def test_window_decode_steps_match_naive(W, history, H, Hk, D):
    num_steps, scale = 3, D**-0.5
    seqs = make_sequences(history, num_steps, H, Hk, D, seed=W + D)
    slots = [5, 2, 3]  # out of order; rows 1, 4, 6 of the pool belong to no sequence
    gen = torch.Generator().manual_seed(0)
    ring_k, ring_v = torch.randn(NUM_ROWS, W, Hk, D, generator=gen), torch.randn(NUM_ROWS, W, Hk, D, generator=gen)
    fill_rings(seqs, slots, ring_k, ring_v)
    before_k, before_v = ring_k.clone(), ring_v.clone()
    slot_ids = torch.tensor(slots + PADDING)
    outs = []
    for t in range(num_steps):
        x = step_inputs(seqs, t, H, Hk, D, ("q", "k", "v"))
        outs.append(window_attn_decode(x["q"], x["k"], x["v"], ring_k, ring_v, slot_ids, x["positions"], scale))
    d = 0.0
    for b, seq in enumerate(seqs):
        ref = naive_window_attn(seq["q"][seq["len"] :], seq["k"], seq["v"], W, scale)
        d = max(d, max_diff(torch.stack([o[b] for o in outs]), ref))
    print(f"window decode vs naive W={W} H={H} Hk={Hk} D={D}: max|do|={d:.2e}")
    assert d < 1e-5
    for row in (0, 1, 4, 6):
        assert torch.equal(ring_k[row], before_k[row]) and torch.equal(ring_v[row], before_v[row])
    for o in outs:
        assert torch.equal(o[len(seqs) :], torch.zeros(len(PADDING), H, D))
    # the ring holds each sequence's new keys at position % W
    for seq, slot in zip(seqs, slots):
        pos = torch.arange(seq["len"], seq["len"] + num_steps)
        assert torch.equal(ring_k[slot, pos % W], seq["k"][pos]) and torch.equal(ring_v[slot, pos % W], seq["v"][pos])


@pytest.mark.parametrize("W,history", [(64, [70, 0, 3]), (5, [9, 2, 0])])
@pytest.mark.parametrize("H,Hk,D", [(4, 2, 16), (6, 3, 40)])
def test_fused_liger_decode_matches_naive(W, history, H, Hk, D):
    """0.5 * window + 0.5 * GLA from one launch per step, against the two naive references over whole
    sequences; D=40 spans two value blocks (the ring's key row is written by one of them)."""
    num_steps, scale = 3, D**-0.5
    seqs = make_sequences(history, num_steps, H, Hk, D, seed=W * D)
    slots = [5, 2, 3]
    gen = torch.Generator().manual_seed(1)
    ring_k, ring_v = torch.randn(NUM_ROWS, W, Hk, D, generator=gen), torch.randn(NUM_ROWS, W, Hk, D, generator=gen)
    state = torch.randn(NUM_ROWS, Hk, D, D, generator=gen)
    fill_rings(seqs, slots, ring_k, ring_v)
    initial = state.clone()
    before_k = ring_k.clone()
    slot_ids = torch.tensor(slots + PADDING)
    names = ("q", "k", "v", "phi_q", "phi_k", "g")
    outs = []
    for t in range(num_steps):
        x = step_inputs(seqs, t, H, Hk, D, names)
        outs.append(
            liger_attention_decode(
                *(x[n] for n in names), state, ring_k, ring_v, slot_ids, x["positions"], window_scale=scale
            )
        )
    d_o = d_s = 0.0
    for b, (seq, slot) in enumerate(zip(seqs, slots)):
        n = seq["len"]
        window = naive_window_attn(seq["q"][n:], seq["k"], seq["v"], W, scale)
        # the history went only into the rings: the GLA state of the decode steps starts from initial[slot]
        gla_in = [seq[name][n:] for name in ("phi_q", "phi_k", "v", "g")]
        rec, s_ref = naive_recurrent_gla(*gla_in, initial[slot])
        d_o = max(d_o, max_diff(torch.stack([o[b] for o in outs]), 0.5 * window + 0.5 * rec))
        d_s = max(d_s, max_diff(state[slot], s_ref))
    print(f"fused Liger decode vs naive W={W} H={H} Hk={Hk} D={D}: max|do|={d_o:.2e} max|dS|={d_s:.2e}")
    assert d_o < 1e-5 and d_s < 1e-5
    for row in (0, 1, 4, 6):
        assert torch.equal(state[row], initial[row]) and torch.equal(ring_k[row], before_k[row])
    for o in outs:
        assert torch.equal(o[len(seqs) :], torch.zeros(len(PADDING), H, D))
    for seq, slot in zip(seqs, slots):
        pos = torch.arange(seq["len"], seq["len"] + num_steps)
        assert torch.equal(ring_k[slot, pos % W], seq["k"][pos]) and torch.equal(ring_v[slot, pos % W], seq["v"][pos])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_equals_torch_backend_on_mixed_and_decode_steps(dtype):
    """liger_attention_varlen on both backends: a mixed step (the 1-token rows on the window and GLA decode
    kernels, the others on the torch chunked paths), then a decode step (the fused kernel). Rings in the
    model's dtype, as the pool keeps them."""
    H, Hk, D, W = 4, 2, 16, 64
    gen = torch.Generator().manual_seed(5)
    pools = []
    ring_k, ring_v = (torch.randn(NUM_ROWS, W, Hk, D, generator=gen).to(dtype) for _ in range(2))
    state = torch.randn(NUM_ROWS, Hk, D, D, generator=gen)
    for _ in range(2):
        pools.append((state.clone(), ring_k.clone(), ring_v.clone()))

    def inputs(T):
        q, k, v = (
            torch.randn(T, H, D, generator=gen),
            torch.randn(T, Hk, D, generator=gen),
            torch.randn(T, Hk, D, generator=gen),
        )
        return (
            q.to(dtype),
            k.to(dtype),
            v.to(dtype),
            q.float().softmax(-1),
            k.float().softmax(-1),
            F.logsigmoid(k.float()) / 16,
        )

    slots = [4, 2, 5]
    steps = [
        (inputs(1 + 6 + 1), ForwardBatch.build([1, 6, 1], start_positions=[66, 0, 3], slot_ids=slots)),
        (inputs(3), ForwardBatch.build([1, 1, 1], start_positions=[67, 6, 4], slot_ids=slots)),
    ]
    diffs = []
    for x, batch in steps:
        o = {}
        for backend, (s, rk, rv) in zip(("torch", "triton"), pools):
            o[backend] = liger_attention_varlen(*x, s, rk, rv, batch, window_scale=D**-0.5, backend=backend)
        diffs.append(max_diff(o["triton"], o["torch"]))
    d_state = max_diff(pools[0][0], pools[1][0])
    print(
        f"liger attention triton vs torch ({dtype}): mixed {diffs[0]:.2e}, decode {diffs[1]:.2e}, state {d_state:.2e}"
    )
    # bf16: the torch path rounds the window branch to bf16 before the mix, the fused kernel does not
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert max(diffs) < tol and d_state < 1e-5
    assert torch.equal(pools[0][1], pools[1][1]) and torch.equal(pools[0][2], pools[1][2])


def test_rejects_mismatched_rings():
    q, k, v = torch.zeros(2, 4, 16), torch.zeros(2, 2, 16), torch.zeros(2, 2, 16)
    with pytest.raises(ValueError, match="ring_k and ring_v"):
        window_attn_decode(
            q, k, v, torch.zeros(3, 8, 2, 16), torch.zeros(3, 8, 1, 16), torch.tensor([1, 2]), torch.tensor([0, 0]), 1.0
        )

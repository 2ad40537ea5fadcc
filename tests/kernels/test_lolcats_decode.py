"""LoLCATs decode kernel (Triton; under TRITON_INTERPRET=1 without a GPU, set in tests/conftest.py) against the
torch step and the naive reference: outputs and in-place state (S, z, ring) over several decode steps after a
torch prefill; grouped and ungrouped heads, odd sizes, positions before, at and past the ring's wrap, slots out
of order, padding rows skipped (the torch step writes the null row instead: only real rows are compared), a bf16
ring with fp32 state through lolcats_attn_varlen's dispatch, and a compile for sm_90."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from linrec.kernels.lolcats import lolcats_attn_varlen
from linrec.kernels.lolcats.decode import lolcats_decode
from linrec.kernels.lolcats.naive import hedgehog_features, naive_lolcats_attn
from linrec.kernels.lolcats.step import lolcats_step
from linrec.models.batch import ForwardBatch

EPS = 1e-12
NUM_ROWS = 7
SLOTS = [5, 0, 2, 3, -1]  # batch rows -> pool rows: out of order, the null slot and a negative id as padding
REAL = [0, 2, 3]  # the batch rows of real sequences
UNUSED = [0, 1, 4, 6]  # pool rows no sequence owns (0 is the null row)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def make_inputs(T, H, Hk, D, F_, seed):
    """q, k, v [T, ., D] of one sequence and the layer's feature maps and window factors (as test_lolcats_attn)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, D, generator=gen)
    k = torch.randn(T, Hk, D, generator=gen)
    v = torch.randn(T, Hk, D, generator=gen)
    wq = torch.randn(H, D, F_, generator=gen) * 0.5
    wk = torch.randn(H, D, F_, generator=gen) * 0.5
    gamma = torch.sigmoid(torch.randn(H, generator=gen))
    return q, k, v, wq, wk, gamma


def random_pool(H, Hk, D, F_, W, seed, dtype=torch.float32):
    """Every row random: a nonzero initial state in the real rows, stale ring entries, rows to leave alone."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.rand(NUM_ROWS, H, 2 * F_, D, generator=gen),
        torch.rand(NUM_ROWS, H, 2 * F_, generator=gen) + 1.0,
        torch.randn(NUM_ROWS, W, Hk, D, generator=gen).to(dtype),
        torch.randn(NUM_ROWS, W, Hk, D, generator=gen).to(dtype),
    ]


@pytest.mark.parametrize(
    "H,Hk,D,F_,W,history,eps",
    [
        (4, 2, 8, 4, 4, [0, 2, 7], EPS),  # positions 0..2 (nothing leaves), 2..4 (W-1, then pos 0 leaves), 7..9
        # H == Hk, odd sizes: 1..3, 3..5 (W-1 = 4, then 5), 9..11; an eps that clamps some features
        (2, 2, 12, 3, 5, [1, 3, 9], 0.05),
    ],
)
def test_decode_steps_match_step_and_naive(H, Hk, D, F_, W, history, eps):
    num_steps, scale = 3, D**-0.5
    seqs = [make_inputs(n + num_steps, H, Hk, D, F_, seed=10 * W + i) for i, n in enumerate(history)]
    wq, wk, gamma = seqs[0][3:]  # one layer: the first sequence's feature maps for all
    real_slots = [SLOTS[b] for b in REAL]
    pool = random_pool(H, Hk, D, F_, W, seed=D)
    initial = [x.clone() for x in pool]
    for (q, k, v, *_), n, slot in zip(seqs, history, real_slots):  # the history through the torch prefill
        if n:
            batch = ForwardBatch.build([n], slot_ids=[slot])
            phi_q = hedgehog_features(q[:n], wq, eps)
            lolcats_attn_varlen(q[:n], phi_q, k[:n], v[:n], wk, gamma, *pool, batch, scale, eps)
    torch_pool = [x.clone() for x in pool]
    after_prefill = [x.clone() for x in pool]

    slot_ids = torch.tensor(SLOTS)
    gen = torch.Generator().manual_seed(99)
    outs = []
    for t in range(num_steps):
        rows = {b: (seq, n + t) for b, seq, n in zip(REAL, seqs, history)}
        x = {}
        for i, name in enumerate(("q", "k", "v")):  # padding rows: random values at a position past W
            shape = seqs[0][i].shape[1:]
            x[name] = torch.stack(
                [rows[b][0][i][rows[b][1]] if b in rows else torch.randn(shape, generator=gen) for b in range(5)]
            )
        positions = torch.tensor([rows[b][1] if b in rows else 2 * W + 1 for b in range(5)])
        phi_q = hedgehog_features(x["q"], wq, eps)
        args = (x["q"], phi_q, x["k"], x["v"], wk, gamma)
        o = lolcats_decode(*args, *pool, slot_ids, positions, scale, eps)
        o_step = lolcats_step(*args, *torch_pool, slot_ids, positions, scale, eps)
        assert max_diff(o[REAL], o_step[REAL]) < 1e-5
        assert torch.equal(o[[1, 4]], torch.zeros(2, H, D))  # padding: zeros
        outs.append(o)

    d_o = d_s = 0.0
    for b, (q, k, v, *_), n, slot in zip(REAL, seqs, history, real_slots):
        T = n + num_steps
        o_ref, S_ref, z_ref = naive_lolcats_attn(
            q[n:], k, v, wq, wk, gamma, W, scale, eps, initial[0][slot], initial[1][slot]
        )
        d_o = max(d_o, max_diff(torch.stack([o[b] for o in outs]), o_ref))
        d_s = max(d_s, max_diff(pool[0][slot], S_ref), max_diff(pool[1][slot], z_ref))
        for mine, theirs in zip(pool, torch_pool):  # the same state as the torch step's, ring bit for bit
            assert max_diff(mine[slot], theirs[slot]) < 1e-5
        assert torch.equal(pool[2][slot], torch_pool[2][slot]) and torch.equal(pool[3][slot], torch_pool[3][slot])
        pos = torch.arange(n, T)
        assert torch.equal(pool[2][slot, pos % W], k[pos]) and torch.equal(pool[3][slot, pos % W], v[pos])
        if T <= W:  # no key has left the window: S and z as the prefill left them
            assert torch.equal(pool[0][slot], after_prefill[0][slot]) and torch.equal(
                pool[1][slot], after_prefill[1][slot]
            )
    print(f"lolcats decode vs naive H={H} Hk={Hk} D={D} F={F_} W={W}: max|do|={d_o:.2e} max|dS,dz|={d_s:.2e}")
    assert d_o < 1e-5 and d_s < 1e-5
    for mine, before in zip(pool, initial):  # the null row and the rows of no sequence, untouched
        assert torch.equal(mine[UNUSED], before[UNUSED])


def test_triton_backend_equals_torch_backend_bf16_ring():
    """lolcats_attn_varlen on both backends with the model's dtypes (bf16 activations, feature map and ring, fp32
    state): a mixed step (its 1-token rows on the kernel, the 6-token prefill on the torch path), then decode steps
    that wrap the ring, with a padding row; the dispatcher picks lolcats_decode for backend="triton"."""
    H, Hk, D, F_, W = 4, 2, 8, 4, 4
    dtype = torch.bfloat16
    scale = D**-0.5
    gen = torch.Generator().manual_seed(7)
    wq = (torch.randn(H, D, F_, generator=gen) * 0.5).to(dtype)
    wk = (torch.randn(H, D, F_, generator=gen) * 0.5).to(dtype)
    gamma = torch.sigmoid(torch.randn(H, generator=gen))
    pools = {"torch": random_pool(H, Hk, D, F_, W, seed=3, dtype=dtype)}
    pools["triton"] = [x.clone() for x in pools["torch"]]
    initial = [x.clone() for x in pools["torch"]]
    slots = [4, 2, 5]
    steps = [
        ForwardBatch.build([1, 6, 1], start_positions=[3, 0, 9], slot_ids=slots),
        ForwardBatch.build([1, 1, 1, 1], start_positions=[4, 6, 10, 0], slot_ids=[*slots, -1]),
        ForwardBatch.build([1, 1, 1], start_positions=[5, 7, 11], slot_ids=slots),
    ]
    diffs = []
    for batch in steps:
        T = batch.positions.shape[0]
        q = torch.randn(T, H, D, generator=gen).to(dtype)
        k, v = (torch.randn(T, Hk, D, generator=gen).to(dtype) for _ in range(2))
        phi_q = hedgehog_features(q, wq, EPS)
        o = {
            backend: lolcats_attn_varlen(q, phi_q, k, v, wk, gamma, *pool, batch, scale, EPS, backend)
            for backend, pool in pools.items()
        }
        real = batch.slot_ids.repeat_interleave(torch.tensor(batch.seq_lens)) > 0  # [T]: tokens of real rows
        diffs.append(max_diff(o["triton"][real], o["torch"][real]))
        assert torch.equal(o["triton"][~real], torch.zeros(int((~real).sum()), H, D))
    d_state = max(max_diff(a[slots], b[slots]) for a, b in zip(pools["triton"][:2], pools["torch"][:2]))
    print(f"lolcats triton vs torch (bf16 ring): steps {[f'{d:.1e}' for d in diffs]}, state {d_state:.2e}")
    assert max(diffs) < 1e-5 and d_state < 1e-5
    for mine, before in zip(pools["triton"], initial):
        assert not torch.equal(mine[slots], before[slots])  # every tensor was written
        assert torch.equal(mine[[0, 1, 3, 6]], before[[0, 1, 3, 6]])
    assert all(torch.equal(a[slots], b[slots]) for a, b in zip(pools["triton"][2:], pools["torch"][2:]))


def test_rejects_mismatched_shapes():
    B, H, Hk, D, F_, W = 2, 4, 2, 8, 4, 4
    q, phi_q = torch.zeros(B, H, D), torch.zeros(B, H, 2 * F_)
    k = v = torch.zeros(B, Hk, D)
    wk, gamma = torch.zeros(H, D, F_), torch.zeros(H)
    linear, normalizer, ring_k, ring_v = random_pool(H, Hk, D, F_, W, seed=0)
    slots, positions = torch.tensor([1, 2]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match="phi_q of shape"):
        lolcats_decode(
            q, phi_q[..., :-1], k, v, wk, gamma, linear, normalizer, ring_k, ring_v, slots, positions, 1.0, EPS
        )
    with pytest.raises(ValueError, match="fp32 linear state"):
        lolcats_decode(
            q, phi_q, k, v, wk, gamma, linear.bfloat16(), normalizer, ring_k, ring_v, slots, positions, 1.0, EPS
        )
    with pytest.raises(ValueError, match="k_weight"):
        lolcats_decode(
            q, phi_q, k, v, wk[:, :-1], gamma, linear, normalizer, ring_k, ring_v, slots, positions, 1.0, EPS
        )


COMPILE = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from linrec.kernels.lolcats.decode import _lolcats_decode_kernel as kernel

    constexprs = {"W": 64, "D": 128, "F": 64, "GROUP": 4, "BW": 64, "BD": 128, "BF": 64}
    bf16 = {"q_ptr", "k_ptr", "v_ptr", "wk_ptr", "ring_k_ptr", "ring_v_ptr"}

    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name in bf16:
            return "*bf16"
        if name in ("slot_ptr", "pos_ptr"):
            return "*i64"
        if name.endswith("_ptr"):
            return "*fp32"
        return "fp32" if name in ("scale", "eps") else "i32"

    src = ASTSource(fn=kernel, signature={n: kind(n) for n in kernel.arg_names}, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert ".entry" in compiled.asm["ptx"]
    print("compiled")
    """
)


def test_kernel_compiles_for_sm90(tmp_path):
    """The interpreter accepts code the compiler rejects: compile at the model's sizes (LoLCATs-Llama: D=128,
    F=64, W=64) without TRITON_INTERPRET, in a subprocess, as tests/kernels/test_decode_compile.py does."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("triton's CUDA toolchain (ptxas) is not installed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled" in proc.stdout

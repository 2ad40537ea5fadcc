"""On CUDA (compiled Triton, not the interpreter): the decode kernels at model-like sizes against the torch
steps, and fla-core's chunk_gla (the peer of linrec's prefill, test_gla_chunk.py) against the torch chunked
path. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linrec.kernels.gla import gla_varlen
from linrec.kernels.gla.decode import gla_decode
from linrec.kernels.gla.prefill import fla_chunk_gla_varlen
from linrec.kernels.gla.step import gla_step
from linrec.kernels.short_conv.decode import short_conv_decode_triton
from linrec.kernels.short_conv.prefill import short_conv_decode
from linrec.kernels.window_attn import liger_attention_varlen
from linrec.models.batch import ForwardBatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def shuffled_slots(B: int, num_rows: int, gen: torch.Generator) -> torch.Tensor:
    slots = torch.randperm(num_rows - 1, generator=gen)[:B] + 1
    slots[::7] = 0  # some padding rows on the null slot
    return slots.cuda()


@pytest.mark.parametrize("H,Hk", [(32, 8), (16, 16)])
def test_gla_decode_matches_torch_step(H, Hk):
    gen = torch.Generator().manual_seed(0)
    B, K, V, N = 64, 128, 128, 80
    q, k, v = (
        torch.randn(B, H, K, generator=gen),
        torch.randn(B, Hk, K, generator=gen),
        torch.randn(B, Hk, V, generator=gen),
    )
    g = F.logsigmoid(torch.randn(B, Hk, K, generator=gen)) / 16
    q, k, v, g = (x.cuda().bfloat16() if x is not g else x.cuda() for x in (q, k, v, g))
    state = torch.randn(N, Hk, K, V, generator=gen).cuda()
    slots = shuffled_slots(B, N, gen)
    state_ref = state.clone()
    o = gla_decode(q, k, v, g, state, slots)
    o_ref = gla_step(q, k, v, g, state_ref, slots)
    real = slots > 0
    d_o, d_s = max_diff(o[real], o_ref[real]), max_diff(state[1:], state_ref[1:])
    print(f"gla_decode on CUDA H={H} Hk={Hk}: max|do|={d_o:.2e} max|dS|={d_s:.2e}")
    assert d_o < 1e-3 and d_s < 1e-4


def test_short_conv_decode_matches_torch_step():
    gen = torch.Generator().manual_seed(1)
    B, D, W, N = 64, 4096 + 96, 4, 80
    x = torch.randn(B, D, generator=gen).cuda().bfloat16()
    weight, bias = torch.randn(D, W, generator=gen).cuda().bfloat16(), torch.randn(D, generator=gen).cuda().bfloat16()
    state = torch.randn(N, D, W - 1, generator=gen).cuda().bfloat16()
    slots = shuffled_slots(B, N, gen)
    state_ref = state.clone()
    y = short_conv_decode_triton(x, weight, bias, state, slots)
    y_ref = short_conv_decode(x, weight, bias, state_ref, slots)
    real = slots > 0
    d_y = max_diff(y[real], y_ref[real])
    print(f"short_conv decode on CUDA: max|dy|={d_y:.2e}")
    assert d_y < 2e-2 and torch.equal(state[1:], state_ref[1:])


def test_fused_liger_decode_matches_torch():
    gen = torch.Generator().manual_seed(2)
    B, H, Hk, D, W, N = 64, 32, 8, 128, 64, 80
    q, k, v = (torch.randn(B, h, D, generator=gen).cuda().bfloat16() for h in (H, Hk, Hk))
    inputs = (q, k, v, q.float().softmax(-1), k.float().softmax(-1), F.logsigmoid(k.float()) / 16)
    pools = []
    ring_k, ring_v = (torch.randn(N, W, Hk, D, generator=gen).cuda().bfloat16() for _ in range(2))
    state = torch.randn(N, Hk, D, D, generator=gen).cuda()
    for _ in range(2):
        pools.append((state.clone(), ring_k.clone(), ring_v.clone()))
    slots = shuffled_slots(B, N, gen)
    positions = torch.randint(0, 200, (B,), generator=gen)
    batch = ForwardBatch.build([1] * B, positions.tolist(), slots.tolist(), device="cuda")
    o = {}
    for backend, (s, rk, rv) in zip(("torch", "triton"), pools):
        o[backend] = liger_attention_varlen(*inputs, s, rk, rv, batch, window_scale=D**-0.5, backend=backend)
    real = slots > 0
    d_o, d_s = max_diff(o["triton"][real], o["torch"][real]), max_diff(pools[0][0][1:], pools[1][0][1:])
    print(f"fused Liger decode on CUDA: max|do|={d_o:.2e} max|dS|={d_s:.2e}")
    assert d_o < 2e-2 and d_s < 1e-4
    assert torch.equal(pools[0][1][1:], pools[1][1][1:]) and torch.equal(pools[0][2][1:], pools[1][2][1:])


@pytest.mark.parametrize("H,Hk", [(4, 2), (4, 4)])
def test_gla_prefill_through_fla_chunk_matches_torch(H, Hk):
    gen = torch.Generator().manual_seed(3)
    K = V = 64
    batch = ForwardBatch.build([100, 1, 37, 5], slot_ids=[3, 1, 4, 2], device="cuda")
    T = batch.num_tokens
    q, k, v = (
        torch.randn(T, H, K, generator=gen),
        torch.randn(T, Hk, K, generator=gen),
        torch.randn(T, Hk, V, generator=gen),
    )
    g = F.logsigmoid(torch.randn(T, Hk, K, generator=gen) + 2.0)
    q, k, v, g = (x.cuda() for x in (q * K**-0.5, k * K**-0.5, v, g))
    state0 = torch.randn(5, Hk, K, V, generator=gen).cuda() * 0.1
    results = {}
    for backend in ("torch", "fla"):
        state = state0.clone()
        if backend == "fla":
            results[backend] = (fla_chunk_gla_varlen(q, k, v, g, state, batch), state)
        else:
            results[backend] = (gla_varlen(q, k, v, g, state, batch, backend=backend), state)
    d_o = max_diff(results["fla"][0], results["torch"][0])
    d_s = max_diff(results["fla"][1], results["torch"][1])
    print(f"fla chunk_gla vs torch chunked on CUDA H={H} Hk={Hk}: max|do|={d_o:.2e} max|dS|={d_s:.2e}")
    assert d_o < 2e-3 and d_s < 2e-3

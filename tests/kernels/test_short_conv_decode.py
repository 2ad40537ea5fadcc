"""Short-conv decode kernel (Triton; under TRITON_INTERPRET=1 without a GPU) against the naive convolution
and the torch step: odd channel counts over several blocks, widths 2-4, bias or not, silu or none, bf16
states, slots out of order, padding rows, several steps in a row."""

from __future__ import annotations

import pytest
import torch

from linrec.kernels.short_conv import short_conv_varlen
from linrec.kernels.short_conv.decode import short_conv_decode_triton
from linrec.kernels.short_conv.naive import naive_short_conv
from linrec.kernels.short_conv.prefill import short_conv_decode
from linrec.models.batch import ForwardBatch

SLOTS = [5, 2, 0, 3, -1]  # out of order; rows 2 (null slot) and 4 (negative) are padding
REAL = [0, 1, 3]
NUM_ROWS = 7


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("D,W,has_bias,activation", [(37, 4, True, "silu"), (150, 3, False, None), (16, 2, True, None)])
def test_decode_steps_match_naive(D, W, has_bias, activation):
    gen = torch.Generator().manual_seed(D + W)
    B, num_steps = len(SLOTS), 3
    weight = torch.randn(D, W, generator=gen)
    bias = torch.randn(D, generator=gen) if has_bias else None
    state = torch.randn(NUM_ROWS, D, W - 1, generator=gen)
    initial = state.clone()
    xs = torch.randn(num_steps, B, D, generator=gen)
    ys = torch.stack([short_conv_decode_triton(x, weight, bias, state, torch.tensor(SLOTS), activation) for x in xs])

    d_y = d_s = 0.0
    for b in REAL:
        y_ref, s_ref = naive_short_conv(xs[:, b], weight, bias, initial[SLOTS[b]], activation)
        d_y, d_s = max(d_y, max_diff(ys[:, b], y_ref)), max(d_s, max_diff(state[SLOTS[b]], s_ref))
    print(f"short_conv decode vs naive D={D} W={W} bias={has_bias} act={activation}: max|dy|={d_y:.2e} dS={d_s:.2e}")
    assert d_y < 1e-5 and d_s == 0.0  # the state only moves inputs: exact
    for row in (0, 1, 4, 6):
        assert torch.equal(state[row], initial[row])
    assert torch.equal(ys[:, [2, 4]], torch.zeros(num_steps, 2, D))


def test_bf16_state_and_strided_weight_match_torch_step():
    """The model's layout: a bf16 conv state, the weight a [D, 1, W] conv parameter viewed as [D, W]."""
    gen = torch.Generator().manual_seed(1)
    D, W = 45, 4
    conv = torch.nn.Conv1d(D, D, W, groups=D, dtype=torch.bfloat16)
    weight, bias = conv.weight.detach()[:, 0, :], conv.bias.detach()
    state = torch.randn(NUM_ROWS, D, W - 1, generator=gen).bfloat16()
    state_torch = state.clone()
    x = torch.randn(len(SLOTS), D, generator=gen).bfloat16()
    y = short_conv_decode_triton(x, weight, bias, state, torch.tensor(SLOTS))
    y_torch = short_conv_decode(x, weight, bias, state_torch, torch.tensor(SLOTS))
    # y is rounded to bf16 at the end: the interpreter truncates where torch rounds to nearest, 1 ulp at most
    d_y = max_diff(y[REAL], y_torch[REAL])
    print(f"short_conv decode vs torch step, bf16: max|dy|={d_y:.2e}")
    assert y.dtype == torch.bfloat16 and d_y <= 2**-7 * y_torch[REAL].abs().max().item()
    # row 6, the pool's last, must not take the negative-slot row's update (torch indexing from the end did)
    assert torch.equal(state[1:], state_torch[1:])


def test_varlen_dispatch_runs_the_kernel_at_decode():
    gen = torch.Generator().manual_seed(2)
    D, W = 24, 4
    weight, bias = torch.randn(D, W, generator=gen), torch.randn(D, generator=gen)
    state = torch.randn(5, D, W - 1, generator=gen)
    expected = state.clone()
    x = torch.randn(3, D, generator=gen)
    slots = [4, 1, 2]
    y = short_conv_varlen(x, weight, bias, state, ForwardBatch.build([1, 1, 1], [3, 8, 1], slots), backend="triton")
    d = 0.0
    for b, slot in enumerate(slots):
        y_ref, expected[slot] = naive_short_conv(x[b : b + 1], weight, bias, expected[slot])
        d = max(d, max_diff(y[b], y_ref[0]))
    print(f"short_conv_varlen triton decode vs naive: max|dy|={d:.2e}")
    assert d < 1e-5 and torch.equal(state, expected)


def test_rejects_mismatched_state():
    with pytest.raises(ValueError, match="conv_state"):
        short_conv_decode_triton(torch.zeros(2, 8), torch.zeros(8, 4), None, torch.zeros(3, 8, 4), torch.tensor([1, 2]))

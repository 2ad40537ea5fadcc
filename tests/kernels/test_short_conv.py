"""Short causal convolution: naive vs torch's conv1d, and the vectorized varlen / decode paths vs naive."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linrec.kernels.short_conv import short_conv_varlen
from linrec.kernels.short_conv.naive import naive_short_conv
from linrec.models.batch import ForwardBatch

ATOL = 1e-5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def _reference_conv1d(x, weight, bias, initial_state, activation):
    """torch's own causal depthwise conv1d, over [carried inputs ; x] with no padding."""
    window = torch.cat([initial_state, x.t()], dim=1)[None]  # [1, D, W-1+T]
    y = F.conv1d(window, weight[:, None, :], bias, groups=x.shape[1])[0].t()
    return F.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("T,W", [(1, 4), (2, 4), (7, 4), (5, 2), (3, 1)])
def test_naive_matches_torch_conv1d(T, W, activation):
    torch.manual_seed(0)
    D = 5
    x, weight, bias = torch.randn(T, D), torch.randn(D, W), torch.randn(D)
    state = torch.randn(D, W - 1)
    y, final = naive_short_conv(x, weight, bias, state, activation)
    ref = _reference_conv1d(x, weight, bias, state, activation)
    err = (y - ref).abs().max().item()
    print(f"naive vs F.conv1d T={T} W={W}: max abs diff {err:.2e}")
    assert err < ATOL
    expected_final = torch.cat([state, x.t()], dim=1)[:, -(W - 1) :] if W > 1 else torch.zeros(D, 0)
    assert torch.equal(final, expected_final)


def test_naive_zero_state_is_zero_padding():
    torch.manual_seed(1)
    x, weight = torch.randn(6, 3), torch.randn(3, 4)
    y, _ = naive_short_conv(x, weight, None, None, None)
    ref = F.conv1d(x.t()[None], weight[:, None, :], padding=3, groups=3)[0, :, :6].t()
    assert (y - ref).abs().max().item() < ATOL


def _run_naive(x, weight, bias, conv_state, batch, activation):
    """Per sequence naive reference on a copy of the pool."""
    state = conv_state.clone()
    y = torch.empty_like(x)
    offsets = batch.cu_seqlens.tolist()
    for b, slot in enumerate(batch.slot_ids_host):
        y_b, final = naive_short_conv(x[offsets[b] : offsets[b + 1]], weight, bias, state[slot], activation)
        y[offsets[b] : offsets[b + 1]] = y_b
        state[slot] = final
    return y, state


@pytest.mark.parametrize(
    "seq_lens,slots,W",
    [
        ([1], [3], 4),  # T=1 through the decode path
        ([2], [1], 4),  # T < W-1: part of the carried state stays in the final state
        ([7, 1, 2, 5], [4, 2, 6, 1], 4),  # varlen, slots out of order, T=1 and T<W-1 among them
        ([1, 1, 1], [5, 1, 3], 4),  # decode-only batch, slots out of order
        ([3, 6], [2, 1], 2),
        ([4, 1], [1, 2], 1),  # W=1: no carried state at all
    ],
)
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("use_bias", [True, False])
def test_varlen_matches_naive(seq_lens, slots, W, activation, use_bias):
    torch.manual_seed(2)
    D, num_rows = 6, 7
    batch = ForwardBatch.build(seq_lens, slot_ids=slots)
    x = torch.randn(batch.num_tokens, D)
    weight = torch.randn(D, W)
    bias = torch.randn(D) if use_bias else None
    conv_state = torch.randn(num_rows, D, W - 1)  # nonzero initial states in every row
    y_ref, state_ref = _run_naive(x, weight, bias, conv_state, batch, activation)
    state = conv_state.clone()
    y = short_conv_varlen(x, weight, bias, state, batch, activation)
    err = (y - y_ref).abs().max().item()
    state_err = _max_diff(state, state_ref)
    print(f"varlen vs naive {seq_lens} slots {slots} W={W}: out {err:.2e}, state {state_err:.2e}")
    assert err < ATOL
    assert state_err == 0.0  # final states are copies of inputs, exactly
    untouched = [r for r in range(num_rows) if r not in slots]
    assert torch.equal(state[untouched], conv_state[untouched])


def test_chunked_equals_whole():
    """Feeding a sequence in pieces through the carried state equals feeding it at once."""
    torch.manual_seed(3)
    D, W = 4, 4
    x, weight = torch.randn(11, D), torch.randn(D, W)
    whole_state = torch.zeros(2, D, W - 1)
    y_whole = short_conv_varlen(x, weight, None, whole_state, ForwardBatch.build([11]))
    state = torch.zeros(2, D, W - 1)
    pieces, start = [], 0
    for n in (2, 1, 5, 1, 1, 1):
        pieces.append(short_conv_varlen(x[start : start + n], weight, None, state, ForwardBatch.build([n], [start])))
        start += n
    assert (torch.cat(pieces) - y_whole).abs().max().item() < ATOL
    assert torch.equal(state, whole_state)


def test_bf16_input_keeps_dtype():
    torch.manual_seed(4)
    D, W = 8, 4
    batch = ForwardBatch.build([3, 1])
    x = torch.randn(4, D, dtype=torch.bfloat16)
    weight = torch.randn(D, W, dtype=torch.bfloat16)
    state = torch.zeros(3, D, W - 1)
    y = short_conv_varlen(x, weight, None, state, batch)
    y_ref, _ = _run_naive(x.float(), weight.float(), None, torch.zeros(3, D, W - 1), batch, "silu")
    assert y.dtype == torch.bfloat16
    assert (y.float() - y_ref).abs().max().item() < 5e-2


def test_rejects_unknown_activation():
    batch = ForwardBatch.build([2])
    with pytest.raises(ValueError, match="activation"):
        short_conv_varlen(torch.randn(2, 3), torch.randn(3, 4), None, torch.zeros(2, 3, 3), batch, "gelu")

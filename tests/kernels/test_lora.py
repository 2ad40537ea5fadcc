"""LoRA add-on: the torch path and the Triton shrink/expand kernels (under TRITON_INTERPRET=1 without a GPU)
against the naive fp32 reference, on tiny odd shapes with slots out of order and unadapted tokens; unadapted
rows bit for bit untouched; no work for a batch without adapters; the device-built mapping equal to the host
one and free of host syncs."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from linrec.kernels.lora import LoraMapping, lora_add_, lora_expand_, lora_shrink
from linrec.kernels.lora.naive import naive_lora_delta

S = 3
SLOTS_7 = [2, -1, 0, 2, -1, 1, -1]  # out of order, three tokens without an adapter
SMALL_RANK = 3  # slot 1's adapter has this rank: zero rows of A and columns of B beyond it
# (slots, in, out, R)
# [0, 0, 0]: one adapter on every token (the torch path's no-gather case); [2, 0, 1, 0]: every token adapted;
# SLOTS_7 and [2, 0, 1, 0] run the torch path's padded bmm, [0] * 6 + [1, 2] its loop (padding would triple it)
CASES = [
    ([1], 16, 24, 8),
    ([-1], 40, 16, 1),
    (SLOTS_7, 16, 24, 8),
    (SLOTS_7, 40, 16, 1),
    ([0, 0, 0], 16, 24, 8),
    ([2, 0, 1, 0], 40, 16, 1),
    ([0] * 6 + [1, 2], 16, 24, 8),
]
# fp32 summation order differs from the reference's: |d| <= ATOL (values here are below ~50). bf16 y: the
# fp32 sum y + delta is then rounded to bf16 once: to nearest by torch (and a GPU), at most half an ulp, 2^-9
# relative, allowed 2^-8 (an order difference can move a sum across a tie); the Triton interpreter's
# downcast truncates instead, up to one ulp, 2^-7 relative
ATOL = 1e-5
BF16_RTOL = {"torch": 2**-8, "triton": 2**-7}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (torch.equal calls -0.0 and +0.0 equal)."""
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and torch.equal(a.view(as_int), b.view(as_int))


def make_inputs(T, d_in, d_out, R, dtype, gen):
    x = torch.randn(T, d_in, generator=gen).to(dtype)
    lora_a = torch.randn(S, R, d_in, generator=gen).to(dtype)
    lora_b = (torch.randn(S, d_out, R, generator=gen) * 0.5).to(dtype)
    lora_a[1, SMALL_RANK:] = 0
    lora_b[1, :, SMALL_RANK:] = 0
    y = torch.randn(T, d_out, generator=gen).to(dtype)
    return x, lora_a, lora_b, y


def make_mapping(slots, on_device):
    return LoraMapping.from_device(torch.tensor(slots), S) if on_device else LoraMapping.build(slots, S, "cpu")


def assert_close(out: torch.Tensor, expected: torch.Tensor, backend: str, label: str) -> None:
    rtol = 0.0 if out.dtype == torch.float32 else BF16_RTOL[backend]
    err = (out.float() - expected).abs()
    print(f"{label}: max|d|={err.max().item():.2e}")
    assert (err <= rtol * expected.abs() + ATOL).all(), label


@pytest.mark.parametrize("slots,d_in,d_out,R", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("on_device", [False, True], ids=["build", "from_device"])
def test_lora_add_matches_naive(slots, d_in, d_out, R, dtype, backend, on_device):
    gen = torch.Generator().manual_seed(len(slots) * 100 + d_in + R)
    x, lora_a, lora_b, y = make_inputs(len(slots), d_in, d_out, R, dtype, gen)
    unadapted = [t for t, s in enumerate(slots) if s < 0]
    if unadapted:
        y[unadapted[0], 1] = -0.0  # must come back -0.0: adding +0.0 would make it +0.0
    out = y.clone()
    lora_add_(out, x, lora_a, lora_b, make_mapping(slots, on_device), backend)
    expected = y.float() + naive_lora_delta(x, lora_a, lora_b, slots)
    label = f"lora_add_ {backend} {'from_device' if on_device else 'build'} T={len(slots)} {d_in}->{d_out} R={R}"
    assert_close(out, expected, backend, f"{label} {dtype}")
    assert same_bits(out[unadapted], y[unadapted])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("on_device", [False, True], ids=["build", "from_device"])
def test_shrink_then_expand_halves(backend, on_device):
    """shrink: A[s] x[t] in fp32, zeros on unadapted rows; expand adds B[s] shrunk[t] to the adapted rows."""
    gen = torch.Generator().manual_seed(5)
    x, lora_a, lora_b, y = make_inputs(len(SLOTS_7), 40, 24, 8, torch.bfloat16, gen)
    mapping = make_mapping(SLOTS_7, on_device)
    shrunk = lora_shrink(x, lora_a, mapping, backend)
    expected = torch.zeros(len(SLOTS_7), 8)
    for t, s in enumerate(SLOTS_7):
        if s >= 0:
            expected[t] = lora_a[s].float() @ x[t].float()
    assert shrunk.dtype == torch.float32 and shrunk.shape == (7, 8)
    assert (shrunk - expected).abs().max().item() < 1e-4
    assert same_bits(shrunk[[1, 4, 6]], torch.zeros(3, 8))
    out = y.clone()
    lora_expand_(out, shrunk, lora_b, mapping, backend)
    expected_y = y.float() + naive_lora_delta(x, lora_a, lora_b, SLOTS_7)
    assert_close(out, expected_y, backend, f"lora_shrink + lora_expand_ {backend}")


class RecordOps(TorchDispatchMode):
    """Every aten op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batch_without_adapters_does_nothing(backend, monkeypatch):
    import linrec.kernels.lora.punica as lora

    def no_launch(*args):
        raise AssertionError("a batch without adapters launched a kernel")

    monkeypatch.setattr(lora, "triton_lora_shrink", no_launch)
    monkeypatch.setattr(lora, "triton_lora_expand_", no_launch)
    gen = torch.Generator().manual_seed(1)
    x, lora_a, lora_b, y = make_inputs(4, 16, 24, 8, torch.float32, gen)
    y[0, 0] = -0.0
    mapping = LoraMapping.build([-1, -1, -1, -1], S, "cpu")
    assert mapping.has_lora is False and mapping.groups == ()
    out, shrunk = y.clone(), torch.ones(4, 8)
    with RecordOps() as mode:
        lora_add_(out, x, lora_a, lora_b, mapping, backend)
        lora_expand_(out, shrunk, lora_b, mapping, backend)
    assert mode.ops == [] and same_bits(out, y)


@pytest.mark.parametrize("slots", [[-1], [0], SLOTS_7, [2, 2, -1, 0, 2], [-1, -1, -1]])
def test_from_device_equals_build(slots):
    host, device = LoraMapping.build(slots, S, "cpu"), LoraMapping.from_device(torch.tensor(slots), S)
    assert torch.equal(device.token_slots, host.token_slots)
    assert torch.equal(device.sorted_token_ids, host.sorted_token_ids)
    assert torch.equal(device.slot_starts, host.slot_starts)
    assert device.num_slots == host.num_slots == S
    assert device.groups is None and device.has_lora is True
    assert host.has_lora == any(s >= 0 for s in slots)
    for s, tokens in host.groups:
        lo, hi = host.slot_starts[s].item(), host.slot_starts[s + 1].item()
        assert tokens.tolist() == host.sorted_token_ids[lo:hi].tolist() == [t for t, v in enumerate(slots) if v == s]


def test_padded_groups_only_where_padding_at_most_doubles_the_rows():
    padded = LoraMapping.build(SLOTS_7, S, "cpu").padded_groups
    assert padded is not None
    slots, gather, valid, m = padded
    assert (
        slots.tolist() == [0, 1, 2]
        and m == 2
        and gather.tolist() == [2, 0, 5, 0, 0, 3]
        and valid.tolist()
        == [
            0,
            2,
            4,
            5,
        ]
    )
    assert LoraMapping.build([0] * 6 + [1, 2], S, "cpu").padded_groups is None  # 3 groups of 6 rows for 8
    assert LoraMapping.build([1, 1, -1], S, "cpu").padded_groups is None  # one group: nothing to batch
    assert LoraMapping.from_device(torch.tensor(SLOTS_7), S).padded_groups is None  # no host groups


def test_build_groups_and_slot_starts():
    m = LoraMapping.build(SLOTS_7, S, "cpu")
    assert m.sorted_token_ids.tolist() == [2, 5, 0, 3, 1, 4, 6]  # slot 0, slot 1, slot 2, then unadapted
    assert m.slot_starts.tolist() == [0, 1, 2, 4]
    assert [(s, t.tolist()) for s, t in m.groups] == [(0, [2]), (1, [5]), (2, [0, 3])]
    assert m.token_slots.dtype == m.sorted_token_ids.dtype == m.slot_starts.dtype == torch.int64


@functools.cache
def _capture_safety_mode():
    """The CUDA-graph capture check of tests/engine/test_cuda_graphs.py (host syncs, data-dependent shapes)."""
    path = Path(__file__).resolve().parents[1] / "engine" / "test_cuda_graphs.py"
    spec = importlib.util.spec_from_file_location("_lora_capture_safety", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CaptureSafetyMode


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_from_device_and_add_do_no_host_sync(backend):
    gen = torch.Generator().manual_seed(2)
    x, lora_a, lora_b, y = make_inputs(len(SLOTS_7), 16, 24, 8, torch.float32, gen)
    token_slots = torch.tensor(SLOTS_7)
    with _capture_safety_mode()() as mode:
        mapping = LoraMapping.from_device(token_slots, S)
        lora_add_(y, x, lora_a, lora_b, mapping, backend)
    assert mode.unsafe == [], f"from_device + lora_add_ ({backend}) cannot be captured: {mode.unsafe}"


def test_rejects_bad_slots_backend_and_shapes():
    with pytest.raises(ValueError, match=r"expected token slots in \[-1, 3\)"):
        LoraMapping.build([0, 3], S, "cpu")
    with pytest.raises(ValueError, match=r"expected token slots in \[-1, 3\)"):
        LoraMapping.build([-2], S, "cpu")
    gen = torch.Generator().manual_seed(3)
    x, lora_a, lora_b, y = make_inputs(2, 16, 24, 8, torch.float32, gen)
    mapping = LoraMapping.build([0, 1], S, "cpu")
    with pytest.raises(ValueError, match="expected backend"):
        lora_add_(y, x, lora_a, lora_b, mapping, "cuda")
    with pytest.raises(ValueError, match="expected a mapping over 3 tokens"):
        lora_add_(y[:1].expand(3, 24), x[:1].expand(3, 16), lora_a, lora_b, mapping, "torch")
    with pytest.raises(ValueError, match="expected x"):
        lora_shrink(x[:, :8], lora_a, mapping, "torch")
    with pytest.raises(ValueError, match="expected y"):
        lora_expand_(y[:, :8], torch.zeros(2, 8), lora_b, mapping, "torch")

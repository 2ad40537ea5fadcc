"""`linrec bench kernels` as a CPU smoke test (--size small): it runs, prints JSON with the expected rows,
counts bytes as documented, and says that CPU figures (and Triton under the interpreter) are not performance.
Every contender of a kernel computes the same step (the check that would have caught the fla call that read
beta as gk, issue 11's illegal memory access); CUDA-graph timing and its eager fallback run against a fake
graph; the gpu-marked tests run the real capture."""

from __future__ import annotations

import json

import pytest
import torch

from linrec.bench import kernels as bench_kernels
from linrec.bench.kernels import (
    KERNEL_SHAPES,
    CaseTiming,
    KernelCases,
    KernelRow,
    KernelsResult,
    fla_available,
    run_kernels,
    time_case,
    time_graph_per_call,
)
from linrec.cli import main
from linrec.envs import triton_interpreter


def test_bench_kernels_small_cpu_json(capsys):
    argv = ["bench", "kernels", "--size", "small", "--device", "cpu", "--repeats", "1", "--batch-sizes", "1,2"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"] == "cpu" and "not a performance figure" in result["note"]
    assert result["interpreted"] == triton_interpreter()
    assert result["errors"] == []
    assert any("fla fused_recurrent" in s for s in result["skipped"])  # fla's GLA peers are CUDA only
    shapes = KERNEL_SHAPES["small"]
    assert result["shapes"] == shapes
    impls = {(r["kernel"], r["impl"], r["batch"]) for r in result["rows"]}
    fused = "linrec triton fused (in place, one launch)"
    triton_impl = {"liger_step": fused, "liger_step_d128": fused, "lora": "linrec triton shrink/expand"}
    for batch in (1, 2):
        for kernel in shapes:  # every kernel has its torch path, and its Triton kernel under the interpreter
            assert (kernel, "linrec torch (gather/scatter)", batch) in impls
            if triton_interpreter():
                assert (kernel, triton_impl.get(kernel, "linrec triton (in place)"), batch) in impls
        assert ("ssd", "transformers torch step + gather/scatter", batch) in impls
        if triton_interpreter():
            assert ("liger_step_d128", "linrec triton window + GLA (two launches)", batch) in impls
        if triton_interpreter() and fla_available():  # fla's gated delta kernel runs under the interpreter too
            assert ("gated_delta", "fla fused_recurrent + gather/scatter", batch) in impls
    for r in result["rows"]:
        assert r["seconds"] > 0 and r["share_of_copy"] > 0
        assert r["timing"] == "eager (CPU)" and r["graph_seconds"] is None and r["eager_seconds"] == r["seconds"]
        # every Triton row on the CPU says it is no performance figure; no other row does
        assert r["is_interpreted"] == (triton_interpreter() and "triton" in r["impl"])

    def bytes_of(kernel: str, batch: int) -> set[int]:
        return {r["bytes_moved"] for r in result["rows"] if r["kernel"] == kernel and r["batch"] == batch}

    fp32 = 4  # the CPU runs every tensor in float32
    for batch in (1, 2):
        assert all(len(bytes_of(kernel, batch)) == 1 for kernel in shapes)  # the same bytes for every contender
        (gla,) = bytes_of("gla_grouped", batch)
        s = shapes["gla_grouped"]
        state = 2 * batch * s["Hk"] * s["K"] * s["V"] * fp32  # one state per KV head, read + write
        inputs = batch * (s["H"] * s["K"] + 2 * s["Hk"] * s["K"] + s["Hk"] * s["V"]) * fp32 + batch * 8
        assert gla == state + inputs + batch * s["H"] * s["V"] * fp32
        (window,) = bytes_of("window", batch)
        s = shapes["window"]
        ring = 2 * batch * (s["W"] + 1) * s["Hk"] * s["D"] * fp32  # whole ring read, one entry written, k and v
        inputs = batch * (s["H"] + 2 * s["Hk"]) * s["D"] * fp32 + batch * 16
        assert window == ring + inputs + batch * s["H"] * s["D"] * fp32
        (liger,) = bytes_of("liger_step", batch)
        assert liger > window + 2 * batch * s["Hk"] * s["D"] * s["D"] * fp32  # the ring and the GLA state
        (lolcats,) = bytes_of("lolcats_step", batch)
        s = shapes["lolcats_step"]
        H, Hk, D, F, W = s["H"], s["Hk"], s["D"], s["F"], s["W"]
        states = 2 * batch * H * 2 * F * (D + 1) * fp32  # linear [2F, D] + normaliser [2F] per query head
        ring = 2 * batch * (W + 1) * Hk * D * fp32 + batch * 16
        inputs = (batch * (H + 2 * Hk) * D + H * D * F + batch * H * 2 * F + H) * fp32  # q k v, W_k, phi_q, gamma
        assert lolcats == states + ring + inputs + batch * H * D * fp32
        (conv,) = bytes_of("short_conv", batch)
        s = shapes["short_conv"]
        state = 2 * batch * s["D"] * (s["W"] - 1) * fp32
        assert conv == state + (batch * s["D"] * 2 + s["D"] * (s["W"] + 1)) * fp32 + batch * 8
        (delta,) = bytes_of("gated_delta", batch)
        s = shapes["gated_delta"]
        state = 2 * batch * s["HV"] * s["K"] * s["V"] * fp32
        assert state < delta < 2 * state


def test_kernels_table_labels_interpreter_rows():
    row = dict(kernel="gla", batch=1, seconds=1e-3, bytes_moved=1000, gb_per_s=1e-3, share_of_copy=1e-4)
    result = KernelsResult(
        device="cpu",
        size="small",
        interpreted=True,
        copy_gb_per_s=10.0,
        shapes=KERNEL_SHAPES["small"],
        rows=[
            KernelRow(impl="linrec triton (in place)", is_interpreted=True, **row),
            KernelRow(impl="linrec torch (gather/scatter)", **row),
        ],
    )
    lines = result.format().splitlines()
    assert "linrec triton (in place) [interpreter]" in lines[3]
    assert "[interpreter]" not in lines[4]
    assert "NOT a performance figure" in lines[5]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kernel", list(KERNEL_SHAPES["small"]))
def test_every_contender_computes_the_same_step(kernel, batch):
    """From the same states, every contender's output and updated states equal linrec's torch path. A peer
    called with the wrong arguments (fla's fifth positional parameter is gk, not beta) fails here."""
    interpreted = triton_interpreter()
    run_fla = interpreted and fla_available() and kernel == "gated_delta"  # fla's GLA kernel needs a driver
    with torch.inference_mode():
        made: KernelCases = bench_kernels._kernel_cases(
            kernel, KERNEL_SHAPES["small"][kernel], batch, torch.device("cpu"), interpreted, run_fla
        )
        before = [t.clone() for t in made.states]
        results = {}
        for impl, fn in made.cases:
            out = fn()
            results[impl] = (out, [t.clone() for t in made.states])
            for t, b in zip(made.states, before):
                t.copy_(b)
    assert (kernel == "gated_delta" and run_fla) <= any(impl.startswith("fla") for impl in results)
    ref_out, ref_states = results["linrec torch (gather/scatter)"]
    assert any(not torch.equal(a, b) for a, b in zip(ref_states, before))  # the step did update a state
    for impl, (out, states) in results.items():
        torch.testing.assert_close(out.float().reshape(ref_out.shape), ref_out.float(), atol=1e-4, rtol=1e-4, msg=impl)
        for got, want in zip(states, ref_states):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=impl)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", list(KERNEL_SHAPES["1.3b"]))
def test_every_contender_computes_the_same_step_on_cuda_at_13b(kernel):
    """The same check on a GPU at the 1.3B shapes, batch 8, fla's peers included where fla-core imports (bf16
    inputs, and fla takes q, k in bf16 too: a bf16-sized tolerance)."""
    with torch.inference_mode():
        made = bench_kernels._kernel_cases(
            kernel, KERNEL_SHAPES["1.3b"][kernel], 8, torch.device("cuda"), True, fla_available()
        )
        before = [t.clone() for t in made.states]
        results = {}
        for impl, fn in made.cases:
            out = fn()
            results[impl] = (out, [t.clone() for t in made.states])
            for t, b in zip(made.states, before):
                t.copy_(b)
    ref_out, ref_states = results["linrec torch (gather/scatter)"]
    for impl, (out, states) in results.items():
        torch.testing.assert_close(out.float().reshape(ref_out.shape), ref_out.float(), atol=3e-2, rtol=3e-2, msg=impl)
        for got, want in zip(states, ref_states):
            torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2, msg=impl)


@pytest.mark.skipif(not triton_interpreter(), reason="the Triton kernel runs on the CPU only under the interpreter")
def test_gated_delta_kernel_stays_inside_its_tensors_at_the_13b_shape():
    """linrec's gated delta kernel at the 1.3B bench shape (K=256, V=512: 32 value blocks) touches nothing
    outside its tensors: each lies inside a NaN-filled buffer; a read past an end would put NaN in the
    output or state, a write past one would change the NaN around it."""
    import torch.nn.functional as F

    from linrec.kernels.gated_delta.decode import gated_delta_decode_triton
    from linrec.kernels.gated_delta.prefill import gated_delta_decode

    guard = 4096
    buffers = []

    def guarded(x: torch.Tensor) -> torch.Tensor:
        fill = float("nan") if x.is_floating_point() else -(2**40)  # an int slot id far outside the pool
        buf = torch.full((x.numel() + 2 * guard,), fill, dtype=x.dtype)
        buffers.append(buf)
        return buf[guard : guard + x.numel()].view(x.shape).copy_(x)

    s = KERNEL_SHAPES["1.3b"]["gated_delta"]
    H, HV, K, V, B = s["H"], s["HV"], s["K"], s["V"], 1
    gen = torch.Generator().manual_seed(0)
    q = guarded(torch.randn(B, H, K, generator=gen))
    k = guarded(F.normalize(torch.randn(B, H, K, generator=gen), dim=-1))
    v = guarded(torch.randn(B, HV, V, generator=gen))
    g = guarded(F.logsigmoid(torch.randn(B, HV, generator=gen)))
    beta = guarded(torch.rand(B, HV, generator=gen))
    state = guarded(torch.randn(B + 1, HV, K, V, generator=gen) * 0.1)
    slots = guarded(torch.tensor([1]))
    want_state = state.clone()
    want = gated_delta_decode(q, k, v, g, beta, want_state, slots, K**-0.5)
    got = gated_delta_decode_triton(q, k, v, g, beta, state, slots, K**-0.5)
    for buf, fill in zip(buffers, [float("nan")] * 6 + [-(2**40)]):
        for side in (buf[:guard], buf[-guard:]):
            torch.testing.assert_close(side, torch.full_like(side, fill), atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, want_state, atol=1e-5, rtol=1e-5)


class FakeGraphOps:
    """CudaGraphOps without a GPU: a graph records the calls made while capturing and reruns them on replay;
    time is a counter that each call advances by `call_ms`."""

    def __init__(self, call_ms: float = 0.25):
        self.call_ms, self.clock_ms, self.capturing = call_ms, 0.0, None

    def new_graph(self):
        ops = self

        class Graph:
            calls = []

            def replay(self):
                for _ in self.calls:
                    ops.clock_ms += ops.call_ms

        return Graph()

    def capture(self, graph):
        ops = self

        class Capture:
            def __enter__(self):
                ops.capturing = graph

            def __exit__(self, *exc):
                ops.capturing = None

        return Capture()

    def synchronize(self):
        pass

    def event(self):
        ops = self

        class Event:
            def record(self):
                self.at = ops.clock_ms

            def elapsed_time(self, end):
                return end.at - self.at

        return Event()


def test_graph_timing_captures_n_calls_and_divides_replays():
    ops = FakeGraphOps(call_ms=0.25)
    calls = []

    def fn():
        assert ops.capturing is not None, "fn runs only inside the capture; replays rerun the graph"
        ops.capturing.calls.append(1)
        calls.append(1)

    seconds = time_graph_per_call(fn, ops, calls=10, replays=5)
    assert len(calls) == 10  # captured once: 10 launches recorded, not run 10 x replays times on the host
    assert seconds == pytest.approx(0.25e-3)  # GPU time per call, whatever the host launch rate


def test_time_case_on_cuda_reports_graph_and_eager(monkeypatch):
    monkeypatch.setattr(bench_kernels, "time_per_call", lambda fn, device, repeats, warmup: 50e-6)
    t = time_case(lambda: None, torch.device("cpu"), 3, graph_ops=FakeGraphOps(), graph_timer=lambda fn, ops: 4e-6)
    assert t == CaseTiming(seconds=4e-6, eager_seconds=50e-6, graph_seconds=4e-6, timing="graph replay")


def test_time_case_falls_back_to_eager_when_capture_fails(monkeypatch):
    monkeypatch.setattr(bench_kernels, "time_per_call", lambda fn, device, repeats, warmup: 50e-6)

    def refuses(fn, ops):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    t = time_case(lambda: None, torch.device("cpu"), 3, graph_ops=FakeGraphOps(), graph_timer=refuses)
    assert t.seconds == t.eager_seconds == 50e-6 and t.graph_seconds is None
    assert t.timing.startswith("eager: graph capture failed: RuntimeError: CUDA error: operation not permitted")

    def faults(fn, ops):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):  # never hidden behind an eager figure
        time_case(lambda: None, torch.device("cpu"), 3, graph_ops=FakeGraphOps(), graph_timer=faults)


def test_a_failing_contender_is_recorded_and_a_fatal_one_stops_the_run(monkeypatch):
    real = bench_kernels._kernel_cases

    def with_failures(kernel, *args):
        made = real(kernel, *args)
        if kernel == "ssd":
            made.cases.append(("broken peer", lambda: 1 / 0))
        if kernel == "window":
            made.cases.insert(0, ("faulting peer", _raise_illegal_address))
        return made

    monkeypatch.setattr(bench_kernels, "_kernel_cases", with_failures)
    result = run_kernels(size="small", batch_sizes=[1], device="cpu", repeats=1, impls=["torch", "peer"])
    assert result.errors[0] == "ssd / broken peer / batch 1: ZeroDivisionError: division by zero"
    assert result.errors[1].startswith("window / faulting peer / batch 1: RuntimeError: CUDA error: an illegal")
    assert "stopped: the CUDA context is lost" in result.errors[2]
    kernels_run = [r.kernel for r in result.rows]
    assert "ssd" in kernels_run and "window" not in kernels_run and "short_conv" not in kernels_run
    assert "error: ssd / broken peer" in result.format()


def _raise_illegal_address():
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_kernel_and_impl_filters():
    result = run_kernels(size="small", batch_sizes=[1], device="cpu", repeats=1, kernels=["ssd"], impls=["torch"])
    assert {(r.kernel, r.impl) for r in result.rows} == {
        ("ssd", "linrec torch (gather/scatter)"),
        ("ssd", "transformers torch step + gather/scatter"),
    }
    with pytest.raises(ValueError, match=r"expected kernels among .*got \['nope'\]"):
        run_kernels(size="small", device="cpu", kernels=["nope"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_timing_on_cuda():
    """On a GPU every linrec Triton kernel is captured (graph replay), and replay is no slower than eager
    launches by more than noise; torch paths and peers may fall back (a host sync), marked."""
    result = run_kernels(size="small", batch_sizes=[1, 64], device="cuda", repeats=5)
    assert result.errors == []
    assert "CUDA-graph replay" in result.timing
    for r in result.rows:
        assert r.eager_seconds > 0
        if r.impl.startswith("linrec triton"):
            assert r.timing == "graph replay", (r.kernel, r.impl, r.timing)
            assert r.graph_seconds <= r.eager_seconds * 1.5
        else:
            assert r.timing == "graph replay" or r.timing.startswith("eager: graph capture failed")

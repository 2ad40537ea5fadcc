"""`linrec bench kernels` as a CPU smoke test (--size small): it runs, prints JSON with the expected rows,
counts bytes as documented, and says that CPU figures (and Triton under the interpreter) are not performance."""

from __future__ import annotations

import json

from linrec.bench.kernels import KERNEL_SHAPES, KernelRow, KernelsResult
from linrec.cli import main
from linrec.envs import triton_interpreter


def test_bench_kernels_small_cpu_json(capsys):
    argv = ["bench", "kernels", "--size", "small", "--device", "cpu", "--repeats", "1", "--batch-sizes", "1,2"]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"] == "cpu" and "not a performance figure" in result["note"]
    assert result["interpreted"] == triton_interpreter()
    assert any("fla fused_recurrent" in s for s in result["skipped"])  # the fla peers are CUDA only
    shapes = KERNEL_SHAPES["small"]
    assert result["shapes"] == shapes
    impls = {(r["kernel"], r["impl"], r["batch"]) for r in result["rows"]}
    fused = "linrec triton fused (in place, one launch)"
    triton_impl = {"liger_step": fused, "liger_step_d128": fused}
    for batch in (1, 2):
        for kernel in shapes:  # every kernel has its torch path, and its Triton kernel under the interpreter
            assert (kernel, "linrec torch (gather/scatter)", batch) in impls
            if triton_interpreter():
                assert (kernel, triton_impl.get(kernel, "linrec triton (in place)"), batch) in impls
        assert ("ssd", "transformers torch step + gather/scatter", batch) in impls
        if triton_interpreter():
            assert ("liger_step_d128", "linrec triton window + GLA (two launches)", batch) in impls
    for r in result["rows"]:
        assert r["seconds"] > 0 and r["share_of_copy"] > 0
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

"""The decode kernels compile for a real GPU target (sm_90, ahead of time, no device needed).

The interpreter runs kernels as numpy and accepts code that the compiler rejects (type mismatches
between branches, non-constexpr shapes); this catches those on the CPU. It compiles in a subprocess
without TRITON_INTERPRET (the test session sets it, and under it the compiler's front end misbehaves),
at model-like sizes with bf16 activations.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from linrec.kernels.gla.decode import _gla_decode_kernel
    from linrec.kernels.short_conv.decode import _short_conv_decode_kernel
    from linrec.kernels.window_attn.decode import _liger_attention_decode_kernel, _window_attn_decode_kernel

    BF16 = {"q_ptr", "k_ptr", "v_ptr", "ring_k_ptr", "ring_v_ptr", "x_ptr", "w_ptr", "bias_ptr", "y_ptr"}
    INT64 = {"slot_ptr", "pos_ptr"}

    def signature(kernel, constexprs):
        def kind(name):
            if name in constexprs:
                return "constexpr"
            if name in BF16:
                return "*bf16"
            if name in INT64:
                return "*i64"
            if name.endswith("_ptr"):
                return "*fp32"  # states, gates, feature maps, outputs
            return "fp32" if name.endswith("scale") else "i32"

        return {name: kind(name) for name in kernel.arg_names}

    cases = [
        (_gla_decode_kernel, {"K": 128, "V": 128, "GROUP": 4, "BK": 128, "BV": 32, "GATE": 1}),
        (_gla_decode_kernel, {"K": 96, "V": 80, "GROUP": 1, "BK": 128, "BV": 32, "GATE": 2}),
        (_short_conv_decode_kernel, {"W": 4, "BD": 128, "BW": 4, "HAS_BIAS": True, "SILU": True}),
        (_window_attn_decode_kernel, {"W": 64, "D": 128, "GROUP": 4, "BW": 64, "BD": 128}),
        (_liger_attention_decode_kernel, {"W": 64, "D": 128, "GROUP": 4, "BW": 64, "BD": 128, "BV": 32}),
    ]
    for kernel, constexprs in cases:
        src = ASTSource(fn=kernel, signature=signature(kernel, constexprs), constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert ".entry" in compiled.asm["ptx"], kernel.fn.__name__
        print("compiled", kernel.fn.__name__)
    """
)


def test_decode_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a fresh cache: really compile
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("triton's CUDA toolchain (ptxas) is not installed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == 5

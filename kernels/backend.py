"""The one place that decides which implementation of the ops runs.

It imports no torch at module level: EngineConfig validates kernel_backend against BACKENDS, and the
config (with the `linrec` command's parser built from it) must load without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """Map a kernel_backend setting to the implementation the ops dispatch on: "triton" or "torch".

    auto picks triton on a CUDA device and torch elsewhere; triton on the CPU needs TRITON_INTERPRET=1.
    Triton on CUDA goes through kernels/toolchain.py first (once per device): a toolchain known to
    miscompile gets one warning line and either a newer ptxas or, with none at hand, "torch" here where it
    cannot compile at all, whether triton was asked for or picked by auto: a correct answer before a
    requested one. Where only the tensor-core prefill kernels are at risk, see `can_run_triton_prefill`.
    """
    import torch

    if requested not in BACKENDS:
        raise ValueError(f"expected kernel_backend in {BACKENDS}, got {requested!r}")
    device = torch.device(device)
    backend = ("triton" if device.type == "cuda" else "torch") if requested == "auto" else requested
    if backend == "triton" and device.type == "cuda":
        from linrec.kernels.toolchain import prepare_triton

        if not prepare_triton(device).use_triton:
            return "torch"
    return backend


def can_run_triton_prefill(device: torch.device | str) -> bool:
    """Whether the triton backend's chunked prefill kernels (tensor cores, shared memory) may run on `device`:
    False on CUDA with a toolchain known to miscompile them (kernels/toolchain.py), where the ops take the
    torch chunked path for prefill and keep Triton for decode. Always True off CUDA (the interpreter)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return True
    from linrec.kernels.toolchain import prepare_triton

    return prepare_triton(device).use_triton_prefill

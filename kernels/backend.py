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
    """
    import torch

    if requested not in BACKENDS:
        raise ValueError(f"expected kernel_backend in {BACKENDS}, got {requested!r}")
    if requested == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return requested

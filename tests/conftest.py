"""Suite-wide setup: Triton kernels run under the interpreter where there is no GPU.

triton.jit reads TRITON_INTERPRET when it decorates a kernel (triton 3.9: knobs.runtime.interpret, read
from the environment at each access), so it is set here, before any test module imports linrec.kernels.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

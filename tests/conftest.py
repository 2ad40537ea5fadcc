"""Without CUDA, Triton kernels run under the interpreter; set before any module decorates with triton.jit."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

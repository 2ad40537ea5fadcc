"""Suite-wide setup: Triton kernels run under the interpreter where there is no GPU; tiny demo checkpoints
shared by the engine and bench suites.

triton.jit reads TRITON_INTERPRET when it decorates a kernel (triton 3.9: knobs.runtime.interpret, read
from the environment at each access), so it is set here, before any test module imports linrec.kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """Per family, a tiny demo checkpoint written once for the whole session."""
    from linrec.models.demo import write_demo_model

    made: dict[str, str] = {}

    def get(family: str = "liger_gla") -> str:
        if family not in made:
            path = tmp_path_factory.mktemp(f"demo-{family}")
            write_demo_model(path, family)
            made[family] = str(path)
        return made[family]

    return get

"""EngineConfig: it loads without torch, validates its fields, and its choices are the ones the loader takes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from linrec.engine.config import EngineConfig


def test_engine_config_imports_no_torch() -> None:
    probe = (
        "import sys; import linrec.engine.config, linrec.kernels.backend, linrec.models.registry; "
        "print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", "EngineConfig must load without torch (a fast `linrec --help`)"


def test_engine_config_validates_choices() -> None:
    assert EngineConfig(dtype="bfloat16", kernel_backend="torch", linearize="liger-gla").linearize == "liger-gla"
    with pytest.raises(ValueError, match="expected dtype in"):
        EngineConfig(dtype="float64")
    with pytest.raises(ValueError, match="expected kernel_backend in"):
        EngineConfig(kernel_backend="cuda")
    with pytest.raises(ValueError, match=r"expected linearize in \('liger-gla',\) or None, got 'fancy'"):
        EngineConfig(linearize="fancy")

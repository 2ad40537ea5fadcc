"""linrec: an inference server for linearized and recurrent LLMs.

Each request keeps one constant-size recurrent state in a slot pool instead of a KV cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "EngineConfig", "SamplingParams", "RequestOutput", "__version__"]

if TYPE_CHECKING:
    from linrec.engine.async_llm import AsyncLLM
    from linrec.engine.config import EngineConfig
    from linrec.engine.llm import LLM
    from linrec.engine.request import RequestOutput
    from linrec.engine.sampling_params import SamplingParams

# Imported on first use so that `import linrec` (and `linrec --help`) does not load torch.
_LAZY = {
    "LLM": "linrec.engine.llm",
    "AsyncLLM": "linrec.engine.async_llm",
    "EngineConfig": "linrec.engine.config",
    "SamplingParams": "linrec.engine.sampling_params",
    "RequestOutput": "linrec.engine.request",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'linrec' has no attribute {name!r}")

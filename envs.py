"""Every environment variable linrec reads, in one place."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """Where linrec keeps what it creates on first use (the bench models).

    LINREC_CACHE_DIR wins; otherwise $XDG_CACHE_HOME/linrec, otherwise ~/.cache/linrec.
    """
    explicit = os.environ.get("LINREC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "linrec"


def api_key() -> str | None:
    """LINREC_API_KEY: the key every /v1 route demands when set (the server's --api-key wins)."""
    return os.environ.get("LINREC_API_KEY") or None


def triton_interpreter() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on the CPU under triton's interpreter (tests; never fast)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_cache_dir() -> Path:
    """Where Triton keeps compiled kernels and autotune results: TRITON_CACHE_DIR when set, otherwise
    cache_dir()/triton (linrec's, not ~/.triton: a restart finds what the last start compiled)."""
    explicit = os.environ.get("TRITON_CACHE_DIR")
    return Path(explicit).expanduser() if explicit else cache_dir() / "triton"


def is_triton_cache_dir_set() -> bool:
    """Whether TRITON_CACHE_DIR was given (linrec then leaves Triton's cache where the user put it)."""
    return bool(os.environ.get("TRITON_CACHE_DIR"))


def triton_ptxas_path() -> str | None:
    """TRITON_PTXAS_PATH: the ptxas Triton assembles sm < 100 kernels with (triton falls back to its bundled
    one when this one does not run). linrec never overrides an explicit one."""
    return os.environ.get("TRITON_PTXAS_PATH") or None


def triton_ptxas_blackwell_path() -> str | None:
    """TRITON_PTXAS_BLACKWELL_PATH: the ptxas Triton assembles sm >= 100 kernels with."""
    return os.environ.get("TRITON_PTXAS_BLACKWELL_PATH") or None


def cuda_home() -> str | None:
    """CUDA_HOME (or CUDA_PATH): a CUDA toolkit whose bin/ptxas may be newer than Triton's bundled one."""
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or None


@contextlib.contextmanager
def overridden(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a `with` block (for the child processes a bench starts),
    then restore them as they were."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

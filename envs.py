"""Every environment variable linrec reads, in one place."""

from __future__ import annotations

import os
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

"""Writing a directory atomically: build it in a temporary sibling, then rename it into place.

Every checkpoint linrec writes goes through here (the cached demo and bench models, `linrec convert`), so
a reader never sees a half-written directory and an interrupted or failed writer leaves nothing behind.
rename(2) replaces an empty directory but fails on a non-empty one: when several processes race to write
the same directory, the first rename wins and the others discard their copies.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def is_non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def write_dir_atomically(dst: str | Path, write: Callable[[Path], object]) -> bool:
    """Call `write(staging)` on a new empty directory beside `dst`, then rename it to `dst`.

    `dst` must not exist or be an empty directory (FileExistsError otherwise, before anything is written).
    Returns True when this call's directory was renamed into place, False when another writer's finished
    directory took `dst` first (this call's copy is discarded). If `write` raises, its partial directory
    is removed and the exception propagates.
    """
    dst = Path(dst).expanduser()
    if dst.exists() and (not dst.is_dir() or is_non_empty_dir(dst)):
        raise FileExistsError(f"destination {str(dst)!r} exists and is not an empty directory; refusing to overwrite")
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        write(staging)
        try:
            os.rename(staging, dst)
        except OSError:
            if not is_non_empty_dir(dst):  # not a lost race: a real failure
                raise
            return False
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return True


def cached_dir(dst: str | Path, write: Callable[[Path], object]) -> Path:
    """`dst`, written by `write` on first use (see write_dir_atomically). A non-empty `dst` is a finished
    copy, since only finished directories are renamed into place, so it is returned as it is."""
    dst = Path(dst).expanduser()
    if is_non_empty_dir(dst):
        return dst
    try:
        write_dir_atomically(dst, write)
    except FileExistsError:
        if not is_non_empty_dir(dst):  # not another writer finishing between the check and the write
            raise
    return dst

"""The built wheel carries what `pip install .` users need: every package folder, and the default model
(models/default/, package data) that `linrec serve` loads with no model given."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_default_model_and_the_recipes(tmp_path: Path) -> None:
    had_build_dir = (ROOT / "build").exists()
    try:
        build = _build_wheel(tmp_path)
    finally:
        if not had_build_dir:  # setuptools builds in the source tree's build/; a stale one could leak into wheels
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("linrec-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (ROOT / "models" / "default").iterdir()}
    assert {f"linrec/models/default/{name}" for name in shipped} <= names
    assert {"linrec/recipes/tiny_liger.py", "linrec/bench/startup.py", "linrec/cli/__init__.py"} <= names
    assert not any(name.startswith(("linrec/tests/", "linrec/docs/")) for name in names)


def _build_wheel(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        cwd=out,
        timeout=300,
    )

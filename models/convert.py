"""Llama/Qwen2/Mistral -> Liger-GLA checkpoint conversion: a new config.json, the same weights.

Liger-GLA reuses every weight of the source model unchanged (the gate comes from k_proj, the feature
maps have no parameters), so conversion copies the safetensors files and their index byte for byte
and writes only a new config.json.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from linrec.models.loader import INDEX_FILE, check_model_dir, checkpoint_files, linearize_config, read_hf_config
from linrec.models.staging import write_dir_atomically
from linrec.models.tokenizer import TOKENIZER_FILES

# Copied beside the weights when present: generation defaults and everything a tokenizer needs.
_EXTRA_FILES = ("generation_config.json", *TOKENIZER_FILES)


def convert_checkpoint(src: str | Path, dst: str | Path, to: str = "liger-gla") -> Path:
    """Write `dst`: `src`'s weights (files and index unchanged), tokenizer and generation config,
    and the config.json of the linearized model. Returns `dst`.

    Refuses a `dst` that exists and is not an empty directory. The output is written atomically
    (models/staging.py), so an interrupted conversion leaves no half-written dst.
    """
    src = check_model_dir(src)
    dst = Path(dst).expanduser()
    if dst.resolve() == src.resolve():
        raise ValueError(f"destination {str(dst)!r} is the source directory")
    config = linearize_config(read_hf_config(src), to)
    files = checkpoint_files(src)

    def write(staging: Path) -> None:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if (src / INDEX_FILE).is_file():
            shutil.copy2(src / INDEX_FILE, staging / INDEX_FILE)
        copy_base_files(src, staging, files)

    return write_new_dir(dst, write)


def copy_base_files(src: Path, staging: Path, files: list[Path]) -> None:
    """Copy `src`'s weight files (at their paths relative to it), its tokenizer and generation config."""
    for file in files:
        target = staging / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target)
    for name in _EXTRA_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, staging / name)


def write_new_dir(dst: Path, write: Callable[[Path], object]) -> Path:
    """write_dir_atomically, with the one-line refusal when another process wrote `dst` meanwhile."""
    if not write_dir_atomically(dst, write):
        raise FileExistsError(f"destination {str(dst)!r} was written by another process meanwhile; not overwriting it")
    return dst

"""The models linrec has without a download.

`default_model_path()` is what `linrec serve`, `linrec generate`, `linrec info` and `LLM()` load when no
model is given: the trained Liger-GLA checkpoint shipped in the package (models/default/, made by
`python -m linrec.recipes.tiny_liger train`; docs/default-model.md). `write_demo_model` writes tiny seeded
random checkpoints of each family, with a byte-level tokenizer and a chat template, for tests and
`linrec demo-model`.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from linrec.models.tokenizer import DEMO_VOCAB_SIZE, demo_special_token_ids, write_byte_tokenizer

DEMO_SEED = 0
DEFAULT_MODEL_DIR = Path(__file__).parent / "default"
DEFAULT_DEMO_FAMILY = "liger_gla"
# torch's global generator is shared by all threads: two demo writes seeding and drawing at once
# would interleave their draws and write different weights.
_SEEDED_INIT_LOCK = threading.Lock()


def demo_llama_config() -> dict[str, Any]:
    """The tiny Llama (transformers' `LlamaConfig(**demo_llama_config())`) that tests build with transformers
    to convert, to train adapters on with peft and to serve as Liger-GLA: the demo vocabulary, hidden 64,
    2 layers, 4 query and 2 KV heads, an untied lm_head."""
    return {
        "vocab_size": DEMO_VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    }


def write_demo_model(dst: str | Path, family: str = DEFAULT_DEMO_FAMILY) -> Path:
    """Write a tiny `family` checkpoint (config.json, model.safetensors, generation_config.json,
    tokenizer.json, tokenizer_config.json) to `dst`, which must not exist or be empty. Returns `dst`.

    The weights are the family's own random init under a fixed seed, so two calls write the same model.
    """
    from linrec.models.registry import DEMO_FAMILIES

    if family not in DEMO_FAMILIES:
        raise ValueError(f"unknown demo family {family!r}; expected one of {', '.join(DEMO_FAMILIES)}")
    return write_seeded_model(dst, family)


def write_seeded_model(
    dst: str | Path,
    family: str,
    overrides: dict[str, Any] | None = None,
    *,
    vocab_size: int = DEMO_VOCAB_SIZE,
    dtype: str = "float32",
    seed: int = DEMO_SEED,
) -> Path:
    """write_demo_model's writer: linrec's own `family` class at its demo config with `overrides`, random init
    under `seed`, saved in `dtype` (its parameter names are the family's checkpoint format, so the family's
    reference implementation loads it too), with the byte-level tokenizer. The benches write larger ones."""
    import torch
    from safetensors.torch import save_file

    from linrec.models.registry import get_model_class

    dst = Path(dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"destination {str(dst)!r} exists and is not an empty directory; refusing to overwrite")

    model_cls = get_model_class(family)
    special_ids = demo_special_token_ids()
    config = {**model_cls.demo_hf_config(), "vocab_size": vocab_size, **special_ids, "torch_dtype": dtype}
    config.update(overrides or {})
    config.setdefault("model_type", family)
    # fork_rng: the fixed seed must not reset the caller's global generator.
    with _SEEDED_INIT_LOCK, torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        model = model_cls.from_hf_config(config).to(getattr(torch, dtype))
    tied = model.tied_weights()
    # clone: safetensors refuses tensors that share storage, and tied copies are not saved at all.
    tensors = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items() if name not in tied}

    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dst / "generation_config.json").write_text(json.dumps(special_ids, indent=2) + "\n")
    write_byte_tokenizer(dst)
    return dst


def default_model_path() -> Path:
    """Directory of the default model: the trained Liger-GLA checkpoint shipped in the package."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the default model is missing from {str(DEFAULT_MODEL_DIR)!r} (an install without its package data?); "
            "expected config.json there, or pass a model directory"
        )
    return DEFAULT_MODEL_DIR

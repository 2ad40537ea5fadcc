"""model_type -> model class. Classes are imported lazily so that loading one family imports no other."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names below load without torch (the `linrec` command's choices come from here)
    from linrec.models.base import CausalLM

# model_type -> (module, class)
_FAMILIES: dict[str, tuple[str, str]] = {
    "liger_gla": ("linrec.models.liger_gla", "LigerGLAForCausalLM"),
    "liger_qwen2_gla": ("linrec.models.liger_gla", "LigerGLAForCausalLM"),
    "liger_mistral_gla": ("linrec.models.liger_gla", "LigerGLAForCausalLM"),
    "lolcats_llama": ("linrec.models.lolcats", "LolcatsForCausalLM"),
    "gla": ("linrec.models.gla", "GLAForCausalLM"),
    "gated_deltanet": ("linrec.models.gated_deltanet", "GatedDeltaNetForCausalLM"),
    "mamba2": ("linrec.models.mamba2", "Mamba2ForCausalLM"),
}

# The family names `linrec demo-model --family` takes, each a model_type above.
DEMO_FAMILIES = ("liger_gla", "gla", "gated_deltanet", "mamba2", "lolcats_llama")


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def get_model_class(model_type: str) -> type[CausalLM]:
    try:
        module_name, class_name = _FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"unsupported model_type {model_type!r}; expected one of {', '.join(supported_model_types())}"
        ) from None
    return getattr(importlib.import_module(module_name), class_name)

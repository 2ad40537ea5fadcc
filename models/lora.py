"""Merging a PEFT LoRA adapter into a checkpoint's weights while they stream into the model.

W' = W + scaling * B @ A, scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora): what
peft's `merge_and_unload()` computes, done here in fp32 on each tensor as it is read, so the base
checkpoint is never held twice in memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from linrec.models.loader import read_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."

# adapter_config.json switches that change the merge math or the model structure; merging such an
# adapter as plain LoRA would be silently wrong, so each is refused by name.
_UNSUPPORTED_SWITCHES = {
    "use_dora": "DoRA (use_dora=true)",
    "lora_bias": "LoRA bias (lora_bias=true)",
    "use_qalora": "QALoRA (use_qalora=true)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "parameter targeting (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
}


@dataclass(frozen=True)
class LoraDelta:
    """One adapted weight: its delta is scaling * B @ A (transposed when `is_transposed`)."""

    lora_a: torch.Tensor  # [r, in] (Linear) or [r, num_embeddings] (Embedding)
    lora_b: torch.Tensor  # [out, r] (Linear) or [embedding_dim, r] (Embedding)
    scaling: float
    is_transposed: bool  # Embedding, or fan_in_fan_out (Conv1D-style [in, out] weights)

    def delta(self) -> torch.Tensor:
        product = self.lora_b.float() @ self.lora_a.float()
        return (product.T if self.is_transposed else product) * self.scaling


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter read from disk, keyed by the checkpoint tensor names it changes."""

    path: Path
    deltas: dict[str, LoraDelta]  # checkpoint weight name -> low-rank update
    replacements: dict[str, torch.Tensor]  # checkpoint tensor name -> full tensor (modules_to_save)

    def check_targets(self, checkpoint_names: Iterable[str]) -> None:
        """Raise ValueError naming the first tensor the adapter changes that the checkpoint lacks."""
        names = set(checkpoint_names)
        for name in [*self.deltas, *self.replacements]:
            if name not in names:
                module = name.rsplit(".", 1)[0]
                raise ValueError(
                    f"LoRA adapter {str(self.path)!r} targets module {module!r}, "
                    f"but the checkpoint has no tensor {name!r}"
                )

    def merge(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the checkpoint's tensors with the adapter merged in (merged ones in fp32)."""
        for name, tensor in weights:
            replacement = self.replacements.get(name)
            if replacement is not None:
                if tuple(replacement.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"LoRA adapter {str(self.path)!r} replaces {name!r} with shape {tuple(replacement.shape)}, "
                        f"checkpoint has {tuple(tensor.shape)}"
                    )
                tensor = replacement
            lora = self.deltas.get(name)
            if lora is not None:
                delta = lora.delta()
                if tuple(delta.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"LoRA adapter {str(self.path)!r} update for {name!r} has shape {tuple(delta.shape)}, "
                        f"checkpoint has {tuple(tensor.shape)}"
                    )
                tensor = tensor.float() + delta
            yield name, tensor


def read_lora_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

    Raises FileNotFoundError for a missing directory or file and ValueError for an adapter kind
    this merge does not implement (non-LoRA peft_type, DoRA, ...) or a tensor it cannot place.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"LoRA adapter directory {str(path)!r} does not exist (only local directories are accepted)"
        )
    if not path.is_dir():
        raise ValueError(f"LoRA adapter path {str(path)!r} is not a directory")
    config = _read_adapter_config(path)
    weights_file = path / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        found = "adapter_model.bin (only safetensors are read)" if (path / "adapter_model.bin").is_file() else "none"
        raise FileNotFoundError(f"LoRA adapter {str(path)!r} has no {ADAPTER_WEIGHTS}; found {found}")

    from safetensors.torch import load_file

    tensors = load_file(str(weights_file))
    pairs: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"A"/"B": tensor}
    is_embedding: dict[str, bool] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(_PREFIX):
            raise ValueError(
                f"LoRA adapter {str(path)!r}: expected tensor names starting with {_PREFIX!r}, got {key!r}"
            )
        name = key[len(_PREFIX) :]
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
        if match:
            module = match.group(1) or match.group(3)
            kind = match.group(2) or match.group(4)
            pairs.setdefault(module, {})[kind[-1]] = tensor
            is_embedding[module] = kind.startswith("lora_embedding")
        elif "lora_magnitude_vector" in name:
            raise ValueError(f"LoRA adapter {str(path)!r} is a DoRA adapter ({key!r}); only plain LoRA can be merged")
        elif "lora_" in name:
            raise ValueError(f"LoRA adapter {str(path)!r} has tensor {key!r} of a kind this merge does not implement")
        else:
            # modules_to_save and saved embedding layers: full tensors that replace the base ones.
            # Older peft writes them as <module>.modules_to_save.<adapter>.<param>.
            name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name).replace(".base_layer.", ".")
            replacements[name] = tensor

    rank_pattern: dict[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    deltas: dict[str, LoraDelta] = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            have = "lora_A" if "A" in pair else "lora_B"
            raise ValueError(f"LoRA adapter {str(path)!r} has {have} for {module!r} but not its partner")
        rank_key = _pattern_key(rank_pattern, module)
        rank = int(rank_pattern[rank_key]) if rank_key else int(config["r"])
        alpha_key = _pattern_key(alpha_pattern, module)
        alpha = float(alpha_pattern[alpha_key]) if alpha_key else float(config["lora_alpha"])
        if pair["A"].shape[0] != rank or pair["B"].shape[-1] != rank:
            raise ValueError(
                f"LoRA adapter {str(path)!r}: expected rank {rank} for {module!r} (adapter_config.json), "
                f"got lora_A {tuple(pair['A'].shape)} and lora_B {tuple(pair['B'].shape)}"
            )
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        deltas[f"{module}.weight"] = LoraDelta(
            lora_a=pair["A"],
            lora_b=pair["B"],
            scaling=scaling,
            is_transposed=is_embedding[module] or bool(config.get("fan_in_fan_out")),
        )
    if not deltas and not replacements:
        raise ValueError(f"LoRA adapter {str(path)!r} holds no LoRA tensors")
    return LoraAdapter(path=path, deltas=deltas, replacements=replacements)


def _read_adapter_config(path: Path) -> dict[str, Any]:
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"LoRA adapter directory {str(path)!r} has no {ADAPTER_CONFIG}")
    config = read_json_object(config_file)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(
            f"unsupported adapter kind peft_type={config.get('peft_type')!r} in {str(config_file)!r}; "
            "only LORA adapters can be merged"
        )
    for switch, what in _UNSUPPORTED_SWITCHES.items():
        if config.get(switch):
            raise ValueError(f"unsupported LoRA variant in {str(config_file)!r}: {what}; only plain LoRA can be merged")
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"expected a positive number for {field!r} in {str(config_file)!r}, got {value!r}")
    return config


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The rank_pattern/alpha_pattern key that applies to `module`, matched the way peft matches it."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None

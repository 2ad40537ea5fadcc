"""PEFT LoRA adapters: read from disk, then merged into a checkpoint's weights at load, or placed on the
model's projections for serving per request.

W' = W + scaling * B @ A, scaling = lora_alpha / r (lora_alpha / sqrt(r) with use_rslora): what
peft's `merge_and_unload()` computes, done here in fp32 on each tensor as it is read, so the base
checkpoint is never held twice in memory. Served per request (`place_lora_adapter`), the same A and
scaling * B go into a device adapter slot of each projection they target.
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
    linrec does not implement (non-LoRA peft_type, DoRA, ...) or a tensor it cannot place.
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

    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # safetensors' own error type (a corrupt or truncated file) is no ValueError
        raise ValueError(
            f"LoRA adapter {str(path)!r}: {ADAPTER_WEIGHTS} is not a readable safetensors file "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from None
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
            raise ValueError(
                f"LoRA adapter {str(path)!r} is a DoRA adapter ({key!r}); only plain LoRA is served or merged"
            )
        elif "lora_" in name:
            raise ValueError(f"LoRA adapter {str(path)!r} has tensor {key!r} of a kind linrec does not implement")
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
            "only LORA adapters are served or merged"
        )
    for switch, what in _UNSUPPORTED_SWITCHES.items():
        if config.get(switch):
            raise ValueError(
                f"unsupported LoRA variant in {str(config_file)!r}: {what}; only plain LoRA is served or merged"
            )
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


# Fused projections some trainers and architectures write (one LoRA over q, k and v stacked on the output
# axis) -> linrec's split projections, in output order. A fused adapter splits exactly: its lora_A is
# shared and its lora_B's rows divide along the split, since B @ A stacks row blocks the same way.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA adapter placed on a model's projections, ready to copy into a device adapter slot."""

    name: str
    path: Path
    rank: int  # the largest rank over its modules (what the slot's R must hold)
    # projection module name -> (A [r, in], scaling * B [out, r]) in the model's dtype, on the CPU
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    uid: int = 0  # the engine's registration number (engine/adapters.py); 0 outside a registry

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())


def place_lora_adapter(
    adapter: LoraAdapter,
    name: str,
    projections: dict[str, tuple[int, int]],
    max_rank: int,
    dtype: torch.dtype,
) -> LoraWeights:
    """Map an adapter's modules onto a model's projections ({module name: (in_features, out_features)}).

    Raises ValueError for anything that cannot be served per request: full-tensor replacements
    (modules_to_save, saved embeddings), embedding or lm_head targets, a module name that maps to no
    projection (never a silent zero), a shape that does not fit, or a rank above max_rank.
    """
    where = f"LoRA adapter {name!r} ({str(adapter.path)!r})"
    if adapter.replacements:
        first = sorted(adapter.replacements)[0]
        raise ValueError(
            f"{where} saves full tensors (modules_to_save or embedding layers, first {first!r}); per-request "
            "adapters must be pure LoRA (merge this one at load with --merge-lora instead)"
        )
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for weight_name, delta in sorted(adapter.deltas.items()):
        module = weight_name.removesuffix(".weight")
        if delta.is_transposed:
            raise ValueError(
                f"{where} adapts {module!r} as an embedding or a fan_in_fan_out (Conv1D) layer; per-request "
                "LoRA applies to the decoder's linear projections only"
            )
        targets = _split_targets(module, projections)
        if targets is None:
            raise ValueError(
                f"{where} targets module {module!r}, which is not a projection of this model; per-request LoRA "
                f"applies to the decoder's linear projections (e.g. {next(iter(sorted(projections)), 'none')!r})"
            )
        rank = delta.lora_a.shape[0]
        if rank > max_rank:
            raise ValueError(f"{where} has rank {rank} on {module!r}, above max_lora_rank={max_rank}")
        in_features = projections[targets[0]][0]
        out_total = sum(projections[t][1] for t in targets)
        if tuple(delta.lora_a.shape) != (rank, in_features) or tuple(delta.lora_b.shape) != (out_total, rank):
            raise ValueError(
                f"{where}: expected lora_A [{rank}, {in_features}] and lora_B [{out_total}, {rank}] for {module!r}, "
                f"got {tuple(delta.lora_a.shape)} and {tuple(delta.lora_b.shape)}"
            )
        lora_b = delta.lora_b.float() * delta.scaling
        offset = 0
        for target in targets:
            out_features = projections[target][1]
            if target in modules:
                raise ValueError(f"{where} adapts {target!r} twice (split and fused)")
            modules[target] = (
                delta.lora_a.to(dtype).contiguous(),
                lora_b[offset : offset + out_features].to(dtype).contiguous(),
            )
            offset += out_features
    if not modules:
        raise ValueError(f"{where} holds no LoRA tensors")
    return LoraWeights(name, adapter.path, max(a.shape[0] for a, _ in modules.values()), modules)


def _split_targets(module: str, projections: dict[str, tuple[int, int]]) -> tuple[str, ...] | None:
    """The projections `module` lands on: itself, or the split parts of a fused name; None when none exist."""
    if module in projections:
        return (module,)
    prefix, _, leaf = module.rpartition(".")
    parts = FUSED_PROJECTIONS.get(leaf)
    if parts is None:
        return None
    names = tuple(f"{prefix}.{part}" if prefix else part for part in parts)
    return names if all(n in projections for n in names) else None

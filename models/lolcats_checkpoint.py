"""The released LoLCATs files (`.pt` state dicts on top of a base Llama/Mistral) -> a linrec lolcats_llama directory.

A release (HazyResearch/lolcats, attention `lolcats_llama_window_tk` or `_sw`) ships one or two `.pt` files: the
attention transfer (per layer `self_attn.feature_map_q.mlp.layer`, `self_attn.feature_map_k.mlp.layer` [H, D, F]
and `self_attn.window_factors` [1, H, 1, 1]) and the LoRA finetune (`self_attn.{q,k,v,o}_proj.lora_{A,B}`, peft's
names, with or without `.default`). Each is a state dict or {"model_state_dict": state dict, ...}; key prefixes
vary (`model.`, `model.model.`, `base_model.model.model.`), so keys are read from `layers.N.self_attn.` on. Files
are read in order: a later file's tensor replaces an earlier one's, as the release's own loader does.

`convert_lolcats` writes: the base's weights unchanged, `lolcats.safetensors` with the feature maps and window
factors under linrec's (the release's) names, an index naming both, the LoRA as a peft adapter directory
(`lolcats_lora/`) that the loader merges as the weights stream, and a config.json of model_type lolcats_llama.
Every unsupported variant, key or shape is a one-line ValueError naming the file and the key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from linrec.models.convert import copy_base_files, write_new_dir
from linrec.models.loader import INDEX_FILE, check_model_dir, checkpoint_files, checkpoint_tensor_names, read_hf_config

LOLCATS_WEIGHTS_FILE = "lolcats.safetensors"
LOLCATS_LORA_DIR = "lolcats_lora"
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
WINDOW_SIZE = 64  # the released attention's window (`window_size: 64` in every released config)
_KEY = re.compile(
    r"(?:.*\.)?layers\.(\d+)\.self_attn\."
    r"(?:(feature_map_[qk])\.mlp\.layer|(window_factors)|([qkvo]_proj)\.(lora_[AB])(?:\.default)?\.weight)"
)
_EXPECTED_KEYS = (
    "expected per-layer self_attn.feature_map_{q,k}.mlp.layer, self_attn.window_factors and "
    "self_attn.{q,k,v,o}_proj.lora_{A,B}[.default].weight (lolcats_llama_window_tk/_sw)"
)


@dataclass
class LolcatsWeights:
    """A release's tensors per layer, checked against the base config."""

    feature_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # linrec name -> [H, D, F] or [1, H, 1, 1]
    lora: dict[tuple[int, str], dict[str, torch.Tensor]] = field(default_factory=dict)  # (layer, proj) -> A, B
    sources: dict[str, str] = field(default_factory=dict)  # linrec name -> the file it came from

    @property
    def feature_dim(self) -> int:
        return next(t for n, t in self.feature_maps.items() if n.endswith(".mlp.layer")).shape[-1]

    @property
    def lora_rank(self) -> int | None:
        ranks = {pair["lora_A"].shape[0] for pair in self.lora.values()}
        return ranks.pop() if ranks else None


def read_state_dict(file: str | Path) -> dict[str, torch.Tensor]:
    """A `.pt` file's tensors: a state dict, or the release's {"model_state_dict": ...} wrapper."""
    file = Path(file).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"LoLCATs weights file {str(file)!r} does not exist")
    try:
        # weights_only: tensors and plain containers, never arbitrary pickled objects
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file, or one holding objects weights_only refuses
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"cannot read LoLCATs weights {str(file)!r} as a torch state dict: {detail}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(
            f"LoLCATs weights {str(file)!r}: expected a state dict of tensors (or {{'model_state_dict': ...}}), "
            f"got {type(obj).__name__}"
        )
    if not obj:
        raise ValueError(f"LoLCATs weights {str(file)!r} hold no tensors")
    return obj


def read_lolcats_weights(files: list[str | Path], base_config: dict[str, Any]) -> LolcatsWeights:
    """Read and check a release's files against the base model's config.json."""
    if not files:
        raise ValueError("expected at least one LoLCATs weights file (.pt)")
    L = base_config["num_hidden_layers"]
    H = base_config["num_attention_heads"]
    Hk = base_config.get("num_key_value_heads") or H
    D = base_config.get("head_dim") or base_config["hidden_size"] // H
    hidden = base_config["hidden_size"]
    weights = LolcatsWeights()
    for file in files:
        for key, tensor in read_state_dict(file).items():
            match = _KEY.fullmatch(key)
            if match is None:
                hint = " (a feature map with a bias is not supported)" if "feature_map" in key else ""
                raise ValueError(f"LoLCATs weights {str(file)!r}: unsupported key {key!r}{hint}; {_EXPECTED_KEYS}")
            layer = int(match.group(1))
            if layer >= L:
                raise ValueError(
                    f"LoLCATs weights {str(file)!r}: key {key!r} names layer {layer}, the base has {L} layers"
                )
            fmap, factors, proj, lora = match.group(2), match.group(3), match.group(4), match.group(5)
            if lora is not None:
                weights.lora.setdefault((layer, proj), {})[lora] = tensor
                continue
            name = f"model.layers.{layer}.self_attn." + (f"{fmap}.mlp.layer" if fmap else factors)
            if fmap and (tensor.dim() != 3 or tuple(tensor.shape[:2]) != (H, D)):
                raise ValueError(
                    f"LoLCATs weights {str(file)!r}: expected {key!r} of shape [{H}, {D}, F] (heads, head_dim, "
                    f"features), got {tuple(tensor.shape)}"
                )
            if factors and tensor.numel() != H:
                raise ValueError(
                    f"LoLCATs weights {str(file)!r}: expected {key!r} of shape [1, {H}, 1, 1], "
                    f"got {tuple(tensor.shape)}"
                )
            weights.feature_maps[name] = tensor.reshape(1, H, 1, 1) if factors else tensor
            weights.sources[name] = str(file)

    for layer in range(L):
        for part in ("feature_map_q.mlp.layer", "feature_map_k.mlp.layer", "window_factors"):
            if f"model.layers.{layer}.self_attn.{part}" not in weights.feature_maps:
                what = (
                    " (a LoLCATs model without a sliding window is not supported)" if part == "window_factors" else ""
                )
                raise ValueError(
                    f"LoLCATs weights {[str(f) for f in files]} lack layer {layer}'s self_attn.{part}{what}"
                )
    dims = {t.shape[-1] for n, t in weights.feature_maps.items() if n.endswith(".mlp.layer")}
    if len(dims) != 1:
        raise ValueError(f"expected one feature dimension F in every feature map, got {sorted(dims)}")

    shapes = {
        "q_proj": (hidden, H * D),
        "k_proj": (hidden, Hk * D),
        "v_proj": (hidden, Hk * D),
        "o_proj": (H * D, hidden),
    }
    for (layer, proj), pair in sorted(weights.lora.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            have = next(iter(pair))
            raise ValueError(f"LoLCATs LoRA for layer {layer} {proj} has {have} but not its partner")
        a, b = pair["lora_A"], pair["lora_B"]
        fan_in, fan_out = shapes[proj]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"LoLCATs LoRA for layer {layer} {proj}: expected lora_A [r, {fan_in}] and lora_B [{fan_out}, r], "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )
    ranks = {pair["lora_A"].shape[0] for pair in weights.lora.values()}
    if len(ranks) > 1:
        raise ValueError(f"expected one LoRA rank across the LoLCATs LoRA, got {sorted(ranks)}")
    return weights


def lolcats_config(base_config: dict[str, Any], weights: LolcatsWeights, window_size: int = WINDOW_SIZE) -> dict:
    """The lolcats_llama config.json over a Llama/Mistral base config."""
    from linrec.models.lolcats import DEFAULT_FEATURE_MAP_EPS, LOLCATS_BASES, LolcatsConfig

    base_type = base_config.get("model_type")
    if base_type not in LOLCATS_BASES:
        raise ValueError(f"expected a LoLCATs base of model_type in {LOLCATS_BASES}, got {base_type!r}")
    config = {
        **base_config,
        "model_type": "lolcats_llama",
        "architectures": ["LolcatsLlamaForCausalLM"],
        "lolcats_base_model_type": base_type,
        "window_size": window_size,
        "feature_dim": weights.feature_dim,
        "feature_map_eps": DEFAULT_FEATURE_MAP_EPS,
    }
    if weights.lora:
        config["lolcats_lora"] = LOLCATS_LORA_DIR
    LolcatsConfig.from_hf(config)  # fail now, on the base config, rather than at load time
    return config


def convert_lolcats(
    src: str | Path,
    dst: str | Path,
    weights_files: list[str | Path],
    *,
    lora_alpha: float | None = None,
    window_size: int = WINDOW_SIZE,
) -> Path:
    """Write `dst`: the base model `src` (weights unchanged) with the release's feature maps, window factors and
    LoRA (merged when the model loads; lora_alpha None: 2 * rank, as in every release) as a lolcats_llama model."""
    src = check_model_dir(src)
    dst = Path(dst).expanduser()
    if dst.resolve() == src.resolve():
        raise ValueError(f"destination {str(dst)!r} is the source directory")
    base_config = read_hf_config(src)
    weights = read_lolcats_weights(list(weights_files), base_config)
    config = lolcats_config(base_config, weights, window_size)
    files = checkpoint_files(src)
    rank = weights.lora_rank
    if lora_alpha is not None and not lora_alpha > 0:
        raise ValueError(f"expected lora_alpha > 0, got {lora_alpha}")
    alpha = lora_alpha if lora_alpha is not None else (2.0 * rank if rank else None)

    from safetensors.torch import save_file

    def write(staging: Path) -> None:
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_base_files(src, staging, files)
        weight_map = {name: str(file.relative_to(src)) for file in files for name in checkpoint_tensor_names([file])}
        tensors = {name: t.detach().contiguous().clone() for name, t in weights.feature_maps.items()}
        save_file(tensors, str(staging / LOLCATS_WEIGHTS_FILE), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, LOLCATS_WEIGHTS_FILE))
        # always an index: without one the loader would read model.safetensors alone
        (staging / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
        if weights.lora:
            lora_dir = staging / LOLCATS_LORA_DIR
            lora_dir.mkdir()
            adapter = {
                f"base_model.model.model.layers.{layer}.self_attn.{proj}.{kind}.weight": t.contiguous().clone()
                for (layer, proj), pair in weights.lora.items()
                for kind, t in pair.items()
            }
            save_file(adapter, str(lora_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
            adapter_config = {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": alpha,
                "target_modules": sorted({proj for _, proj in weights.lora}),
                "lora_dropout": 0.0,
                "bias": "none",
            }
            (lora_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")

    return write_new_dir(dst, write)

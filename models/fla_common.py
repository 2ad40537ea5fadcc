"""What fla's GLA and Gated DeltaNet checkpoints share: config reading, the gated RMSNorm, the conv holder,
and the block / model / causal-LM scaffolding around their attention layers (fla's weight names)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from linrec.models.base import CausalLM, LayerState
from linrec.models.batch import ForwardContext
from linrec.models.layers import GatedMLP


def typed_fields(cls: type, hf_config: dict[str, Any]) -> dict[str, Any]:
    """The fields of dataclass `cls` present in hf_config, checked against their annotations (bool, int,
    float, str, each possibly optional; Any passes through). Unknown keys are ignored."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in hf_config:
            continue
        value, hint = hf_config[field.name], hints[field.name]
        if hint is Any:
            kwargs[field.name] = value
            continue
        allowed = set(typing.get_args(hint)) or {hint}
        if value is None:
            if type(None) not in allowed:
                raise ValueError(f"expected config field {field.name!r} to be set, got null")
        elif bool in allowed:
            if not isinstance(value, bool):
                raise ValueError(f"expected config field {field.name!r} to be true or false, got {value!r}")
        elif int in allowed:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"expected config field {field.name!r} to be an integer, got {value!r}")
        elif float in allowed:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"expected config field {field.name!r} to be a number, got {value!r}")
            value = float(value)
        elif str in allowed and not isinstance(value, str):
            raise ValueError(f"expected config field {field.name!r} to be a string, got {value!r}")
        kwargs[field.name] = value
    return kwargs


def check_no_hybrid_attention(attn: Any, attnres_block_size: int | None) -> None:
    """fla's `attn` (None, or a spec or list of specs naming softmax-attention layers) and attention
    residuals are not served: raise unless neither is in use."""
    if attn is not None:
        specs = [attn] if isinstance(attn, dict) else attn
        if (
            not isinstance(specs, list)
            or not all(isinstance(s, dict) for s in specs)
            or any(s.get("layers") for s in specs)
        ):
            raise ValueError(f"config field 'attn' (hybrid softmax-attention layers) is not supported, got {attn!r}")
    if attnres_block_size is not None:
        raise ValueError(f"config field 'attnres_block_size' is not supported, got {attnres_block_size!r}")


def gated_mlp_size(hidden_size: int, hidden_ratio: float | None, intermediate_size: int | None) -> int:
    """fla's GatedMLP width: intermediate_size, else 2/3 * hidden_ratio * hidden_size rounded up to 256."""
    if intermediate_size is not None:
        return intermediate_size
    ratio = hidden_ratio if hidden_ratio is not None else 4
    return 256 * ((int(hidden_size * ratio * 2 / 3) + 255) // 256)


def depthwise_conv(channels: int, kernel_size: int) -> nn.Conv1d:
    """Holds a depthwise weight [channels, 1, W] under fla's ShortConvolution name; short_conv_varlen applies it."""
    return nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)


class GatedRMSNorm(nn.Module):
    """weight * rmsnorm(x) * act(gate) over the last dim, in fp32: fla's FusedRMSNormGated (normalize, then
    gate). gate=None gives fla's RMSNorm; elementwise_affine=False drops the weight. The product is formed
    in fp32 and cast once, as fla's fused kernels do.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, elementwise_affine: bool = True, activation: str = "swish"):
        super().__init__()
        if activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(f"expected gate activation 'swish', 'silu' or 'sigmoid', got {activation!r}")
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size))
        else:
            self.register_parameter("weight", None)
        self.eps = eps
        self.activation = activation

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        if gate is not None:
            gate = gate.float()
            y = y * (torch.sigmoid(gate) if self.activation == "sigmoid" else F.silu(gate))
        return y.to(x.dtype)


class FlaBlock(nn.Module):
    """fla's block: attn_norm -> attn -> residual, mlp_norm -> GatedMLP -> residual."""

    def __init__(self, config: Any, attn: nn.Module):
        super().__init__()
        self.attn_norm = GatedRMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = attn
        self.mlp_norm = GatedRMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.mlp_size, "swish")

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext, state: LayerState) -> torch.Tensor:
        hidden = hidden + self.attn(self.attn_norm(hidden), ctx, state)
        return hidden + self.mlp(self.mlp_norm(hidden), ctx)


class FlaModel(nn.Module):
    def __init__(self, config: Any, attention_class: type[nn.Module]):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(FlaBlock(config, attention_class(config)) for _ in range(config.num_hidden_layers))
        self.norm = GatedRMSNorm(config.hidden_size, eps=config.norm_eps)


class FlaForCausalLM(CausalLM):
    """fla's *ForCausalLM layout: model.{embeddings, layers.N.{attn_norm, attn.*, mlp_norm, mlp.*}, norm} and
    lm_head. Subclasses name their config and attention layer."""

    attention_class: ClassVar[type[nn.Module]]
    embedding_weight_name = "model.embeddings.weight"

    def __init__(self, config: Any, kernel_backend: str = "torch"):
        super().__init__()
        self.config = config
        self.kernel_backend = kernel_backend  # auto | triton | torch, resolved against the input's device
        self.model = FlaModel(config, self.attention_class)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        with torch.no_grad():
            nn.init.normal_(self.model.embeddings.weight, std=config.initializer_range)
        self.tie_lm_head()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(input_ids)

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden)

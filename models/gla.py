"""flash-linear-attention's GLA (model_type "gla"): the parameter names and math of fla's GLAForCausalLM.

Per layer (pre-norm residual blocks, SwiGLU MLP):
    q, k, v = q_proj x, k_proj x, v_proj x            then, with use_short_conv, causal conv + silu each
    gk = logsigmoid(gk_proj.1(gk_proj.0 x)) / 16       log decay per key channel (clamped below by clamp_min)
    q, k = feature_map(q), feature_map(k)             identity by default
    S_t = diag(exp gk_t) S_{t-1} + k_t^T v_t,  o_t = K^-0.5 q_t S_t        (fla's default scale)
    o = o_proj(rmsnorm(o) * weight * swish(g_proj x))  per head; without use_output_gate, rmsnorm(o) * weight
fla's GLABlock does not pass the config's use_gk / use_gv to the layer (the gate is always per key
channel), nor gate_logit_normalizer / gate_low_rank_dim (always 16): they are read and ignored here too.
With num_kv_heads < num_heads, k, v and gk belong to the KV heads and fla repeats them per query group;
their states are then identical across a group, so we keep one state per KV head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from linrec.kernels.gla import gla_varlen
from linrec.kernels.short_conv import short_conv_varlen
from linrec.models.base import LayerState, StateSpec
from linrec.models.batch import ForwardContext
from linrec.models.fla_common import (
    FlaForCausalLM,
    GatedRMSNorm,
    check_no_hybrid_attention,
    depthwise_conv,
    gated_mlp_size,
    typed_fields,
)
from linrec.models.layers import projection

GATE_LOGIT_NORMALIZER = 16  # fla's GatedLinearAttention defaults, which GLABlock never overrides
GATE_LOW_RANK_DIM = 16

# fla's ACT2FN entries usable as a q/k feature map (bias_gelu needs a bias and cannot be one)
_FEATURE_MAPS = {
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "logsigmoid": F.logsigmoid,
    "silu": F.silu,
    "swish": F.silu,
    "sqrelu": lambda x: F.relu(x).square(),
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class GLAConfig:
    """The fields of fla's GLAConfig that the math reads (same defaults)."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_heads: int = 4
    num_kv_heads: int | None = None
    expand_k: float = 0.5
    expand_v: float = 1.0
    hidden_ratio: float | None = 4
    intermediate_size: int | None = None
    feature_map: str | None = None
    use_short_conv: bool = False
    conv_size: int = 4
    use_output_gate: bool = True
    clamp_min: float | None = None
    hidden_act: str = "swish"
    elementwise_affine: bool | None = True
    norm_eps: float = 1e-6
    fuse_norm: bool = True  # math-neutral, but picks the output norm's name (g_norm_swish_gate or g_norm)
    use_gk: bool = True  # ignored by fla's model, see the module docstring
    use_gv: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attn: Any = None  # fla's hybrid softmax-attention layers: unsupported
    attnres_block_size: int | None = None  # fla's attention residuals: unsupported

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "conv_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        if self.num_kv_heads is not None and self.num_kv_heads < 1:
            raise ValueError(f"expected num_kv_heads >= 1 or null, got {self.num_kv_heads}")
        check_no_hybrid_attention(self.attn, self.attnres_block_size)
        if self.hidden_act != "swish":
            raise ValueError(f"expected hidden_act 'swish' (fla's GLA MLP and output gate), got {self.hidden_act!r}")
        if self.feature_map is not None and self.feature_map not in _FEATURE_MAPS:
            raise ValueError(f"expected feature_map None or one of {sorted(_FEATURE_MAPS)}, got {self.feature_map!r}")
        for name, ratio in (("expand_k", self.expand_k), ("expand_v", self.expand_v)):
            dim = self.hidden_size * ratio
            if ratio <= 0 or not math.isclose(dim, round(dim)):
                raise ValueError(f"expected hidden_size * {name} a positive integer, got {self.hidden_size} * {ratio}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"expected num_heads divisible by num_kv_heads, got {self.num_heads}, {self.kv_heads}")
        for name, dim in (("key", self.key_dim), ("value", self.value_dim)):
            if dim % self.num_heads:
                raise ValueError(f"expected the {name} dim {dim} divisible by num_heads={self.num_heads}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def key_dim(self) -> int:  # H * K
        return round(self.hidden_size * self.expand_k)

    @property
    def value_dim(self) -> int:  # H * V
        return round(self.hidden_size * self.expand_v)

    @property
    def head_k_dim(self) -> int:
        return self.key_dim // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def mlp_size(self) -> int:
        return gated_mlp_size(self.hidden_size, self.hidden_ratio, self.intermediate_size)

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> GLAConfig:
        """Read a config.json dict; absent fields take fla's defaults, unknown ones are ignored."""
        return cls(**typed_fields(cls, hf_config))


class GatedLinearAttention(nn.Module):
    def __init__(self, config: GLAConfig):
        super().__init__()
        c = config
        self.config = c
        self.feature_map = _FEATURE_MAPS[c.feature_map] if c.feature_map is not None else None
        kv_key_dim, kv_value_dim = c.kv_heads * c.head_k_dim, c.kv_heads * c.head_v_dim
        self.q_proj = projection(c.hidden_size, c.key_dim, bias=False)
        self.k_proj = projection(c.hidden_size, kv_key_dim, bias=False)
        self.v_proj = projection(c.hidden_size, kv_value_dim, bias=False)
        if c.use_output_gate:
            self.g_proj = projection(c.hidden_size, c.value_dim, bias=False)
        if c.use_short_conv:
            self.q_conv1d = depthwise_conv(c.key_dim, c.conv_size)
            self.k_conv1d = depthwise_conv(kv_key_dim, c.conv_size)
            self.v_conv1d = depthwise_conv(kv_value_dim, c.conv_size)
        # fla's low-rank gate (an nn.Sequential there): the names gk_proj.0 and gk_proj.1 are the checkpoint's
        self.gk_proj = nn.ModuleList(
            [projection(c.hidden_size, GATE_LOW_RANK_DIM), projection(GATE_LOW_RANK_DIM, kv_key_dim, bias=True)]
        )
        self.o_proj = projection(c.value_dim, c.hidden_size, bias=False)
        norm = GatedRMSNorm(c.head_v_dim, eps=c.norm_eps, elementwise_affine=bool(c.elementwise_affine))
        # fla fuses norm and swish gate in one module, under another name, when fuse_norm and use_output_gate
        self.norm_name = "g_norm_swish_gate" if c.fuse_norm and c.use_output_gate else "g_norm"
        self.add_module(self.norm_name, norm)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, state: LayerState) -> torch.Tensor:
        """x [T, hidden_size] -> [T, hidden_size]; updates the recurrent and conv state rows in place."""
        c = self.config
        batch, backend = ctx.batch, ctx.backend
        T = x.shape[0]
        H, Hk, K, V = c.num_heads, c.kv_heads, c.head_k_dim, c.head_v_dim
        q, k, v = self.q_proj(x, ctx), self.k_proj(x, ctx), self.v_proj(x, ctx)
        if c.use_short_conv:
            q, k, v = (
                short_conv_varlen(y, conv.weight[:, 0, :], conv.bias, state[name], batch, "silu", backend)
                for y, conv, name in (
                    (q, self.q_conv1d, "q_conv"),
                    (k, self.k_conv1d, "k_conv"),
                    (v, self.v_conv1d, "v_conv"),
                )
            )
        # the log decay in fp32: its sum over a long prompt is what the state's memory length rests on
        gk = F.logsigmoid(self.gk_proj[1](self.gk_proj[0](x, ctx), ctx).float()) / GATE_LOGIT_NORMALIZER
        if c.clamp_min is not None:
            gk = gk.clamp_min(c.clamp_min)
        q, k = q.view(T, H, K), k.view(T, Hk, K)
        if self.feature_map is not None:
            q, k = self.feature_map(q), self.feature_map(k)
        o = gla_varlen(q, k, v.view(T, Hk, V), gk.view(T, Hk, K), state["recurrent"], batch, K**-0.5, backend)
        gate = self.g_proj(x, ctx).view(T, H, V) if c.use_output_gate else None
        o = getattr(self, self.norm_name)(o, gate)
        return self.o_proj(o.reshape(T, H * V), ctx)


class GLAForCausalLM(FlaForCausalLM):
    """fla's GLAForCausalLM: model.{embeddings, layers.N.{attn_norm, attn.*, mlp_norm, mlp.*}, norm} and lm_head."""

    model_types: ClassVar[tuple[str, ...]] = ("gla",)
    config_class = GLAConfig
    attention_class = GatedLinearAttention

    @classmethod
    def demo_hf_config(cls) -> dict[str, Any]:
        return {
            "model_type": "gla",
            "architectures": ["GLAForCausalLM"],
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_heads": 4,
            "num_kv_heads": None,
            "expand_k": 0.5,
            "expand_v": 1.0,
            "hidden_ratio": 4,
            "intermediate_size": None,
            "feature_map": None,
            "use_short_conv": True,
            "conv_size": 4,
            "use_output_gate": True,
            "clamp_min": None,
            "hidden_act": "swish",
            "elementwise_affine": True,
            "norm_eps": 1e-6,
            "fuse_norm": True,
            "tie_word_embeddings": True,
        }

    def state_spec(self) -> list[dict[str, StateSpec]]:
        c = self.config
        spec = {"recurrent": StateSpec((c.kv_heads, c.head_k_dim, c.head_v_dim), torch.float32)}
        if c.use_short_conv:
            # The conv states hold the last W-1 projections, values of the weights' dtype: exact in that dtype.
            conv_dtype = self.model.embeddings.weight.dtype
            W = c.conv_size
            spec["q_conv"] = StateSpec((c.key_dim, W - 1), conv_dtype)
            spec["k_conv"] = StateSpec((c.kv_heads * c.head_k_dim, W - 1), conv_dtype)
            spec["v_conv"] = StateSpec((c.kv_heads * c.head_v_dim, W - 1), conv_dtype)
        return [dict(spec) for _ in range(c.num_hidden_layers)]

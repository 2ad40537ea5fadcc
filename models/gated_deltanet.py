"""flash-linear-attention's Gated DeltaNet (model_type "gated_deltanet"): the parameter names and math of
fla's GatedDeltaNetForCausalLM.

Per layer (pre-norm residual blocks, SwiGLU MLP):
    q, k, v = silu(causal_conv(q_proj x)), ...       (without use_short_conv: silu of the projections)
    q, k    = q / sqrt(|q|^2 + 1e-6), k likewise     per head (fla's in-kernel L2 norm)
    beta    = sigmoid(b_proj x)                      (times 2 with allow_neg_eigval)
    g       = -exp(A_log) * softplus(a_proj x + dt_bias)                 log decay per value head
    gated delta rule (kernels/gated_delta) with scale K^-0.5 (fla's default)
    o = o_proj(rmsnorm(o) * weight * act(g_proj x))  per value head; without use_gate, rmsnorm(o) * weight
Grouped value heads: num_v_heads a multiple of num_heads; value head j reads q/k head j // (HV / H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from linrec.kernels.gated_delta import gated_delta_varlen
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

L2_NORM_EPS = 1e-6  # fla's use_qk_l2norm_in_kernel


@dataclass(frozen=True)
class GatedDeltaNetConfig:
    """The fields of fla's GatedDeltaNetConfig that the math reads (same defaults)."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 21
    head_dim: int = 256  # K
    num_heads: int = 6  # H: query/key heads
    num_v_heads: int | None = None  # HV: value heads, a multiple of H (GVA); None means H
    expand_v: float = 2.0  # V = head_dim * expand_v
    use_gate: bool = True
    output_gate_activation: str = "swish"
    use_short_conv: bool = True
    conv_size: int = 4
    allow_neg_eigval: bool = False
    hidden_ratio: float | None = 4
    intermediate_size: int | None = None
    hidden_act: str = "swish"
    norm_eps: float = 1e-6
    fuse_norm: bool = True  # math-neutral here: the block norms keep their names either way
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attn: Any = None  # fla's hybrid softmax-attention layers: unsupported
    attnres_block_size: int | None = None  # fla's attention residuals: unsupported

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "num_heads", "conv_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        check_no_hybrid_attention(self.attn, self.attnres_block_size)
        if self.hidden_act != "swish":
            raise ValueError(f"expected hidden_act 'swish' (fla's SwiGLU MLP), got {self.hidden_act!r}")
        if self.output_gate_activation not in ("swish", "silu", "sigmoid"):
            raise ValueError(
                f"expected output_gate_activation 'swish', 'silu' or 'sigmoid', got {self.output_gate_activation!r}"
            )
        if self.v_heads < 1 or self.v_heads % self.num_heads:
            raise ValueError(f"expected num_v_heads a multiple of num_heads={self.num_heads}, got {self.num_v_heads}")
        head_v = self.head_dim * self.expand_v
        if self.expand_v <= 0 or not math.isclose(head_v, round(head_v), rel_tol=1e-5):
            raise ValueError(f"expected head_dim * expand_v a positive integer, got {self.head_dim} * {self.expand_v}")

    @property
    def v_heads(self) -> int:
        return self.num_v_heads if self.num_v_heads is not None else self.num_heads

    @property
    def head_v_dim(self) -> int:  # V
        return int(self.head_dim * self.expand_v)

    @property
    def key_dim(self) -> int:  # H * K
        return self.num_heads * self.head_dim

    @property
    def value_dim(self) -> int:  # HV * V
        return self.v_heads * self.head_v_dim

    @property
    def mlp_size(self) -> int:
        return gated_mlp_size(self.hidden_size, self.hidden_ratio, self.intermediate_size)

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> GatedDeltaNetConfig:
        """Read a config.json dict; absent fields take fla's defaults, unknown ones are ignored."""
        return cls(**typed_fields(cls, hf_config))


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2_NORM_EPS)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: GatedDeltaNetConfig):
        super().__init__()
        c = config
        self.config = c
        HV = c.v_heads
        self.q_proj = projection(c.hidden_size, c.key_dim, bias=False)
        self.k_proj = projection(c.hidden_size, c.key_dim, bias=False)
        self.v_proj = projection(c.hidden_size, c.value_dim, bias=False)
        self.a_proj = projection(c.hidden_size, HV, bias=False)
        self.b_proj = projection(c.hidden_size, HV, bias=False)
        self.A_log = nn.Parameter(torch.empty(HV))
        self.dt_bias = nn.Parameter(torch.empty(HV))
        if c.use_short_conv:
            self.q_conv1d = depthwise_conv(c.key_dim, c.conv_size)
            self.k_conv1d = depthwise_conv(c.key_dim, c.conv_size)
            self.v_conv1d = depthwise_conv(c.value_dim, c.conv_size)
        if c.use_gate:
            self.g_proj = projection(c.hidden_size, c.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(c.head_v_dim, eps=c.norm_eps, activation=c.output_gate_activation)
        self.o_proj = projection(c.value_dim, c.hidden_size, bias=False)
        self.reset_gate_parameters()

    @torch.no_grad()
    def reset_gate_parameters(self) -> None:
        """fla's initialization: A ~ U(0, 16) (here U(1, 16), away from log 0), dt_bias = softplus^-1 of a
        log-uniform step in [0.001, 0.1]."""
        HV = self.A_log.shape[0]
        device = self.A_log.device
        self.A_log.copy_(torch.empty(HV, device=device).uniform_(1, 16).log())
        log_dt = torch.rand(HV, device=device) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)
        dt = log_dt.exp().clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor, ctx: ForwardContext, state: LayerState) -> torch.Tensor:
        """x [T, hidden_size] -> [T, hidden_size]; updates the recurrent and conv state rows in place."""
        c = self.config
        batch, backend = ctx.batch, ctx.backend
        T = x.shape[0]
        H, HV, K, V = c.num_heads, c.v_heads, c.head_dim, c.head_v_dim
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
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k = _l2_normalize(q.view(T, H, K)), _l2_normalize(k.view(T, H, K))
        beta = torch.sigmoid(self.b_proj(x, ctx).float())
        if c.allow_neg_eigval:
            beta = beta * 2
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x, ctx).float() + self.dt_bias.float())  # [T, HV]
        o = gated_delta_varlen(q, k, v.view(T, HV, V), g, beta, state["recurrent"], batch, K**-0.5, backend)
        gate = self.g_proj(x, ctx).view(T, HV, V) if c.use_gate else None
        return self.o_proj(self.o_norm(o, gate).reshape(T, HV * V), ctx)


class GatedDeltaNetForCausalLM(FlaForCausalLM):
    """fla's GatedDeltaNetForCausalLM: model.{embeddings, layers.N.{attn_norm, attn.*, mlp_norm, mlp.*}, norm}
    and lm_head."""

    model_types: ClassVar[tuple[str, ...]] = ("gated_deltanet",)
    config_class = GatedDeltaNetConfig
    attention_class = GatedDeltaNet

    @classmethod
    def demo_hf_config(cls) -> dict[str, Any]:
        return {
            "model_type": "gated_deltanet",
            "architectures": ["GatedDeltaNetForCausalLM"],
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "head_dim": 16,
            "num_heads": 2,
            "num_v_heads": None,
            "expand_v": 2.0,
            "use_gate": True,
            "use_short_conv": True,
            "conv_size": 4,
            "allow_neg_eigval": False,
            "hidden_ratio": 4,
            "intermediate_size": None,
            "hidden_act": "swish",
            "norm_eps": 1e-6,
            "fuse_norm": True,
            "tie_word_embeddings": True,
        }

    def state_spec(self) -> list[dict[str, StateSpec]]:
        c = self.config
        spec = {"recurrent": StateSpec((c.v_heads, c.head_dim, c.head_v_dim), torch.float32)}
        if c.use_short_conv:
            # The conv states hold the last W-1 projections, values of the weights' dtype: exact in that dtype.
            conv_dtype = self.model.embeddings.weight.dtype
            W = c.conv_size
            spec["q_conv"] = StateSpec((c.key_dim, W - 1), conv_dtype)
            spec["k_conv"] = StateSpec((c.key_dim, W - 1), conv_dtype)
            spec["v_conv"] = StateSpec((c.value_dim, W - 1), conv_dtype)
        return [dict(spec) for _ in range(c.num_hidden_layers)]

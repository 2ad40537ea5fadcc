"""LoLCATs: a Llama 3/3.1 or Mistral checkpoint linearized with Hedgehog feature maps, a 64-key sliding window and
linear attention over every older key (arXiv 2410.10254; docs/lolcats.md).

Per layer, from Llama's projections (the released LoRA merged into q, k, v and o_proj at load):
    q, k, v  = q_proj x, k_proj x, v_proj x; RoPE on q and k
    phi_q    = clamp(cat[softmax(q W_q), softmax(-q W_q)], eps)     per query head: W_q [H, D, F]
    phi_k    = the same with W_k, on k repeated to the query heads (GQA)
    gamma    = sigmoid(window_factors)                               per query head
    o        = (gamma sum_window exp(s - m) v + sum_older (phi_q . phi_k) v)
               / (gamma sum_window exp(s - m) + sum_older phi_q . phi_k),  s = q.k / sqrt(D), m = the window's max
    o_proj(o)
The window is the last 64 keys including the current one; a key that leaves it enters the linear state
S [H, 2F, D] and normaliser z [H, 2F] (kernels/lolcats). phi_k depends on the query head (W_k is per query head),
so the linear state is per query head: unlike Liger's, it cannot be shared across a KV group. The ring keeps the
KV heads' post-RoPE keys and values, as Liger's does.

These are the released sliding-window (`_sw`) semantics, which the released decode computes; the released
`_tk` checkpoints' training forward uses a block "terrace" of 65-128 softmax keys instead. linrec serves the
sliding window for both (prefill and decode then agree); docs/lolcats.md measures the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from linrec.kernels.lolcats import hedgehog_features, lolcats_attn_varlen
from linrec.models.base import LayerState, StateSpec
from linrec.models.batch import ForwardContext
from linrec.models.layers import projection
from linrec.models.liger_gla import LigerGLAConfig, LigerGLAForCausalLM
from linrec.models.rope import apply_rotary

DEFAULT_FEATURE_DIM = 64  # per sign: phi is [2 * 64]
DEFAULT_FEATURE_MAP_EPS = 1e-12
INIT_WINDOW_FACTOR = math.log(0.1 / 0.9)  # gamma = 0.1, the released init (-2.197)
# The base models a LoLCATs checkpoint may sit on: Llama's attention (Mistral's is Llama's without biases).
LOLCATS_BASES = ("llama", "mistral")


@dataclass(frozen=True)
class LolcatsConfig(LigerGLAConfig):
    model_types: ClassVar[tuple[str, ...]] = ("lolcats_llama",)

    feature_dim: int = DEFAULT_FEATURE_DIM  # F: each feature map is [H, D, F]; phi is [2F]
    feature_map_eps: float = DEFAULT_FEATURE_MAP_EPS  # phi's clamp

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feature_dim, bool) or not isinstance(self.feature_dim, int) or self.feature_dim < 1:
            raise ValueError(f"expected feature_dim a positive integer, got {self.feature_dim!r}")
        if not self.feature_map_eps > 0:
            raise ValueError(f"expected feature_map_eps > 0, got {self.feature_map_eps!r}")

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> LolcatsConfig:
        """Parse a lolcats_llama config.json: the base Llama/Mistral fields plus window_size, feature_dim and
        feature_map_eps."""
        base = super().from_hf(hf_config)
        eps = hf_config.get("feature_map_eps", DEFAULT_FEATURE_MAP_EPS)
        return replace(
            base,
            feature_dim=hf_config.get("feature_dim", DEFAULT_FEATURE_DIM),
            feature_map_eps=float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else eps,
        )


class FeatureMapMLP(nn.Module):
    """The learned map of a Hedgehog feature map: `layer` [H, D, F], one [D, F] matrix per query head."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.layer = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))


class HedgehogFeatureMap(nn.Module):
    """phi(x) = clamp(cat[softmax(x W), softmax(-x W)], eps) per head; checkpoint name `<name>.mlp.layer`."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int, eps: float):
        super().__init__()
        self.mlp = FeatureMapMLP(num_heads, head_dim, feature_dim)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H, D] -> phi(x) [T, H, 2F] fp32."""
        return hedgehog_features(x, self.mlp.layer, self.eps)


class LolcatsAttention(nn.Module):
    """Llama's attention projections feeding a sliding window and Hedgehog linear attention, one normaliser."""

    def __init__(self, config: LolcatsConfig):
        super().__init__()
        H, Hk, D, F = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.feature_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hk, D
        self.q_proj = projection(config.hidden_size, H * D, bias=config.qkv_bias)
        self.k_proj = projection(config.hidden_size, Hk * D, bias=config.qkv_bias)
        self.v_proj = projection(config.hidden_size, Hk * D, bias=config.qkv_bias)
        self.o_proj = projection(H * D, config.hidden_size, bias=config.o_bias)
        self.feature_map_q = HedgehogFeatureMap(H, D, F, config.feature_map_eps)
        self.feature_map_k = HedgehogFeatureMap(H, D, F, config.feature_map_eps)
        self.window_factors = nn.Parameter(torch.full((1, H, 1, 1), INIT_WINDOW_FACTOR))  # a logit per query head

    def forward(self, x: torch.Tensor, ctx: ForwardContext, state: LayerState) -> torch.Tensor:
        """x [T, hidden]; ctx.cos, ctx.sin [T, D]. Returns [T, hidden]; updates state rows batch.slot_ids."""
        T = x.shape[0]
        q = apply_rotary(self.q_proj(x, ctx).view(T, self.num_heads, self.head_dim), ctx.cos, ctx.sin)
        k = apply_rotary(self.k_proj(x, ctx).view(T, self.num_kv_heads, self.head_dim), ctx.cos, ctx.sin)
        v = self.v_proj(x, ctx).view(T, self.num_kv_heads, self.head_dim)
        o = lolcats_attn_varlen(
            q,
            self.feature_map_q(q),
            k,
            v,
            self.feature_map_k.mlp.layer,
            torch.sigmoid(self.window_factors.float()).view(self.num_heads),
            state["linear"],
            state["normalizer"],
            state["window_k"],
            state["window_v"],
            ctx.batch,
            scale=1.0 / math.sqrt(self.head_dim),
            eps=self.feature_map_k.eps,
            backend=ctx.backend,
        )
        return self.o_proj(o.to(x.dtype).reshape(T, -1), ctx)


class LolcatsForCausalLM(LigerGLAForCausalLM):
    """LoLCATs over HF Llama checkpoint names plus, per layer, self_attn.feature_map_q.mlp.layer,
    self_attn.feature_map_k.mlp.layer [H, D, F] and self_attn.window_factors [1, H, 1, 1] (the released names)."""

    model_types: ClassVar[tuple[str, ...]] = LolcatsConfig.model_types
    config_class: ClassVar[type[LigerGLAConfig]] = LolcatsConfig
    attention_class: ClassVar[type[nn.Module]] = LolcatsAttention
    config: LolcatsConfig

    def _init_weights(self) -> None:
        super()._init_weights()
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, FeatureMapMLP):
                    nn.init.normal_(module.layer, std=module.layer.shape[1] ** -0.5)
                elif isinstance(module, LolcatsAttention):
                    module.window_factors.fill_(INIT_WINDOW_FACTOR)

    @classmethod
    def demo_hf_config(cls) -> dict[str, Any]:
        # window 16 (the release uses 64) so that short prompts already move keys into the linear state
        return {
            **super().demo_hf_config(),
            "model_type": "lolcats_llama",
            "architectures": ["LolcatsLlamaForCausalLM"],
            "window_size": 16,
            "feature_dim": 8,
            "feature_map_eps": DEFAULT_FEATURE_MAP_EPS,
        }

    def state_spec(self) -> list[dict[str, StateSpec]]:
        c = self.config
        ring_dtype = self.model.embed_tokens.weight.dtype  # keys/values are stored as the model computes them
        layer = {
            "linear": StateSpec((c.num_attention_heads, 2 * c.feature_dim, c.head_dim), torch.float32),
            "normalizer": StateSpec((c.num_attention_heads, 2 * c.feature_dim), torch.float32),
            "window_k": StateSpec((c.window_size, c.num_key_value_heads, c.head_dim), ring_dtype),
            "window_v": StateSpec((c.window_size, c.num_key_value_heads, c.head_dim), ring_dtype),
        }
        return [dict(layer) for _ in range(c.num_hidden_layers)]

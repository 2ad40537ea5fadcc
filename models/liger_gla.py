"""Liger-GLA: a Llama, Qwen2 or Mistral checkpoint served as gated linear attention plus a 64-key window.

The weights are the base model's, unchanged (Liger, arXiv 2503.01496). Per layer, from the attention's
own projections:
    q, k, v = q_proj x, k_proj x, v_proj x            (pre-RoPE; Qwen2 has q/k/v biases)
    g       = logsigmoid(k) / 16                       per KV head, the log decay of the state
    S_t     = diag(exp g_t) S_{t-1} + softmax(k_t)^T v_t,  recurrent_t = softmax(q_t) S_t   (scale 1, fp32)
    window  = softmax attention of RoPE(q) over RoPE(k), v of the last 64 positions incl. the current one
    o_proj(0.5 * window + 0.5 * recurrent)
k, v and g come from the KV heads, so one state [K, V] per KV head serves its whole query group.

Where we differ from the public Liger code on purpose: its decode drops the window branch (the window
then sees only the current token) and its FlashAttention window admits 65 keys; here decode keeps the
64-entry ring so token-by-token decode equals the full forward. Its Llama variant applies RoPE with
rope_theta alone; here rope_scaling (e.g. Llama 3.1's llama3) is honoured as the base model does
(identical for Llama-3-8B, whose config has no rope_scaling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from linrec.kernels.window_attn import liger_attention_varlen, window_attn_varlen
from linrec.models.base import CausalLM, LayerState, StateSpec
from linrec.models.batch import ForwardBatch, ForwardContext
from linrec.models.layers import GatedMLP, RMSNorm, get_activation, projection
from linrec.models.rope import RopeConfig, RotaryEmbedding, apply_rotary

GATE_LOGIT_NORMALIZER = 16.0
DEFAULT_WINDOW_SIZE = 64

# base model_type -> (Liger model_type, architecture name the public Liger code registers)
_LINEARIZED = {
    "llama": ("liger_gla", "LigerGLAForCausalLM"),
    "qwen2": ("liger_qwen2_gla", "LigerQwen2GLAForCausalLM"),
    "mistral": ("liger_mistral_gla", "LigerMistralGLAForCausalLM"),
}


@dataclass(frozen=True)
class LigerGLAConfig:
    # the model_type values this config (and its family's class) serves; a family built on this one names its own
    model_types: ClassVar[tuple[str, ...]] = ("liger_gla", "liger_qwen2_gla", "liger_mistral_gla")

    model_type: str  # liger_gla (Llama) | liger_qwen2_gla | liger_mistral_gla
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int  # H
    num_key_value_heads: int  # Hk: one recurrent state and one window ring per KV head
    head_dim: int  # D = K = V of the recurrent state
    rope: RopeConfig
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Llama attention_bias; always on for Qwen2
    o_bias: bool = False  # Llama attention_bias; never on for Qwen2 and Mistral
    mlp_bias: bool = False
    window_size: int = DEFAULT_WINDOW_SIZE  # keys per query, the current one included
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.model_type not in self.model_types:
            raise ValueError(f"expected model_type in {self.model_types}, got {self.model_type!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "window_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"expected {name} a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                "expected num_attention_heads divisible by num_key_value_heads, got "
                f"{self.num_attention_heads} and {self.num_key_value_heads}"
            )
        if self.rope.head_dim != self.head_dim:
            raise ValueError(f"expected rope head_dim {self.head_dim}, got {self.rope.head_dim}")
        get_activation(self.hidden_act)
        if not self.rms_norm_eps > 0:
            raise ValueError(f"expected rms_norm_eps > 0, got {self.rms_norm_eps}")

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> LigerGLAConfig:
        """Parse a Liger config.json. Fields that do not change the math (architectures, dtype, token ids,
        use_cache, dropout, pretraining_tp, the base model's own sliding_window, ...) are ignored."""
        model_type = hf_config.get("model_type")
        missing = [
            name
            for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if hf_config.get(name) is None
        ]
        if missing:
            raise ValueError(f"config.json of {model_type!r} lacks {', '.join(missing)}")
        num_heads = hf_config["num_attention_heads"]
        head_dim = hf_config.get("head_dim")
        if head_dim is None:
            if hf_config["hidden_size"] % num_heads:
                raise ValueError(
                    f"expected hidden_size divisible by num_attention_heads when head_dim is absent, got "
                    f"{hf_config['hidden_size']} and {num_heads}"
                )
            head_dim = hf_config["hidden_size"] // num_heads
        window_size = hf_config.get("window_size", DEFAULT_WINDOW_SIZE)
        if window_size is None:
            # Some public Liger code reads window_size=None as unbounded attention: that is a KV cache,
            # not a constant-size state.
            raise ValueError("expected window_size a positive integer (Liger uses 64), got None (unbounded window)")
        attention_bias = bool(hf_config.get("attention_bias", False))
        if model_type == "liger_qwen2_gla":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif model_type == "liger_mistral_gla":
            qkv_bias, o_bias, mlp_bias = False, False, False
        else:
            qkv_bias, o_bias, mlp_bias = attention_bias, attention_bias, bool(hf_config.get("mlp_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["hidden_size"],
            intermediate_size=hf_config["intermediate_size"],
            num_hidden_layers=hf_config["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=hf_config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rope=RopeConfig.from_hf_config(hf_config, head_dim),
            hidden_act=hf_config.get("hidden_act", "silu"),
            rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            window_size=window_size,
            initializer_range=float(hf_config.get("initializer_range", 0.02)),
        )


def linearize_hf_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """A Llama/Qwen2/Mistral config.json -> the Liger-GLA config.json of the same weights (no new tensors)."""
    base_type = hf_config.get("model_type")
    if base_type not in _LINEARIZED:
        raise ValueError(
            f"cannot linearize model_type {base_type!r} to Liger-GLA; expected one of {', '.join(sorted(_LINEARIZED))}"
        )
    model_type, architecture = _LINEARIZED[base_type]
    config = {**hf_config, "model_type": model_type, "architectures": [architecture]}
    config.setdefault("window_size", DEFAULT_WINDOW_SIZE)
    LigerGLAConfig.from_hf(config)  # fail now, on the base config, rather than at load time
    return config


class LigerGLAAttention(nn.Module):
    """Llama's attention projections feeding a GLA recurrence and a sliding window, mixed half and half."""

    def __init__(self, config: LigerGLAConfig):
        super().__init__()
        H, Hk, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hk, D
        self.q_proj = projection(config.hidden_size, H * D, bias=config.qkv_bias)
        self.k_proj = projection(config.hidden_size, Hk * D, bias=config.qkv_bias)
        self.v_proj = projection(config.hidden_size, Hk * D, bias=config.qkv_bias)
        self.o_proj = projection(H * D, config.hidden_size, bias=config.o_bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext, state: LayerState) -> torch.Tensor:
        """x [T, hidden]; ctx.cos, ctx.sin [T, D]. Returns [T, hidden]; updates state rows batch.slot_ids."""
        T = x.shape[0]
        cos, sin = ctx.cos, ctx.sin
        q = self.q_proj(x, ctx).view(T, self.num_heads, self.head_dim)
        k = self.k_proj(x, ctx).view(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, ctx).view(T, self.num_kv_heads, self.head_dim)
        phi_q, phi_k, g = self.gla_inputs(q, k)
        # 0.5 * window + 0.5 * recurrent, fp32; one fused kernel at decode on the triton backend
        mixed = liger_attention_varlen(
            apply_rotary(q, cos, sin),
            apply_rotary(k, cos, sin),
            v,
            phi_q,
            phi_k,
            g,
            state["recurrent"],
            state["window_k"],
            state["window_v"],
            ctx.batch,
            window_scale=1.0 / math.sqrt(self.head_dim),
            backend=ctx.backend,
        )
        return self.o_proj(mixed.to(x.dtype).reshape(T, -1), ctx)

    @staticmethod
    def gla_inputs(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-RoPE q [T, H, D], k [T, Hk, D] -> softmax feature maps phi_q, phi_k and the log decay
        g = logsigmoid(k) / 16 [T, Hk, D], all fp32: the recurrent branch's inputs besides v."""
        k32 = k.float()
        return q.float().softmax(dim=-1), k32.softmax(dim=-1), F.logsigmoid(k32) / GATE_LOGIT_NORMALIZER

    def window_branch(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, state: LayerState, backend: str
    ) -> torch.Tensor:
        """RoPE'd q [T, H, D], k [T, Hk, D] and v -> [T, H, D] (rings state["window_k"/"window_v"] [N, W, Hk, D])."""
        scale = 1.0 / math.sqrt(self.head_dim)
        return window_attn_varlen(q, k, v, state["window_k"], state["window_v"], batch, scale, backend=backend)


class LigerGLADecoderLayer(nn.Module):
    """Llama's decoder layer around an attention that takes (x, ctx, state): Liger's, or a family's built on it."""

    def __init__(self, config: LigerGLAConfig, attention_class: type[nn.Module] = LigerGLAAttention):
        super().__init__()
        self.self_attn = attention_class(config)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext, state: LayerState) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), ctx, state)
        return hidden + self.mlp(self.post_attention_layernorm(hidden), ctx)


class LigerGLAModel(nn.Module):
    """The `model.` prefix of the checkpoint: embed_tokens, layers, norm."""

    def __init__(self, config: LigerGLAConfig, attention_class: type[nn.Module] = LigerGLAAttention):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LigerGLADecoderLayer(config, attention_class) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class LigerGLAForCausalLM(CausalLM):
    """Liger-GLA over HF Llama checkpoint names: model.{embed_tokens, layers.N.{self_attn.{q,k,v,o}_proj,
    mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}, norm} and lm_head."""

    model_types: ClassVar[tuple[str, ...]] = LigerGLAConfig.model_types
    config_class: ClassVar[type[LigerGLAConfig]] = LigerGLAConfig
    attention_class: ClassVar[type[nn.Module]] = LigerGLAAttention  # what each decoder layer's self_attn is
    embedding_weight_name = "model.embed_tokens.weight"

    def __init__(self, config: LigerGLAConfig, kernel_backend: str = "torch"):
        super().__init__()
        self.config = config
        self.kernel_backend = kernel_backend  # auto | triton | torch, resolved against the input's device
        self.model = LigerGLAModel(config, self.attention_class)
        self.rotary_emb = RotaryEmbedding(config.rope)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights()
        self.tie_lm_head()

    def _init_weights(self) -> None:
        # Deterministic under torch.manual_seed: modules are visited in registration order.
        std = self.config.initializer_range
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=std)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, RMSNorm):
                    nn.init.ones_(module.weight)

    @classmethod
    def demo_hf_config(cls) -> dict[str, Any]:
        return {
            "model_type": "liger_gla",
            "architectures": ["LigerGLAForCausalLM"],
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "window_size": DEFAULT_WINDOW_SIZE,
            "initializer_range": 0.02,
        }

    def state_spec(self) -> list[dict[str, StateSpec]]:
        c = self.config
        ring_dtype = self.model.embed_tokens.weight.dtype  # keys/values are stored as the model computes them
        layer = {
            "recurrent": StateSpec((c.num_key_value_heads, c.head_dim, c.head_dim), torch.float32),
            "window_k": StateSpec((c.window_size, c.num_key_value_heads, c.head_dim), ring_dtype),
            "window_v": StateSpec((c.window_size, c.num_key_value_heads, c.head_dim), ring_dtype),
        }
        return [dict(layer) for _ in range(c.num_hidden_layers)]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden)

    def forward_context(self, batch: ForwardBatch, backend: str) -> ForwardContext:
        cos, sin = self.rotary_emb(batch.positions)  # [T, D], shared by every layer's RoPE
        return ForwardContext(batch, backend, cos=cos, sin=sin)

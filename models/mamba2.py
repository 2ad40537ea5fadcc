"""Mamba2 in transformers' checkpoint format (model_type "mamba2"): the same parameter names and math as
transformers' Mamba2ForCausalLM, over the flat varlen batch with per-slot states.

Per layer: x = RMSNorm(h); in_proj(x) splits into the gate z [I], xBC [I + 2 G N] and dt [H];
xBC goes through a causal depthwise conv1d + silu and splits into x [H, P], B [G, N], C [G, N];
dt = clamp(softplus(dt + dt_bias), time_step_limit); the SSD recurrence (kernels/ssd) gives y;
out = out_proj(RMSNormGated(y * silu(z)), normalized per group of I / G channels); h = h + out, the
residual stream kept in fp32 when residual_in_fp32.

Differences from transformers, all deliberate:
- transformers clamps dt to time_step_limit in its chunked (prefill) path but not in its one-token
  path; we clamp everywhere so that decode continues exactly what prefill computed. With the default
  limit (0, inf) the two agree.
- dt and the recurrence are computed in fp32 whatever the model dtype.
- mamba_ssm checkpoints whose in_proj is wider (an extra gated-MLP part, d_mlp > 0) cannot be described by
  transformers' Mamba2Config either; load_weights rejects their in_proj shape with a clear error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from linrec.kernels.short_conv import short_conv_varlen
from linrec.kernels.ssd import ssd_varlen
from linrec.models.base import CausalLM, LayerState, StateSpec
from linrec.models.batch import ForwardContext
from linrec.models.layers import RMSNorm, projection


@dataclass(frozen=True)
class Mamba2Config:
    """The fields of transformers' Mamba2Config that the math or the initialization reads (same defaults)."""

    vocab_size: int = 32768
    hidden_size: int = 4096
    num_hidden_layers: int = 64
    num_heads: int = 128  # H
    head_dim: int = 64  # P; num_heads * head_dim == expand * hidden_size
    state_size: int = 128  # N
    expand: int = 2
    n_groups: int = 8  # G: heads in a group share B and C
    conv_kernel: int = 4  # W
    use_bias: bool = False  # in_proj and out_proj
    use_conv_bias: bool = True
    hidden_act: str = "silu"  # the conv's activation; transformers' kernels support only silu
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    time_step_min: float = 0.001  # dt_bias initialization only
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    initializer_range: float = 0.1  # embedding initialization only
    tie_word_embeddings: bool = False
    chunk_size: int = 256  # transformers' prefill chunk; recorded only, our kernels choose their own

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "state_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        if self.expand * self.hidden_size != self.num_heads * self.head_dim:
            raise ValueError(
                f"expected expand * hidden_size == num_heads * head_dim, got {self.expand} * {self.hidden_size}"
                f" != {self.num_heads} * {self.head_dim}"
            )
        if self.n_groups < 1 or self.num_heads % self.n_groups:
            raise ValueError(f"expected n_groups >= 1 dividing num_heads={self.num_heads}, got {self.n_groups}")
        if self.conv_kernel < 1:
            raise ValueError(f"expected conv_kernel >= 1, got {self.conv_kernel}")
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"expected hidden_act 'silu' (Mamba2's conv activation), got {self.hidden_act!r}")
        lo, hi = self.time_step_limit
        if not 0.0 <= lo <= hi:
            raise ValueError(f"expected time_step_limit (lo, hi) with 0 <= lo <= hi, got {self.time_step_limit}")

    @property
    def intermediate_size(self) -> int:  # I = H * P
        return self.expand * self.hidden_size

    @property
    def conv_dim(self) -> int:  # channels of xBC
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> Mamba2Config:
        """Read a config.json dict; absent fields take transformers' defaults, unknown ones are ignored."""
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in hf_config or hf_config[field.name] is None:
                continue
            value = hf_config[field.name]
            default = field.default
            if field.name == "time_step_limit":
                # Non-finite bounds arrive as floats whichever way transformers spelled them: the config.json
                # reader (loader.read_json_object) decodes both 4.x's bare Infinity and 5.x's {"__float__": ...}.
                if (
                    not isinstance(value, (list, tuple))
                    or len(value) != 2
                    or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)
                ):
                    raise ValueError(f"expected time_step_limit as [lo, hi] numbers, got {value!r}")
                value = (float(value[0]), float(value[1]))
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"expected {field.name} to be true or false, got {value!r}")
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"expected {field.name} to be an integer, got {value!r}")
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"expected {field.name} to be a number, got {value!r}")
                value = float(value)
            elif isinstance(default, str) and not isinstance(value, str):
                raise ValueError(f"expected {field.name} to be a string, got {value!r}")
            kwargs[field.name] = value
        return cls(**kwargs)


class RMSNormGated(nn.Module):
    """weight * groupwise_rmsnorm(y * silu(z)): the gate is applied before the norm, each group of
    `group_size` channels normalized on its own (so that a group's output does not depend on others)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        gated = y.float() * F.silu(z.float())
        groups = gated.unflatten(-1, (-1, self.group_size))  # [T, G, I/G]
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * groups.flatten(-2).to(dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.config = config
        I, H = config.intermediate_size, config.num_heads  # noqa: E741
        self.in_proj = projection(config.hidden_size, I + config.conv_dim + H, bias=config.use_bias)
        # Holds the depthwise weight [conv_dim, 1, W] under the checkpoint's name; short_conv_varlen applies it.
        self.conv1d = nn.Conv1d(
            config.conv_dim, config.conv_dim, config.conv_kernel, groups=config.conv_dim, bias=config.use_conv_bias
        )
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))  # A = -exp(A_log) < 0
        self.D = nn.Parameter(torch.empty(H))
        self.norm = RMSNormGated(I, I // config.n_groups, config.layer_norm_epsilon)
        self.out_proj = projection(I, config.hidden_size, bias=config.use_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """A = -(1..H), D = 1, and dt_bias = softplus^-1 of a log-uniform step in [time_step_min, time_step_max]."""
        c = self.config
        H = c.num_heads
        device = self.A_log.device
        self.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32, device=device)))
        self.D.fill_(1.0)
        log_dt = torch.rand(H, device=device) * (math.log(c.time_step_max) - math.log(c.time_step_min))
        dt = torch.exp(log_dt + math.log(c.time_step_min)).clamp(min=c.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext, state: LayerState) -> torch.Tensor:
        """hidden [T, hidden_size] -> [T, hidden_size]; updates state["conv"] and state["ssm"] rows in place."""
        c = self.config
        batch, backend = ctx.batch, ctx.backend
        T = hidden.shape[0]
        H, P, G, N = c.num_heads, c.head_dim, c.n_groups, c.state_size
        I = c.intermediate_size  # noqa: E741
        z, xBC, dt = self.in_proj(hidden, ctx).split([I, c.conv_dim, H], dim=-1)
        xBC = short_conv_varlen(
            xBC, self.conv1d.weight[:, 0, :], self.conv1d.bias, state["conv"], batch, activation="silu", backend=backend
        )
        x, B, C = xBC.split([I, G * N, G * N], dim=-1)
        lo, hi = c.time_step_limit
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(min=lo, max=hi)  # [T, H]
        A = -torch.exp(self.A_log.float())
        y = ssd_varlen(
            x.reshape(T, H, P),
            dt,
            A,
            B.reshape(T, G, N),
            C.reshape(T, G, N),
            self.D.float(),
            state["ssm"],
            batch,
            backend=backend,
        )
        return self.out_proj(self.norm(y.reshape(T, I), z), ctx)


class Mamba2Block(nn.Module):
    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = Mamba2Mixer(config)

    def forward(self, hidden: torch.Tensor, ctx: ForwardContext, state: LayerState) -> torch.Tensor:
        # The residual stream may be fp32 (residual_in_fp32); the mixer runs in the weights' dtype.
        mixed = self.mixer(self.norm(hidden.to(self.norm.weight.dtype)), ctx, state)
        residual = hidden.float() if self.residual_in_fp32 else hidden
        return residual + mixed


class Mamba2Backbone(nn.Module):
    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Mamba2Block(config) for _ in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class Mamba2ForCausalLM(CausalLM):
    """transformers' Mamba2ForCausalLM: backbone.{embeddings, layers.N.{norm, mixer.*}, norm_f} and lm_head."""

    model_types: ClassVar[tuple[str, ...]] = ("mamba2",)
    config_class = Mamba2Config
    embedding_weight_name = "backbone.embeddings.weight"

    def __init__(self, config: Mamba2Config, kernel_backend: str = "torch"):
        super().__init__()
        self.config = config
        self.kernel_backend = kernel_backend  # auto | triton | torch, resolved against the input's device
        self.backbone = Mamba2Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        with torch.no_grad():
            nn.init.normal_(self.backbone.embeddings.weight, std=config.initializer_range)
        self.tie_lm_head()

    @classmethod
    def demo_hf_config(cls) -> dict[str, Any]:
        return {
            "model_type": "mamba2",
            "architectures": ["Mamba2ForCausalLM"],
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_heads": 8,
            "head_dim": 16,
            "expand": 2,
            "state_size": 16,
            "n_groups": 2,
            "conv_kernel": 4,
            "chunk_size": 16,
            "use_bias": False,
            "use_conv_bias": True,
            "hidden_act": "silu",
            "layer_norm_epsilon": 1e-5,
            "residual_in_fp32": True,
            "tie_word_embeddings": True,
        }

    def state_spec(self) -> list[dict[str, StateSpec]]:
        c = self.config
        # The conv state holds the last W-1 raw in_proj outputs, which are values of the weights' dtype:
        # keeping them in that dtype is exact and half the bytes of fp32 (the conv itself sums in fp32).
        conv_dtype = self.backbone.embeddings.weight.dtype
        return [
            {
                "ssm": StateSpec((c.num_heads, c.head_dim, c.state_size), torch.float32),
                "conv": StateSpec((c.conv_dim, c.conv_kernel - 1), conv_dtype),
            }
            for _ in range(c.num_hidden_layers)
        ]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embeddings(input_ids)

    def decoder_layers(self) -> nn.ModuleList:
        return self.backbone.layers

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.backbone.norm_f(hidden)

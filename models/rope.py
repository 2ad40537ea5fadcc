"""Rotary position embeddings from a config.json, applied by absolute position (HF Llama's rotate-half form).

Both spellings of the settings are read: the classic `rope_theta` + `rope_scaling` fields and
transformers 5's `rope_parameters` dict. Supported rope types: default, linear, dynamic (NTK), llama3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
DEFAULT_THETA = 10000.0


@dataclass(frozen=True)
class RopeConfig:
    head_dim: int  # rotated dimension (the whole head)
    theta: float = DEFAULT_THETA
    rope_type: str = "default"
    factor: float = 1.0  # linear, dynamic, llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3
    max_position_embeddings: int = 2048  # dynamic: the length beyond which the base grows

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; expected one of {', '.join(ROPE_TYPES)}")
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"expected an even rotary head_dim >= 2, got {self.head_dim}")
        if not self.theta > 0:
            raise ValueError(f"expected rope_theta > 0, got {self.theta}")
        if not self.factor > 0:
            raise ValueError(f"expected rope factor > 0, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                "expected llama3 rope high_freq_factor > low_freq_factor > 0, got "
                f"high_freq_factor={self.high_freq_factor}, low_freq_factor={self.low_freq_factor}"
            )

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any], head_dim: int) -> RopeConfig:
        """Read rope settings from a config.json dict (either spelling); ValueError on what we do not support."""
        params = hf_config.get("rope_parameters")
        if params is None:
            params = hf_config.get("rope_scaling")
        params = dict(params or {})
        if any(isinstance(value, dict) for value in params.values()):
            raise ValueError(f"expected one rope_parameters dict for all layers, got per-layer-type {sorted(params)}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", hf_config.get("rope_theta"))
        partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"expected partial_rotary_factor 1.0 (rotate the whole head), got {partial}")
        attention_factor = params.get("attention_factor")
        if attention_factor not in (None, 1, 1.0):
            raise ValueError(f"expected no rope attention_factor for rope_type {rope_type!r}, got {attention_factor}")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {rope_type!r}; expected one of {', '.join(ROPE_TYPES)}")
        max_pos = int(hf_config.get("max_position_embeddings") or 2048)
        fields: dict[str, Any] = {
            "head_dim": head_dim,
            "theta": float(theta if theta is not None else DEFAULT_THETA),
            "rope_type": rope_type,
            "max_position_embeddings": max_pos,
        }
        if rope_type != "default":
            if "factor" not in params:
                raise ValueError(f"rope_type {rope_type!r} needs a 'factor', got fields {sorted(params)}")
            fields["factor"] = float(params["factor"])
        if rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor"):
                if key not in params:
                    raise ValueError(f"rope_type 'llama3' needs {key!r}, got fields {sorted(params)}")
                fields[key] = float(params[key])
            fields["original_max_position_embeddings"] = int(params.get("original_max_position_embeddings") or max_pos)
        return cls(**fields)


def _base_inv_freq(theta: float, dim: int, device: torch.device | str | None) -> torch.Tensor:
    # Computed as transformers does (int64 arange -> fp32, pow in fp32) so the frequencies agree bit for bit.
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def inv_freq(config: RopeConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """[D/2] fp32 inverse frequencies of the static rope types (dynamic returns its unscaled ones)."""
    base = _base_inv_freq(config.theta, config.head_dim, device)
    if config.rope_type == "linear":
        return base / config.factor
    if config.rope_type == "llama3":
        # Llama 3.1: wavelengths above original/low_freq_factor are stretched by `factor`, those below
        # original/high_freq_factor kept, and the band between blended linearly in original/wavelength.
        low_freq_wavelen = config.original_max_position_embeddings / config.low_freq_factor
        high_freq_wavelen = config.original_max_position_embeddings / config.high_freq_factor
        wavelen = 2 * math.pi / base
        scaled = torch.where(wavelen > low_freq_wavelen, base / config.factor, base)
        smooth = (config.original_max_position_embeddings / wavelen - config.low_freq_factor) / (
            config.high_freq_factor - config.low_freq_factor
        )
        blended = (1 - smooth) * scaled / config.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, blended, scaled)
    return base


class RotaryEmbedding(nn.Module):
    """positions [T] -> cos, sin [T, D] fp32; apply with `apply_rotary`.

    Frequencies are computed in fp32 at each call (D/2 values), never stored as a buffer, so casting the
    model to bf16 cannot round them.
    """

    def __init__(self, config: RopeConfig):
        super().__init__()
        self.config = config

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        pos = positions.float()
        if config.rope_type == "dynamic":
            # Dynamic NTK grows the base once the sequence passes max_position_embeddings. transformers
            # grows it for the whole forward from the longest position in it; here each token uses its own
            # length (position + 1), so a chunked prefill and decode reproduce one full pass. Both agree
            # wherever positions stay below max_position_embeddings, where the base is unchanged.
            dim, max_pos = config.head_dim, config.max_position_embeddings
            seq_len = torch.clamp(pos + 1, min=max_pos)
            grown = config.theta * ((config.factor * seq_len / max_pos) - (config.factor - 1)) ** (dim / (dim - 2))
            theta = torch.where(pos + 1 > max_pos, grown, torch.full_like(pos, config.theta))  # [T]
            exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=pos.device).float() / dim
            freqs = pos[:, None] * (1.0 / theta[:, None] ** exponents[None, :])  # [T, D/2]
        else:
            freqs = pos[:, None] * inv_freq(config, pos.device)[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos, sin [T, D]. Computed in x's dtype, as HF Llama does."""
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    return x * cos + rotate_half(x) * sin

"""Building blocks shared by several families: the projection every linear layer is built as, norms and the
gated MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linrec.kernels.lora import lora_add_
from linrec.kernels.sparse import sparse_add_
from linrec.models.batch import ForwardContext

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def get_activation(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"expected hidden_act in {sorted(_ACTIVATIONS)}, got {name!r}") from None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as Llama's is."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class Projection(nn.Linear):
    """A linear layer of a decoder layer (every one but lm_head): nn.Linear's parameters under nn.Linear's
    names, and a forward that sees the step's ForwardContext, so that per-request add-ons (LoRA, and sparse
    adapters in a step that mixes weights) land here once for every projection of every family, the recurrent
    ones included."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        # The device adapter slots of this projection (plain tensors, not parameters: no checkpoint has them):
        # lora_a [S, R, in], lora_b [S, out, R] with the adapter's scaling folded in; None while LoRA is off.
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None

    def enable_lora(self, num_slots: int, max_rank: int) -> None:
        """Allocate `num_slots` zeroed adapter slots of rank up to `max_rank` beside the weight."""
        w = self.weight
        self.lora_a = torch.zeros(num_slots, max_rank, self.in_features, dtype=w.dtype, device=w.device)
        self.lora_b = torch.zeros(num_slots, self.out_features, max_rank, dtype=w.dtype, device=w.device)

    @torch.no_grad()
    def set_lora_slot(self, slot: int, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None) -> None:
        """Write one adapter's A [r, in] and scaled B [out, r] into `slot` (zeros beyond rank r); None clears
        the slot (an adapter that leaves this projection alone)."""
        if self.lora_a is None or self.lora_b is None:
            raise ValueError("expected LoRA enabled on this projection before writing an adapter slot")
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if lora_a is None or lora_b is None:
            return
        rank = lora_a.shape[0]
        self.lora_a[slot, :rank].copy_(lora_a)
        self.lora_b[slot, :, :rank].copy_(lora_b)

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        """x [T, in_features] -> [T, out_features]; ctx None (a caller outside the engine) is the base layer.
        Tokens with an adapter get its term added; the others' rows are the base output bit for bit."""
        y = F.linear(x, self.weight, self.bias)
        if ctx is not None and ctx.batch.lora is not None and self.lora_a is not None:
            lora_add_(y, x, self.lora_a, self.lora_b, ctx.batch.lora, ctx.backend)
        if ctx is not None and ctx.batch.sparse is not None:
            sparse_add_(y, x, self, ctx.batch.sparse)
        return y


def projection(in_features: int, out_features: int, bias: bool = False) -> Projection:
    """The one factory every family builds its projections with."""
    return Projection(in_features, out_features, bias=bias)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the SwiGLU MLP of Llama, Qwen2, Mistral, GLA and Gated DeltaNet."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = projection(hidden_size, intermediate_size, bias=bias)
        self.up_proj = projection(hidden_size, intermediate_size, bias=bias)
        self.down_proj = projection(intermediate_size, hidden_size, bias=bias)
        self.act = get_activation(hidden_act)

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x, ctx)) * self.up_proj(x, ctx), ctx)

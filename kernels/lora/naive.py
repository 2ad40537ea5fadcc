"""LoRA add-on of a projection: the fp32 token-by-token reference.

delta[t] = B[s] (A[s] x[t]) for the token's adapter slot s = token_slots[t]; zeros where s == -1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def naive_lora_delta(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor | Sequence[int],
) -> torch.Tensor:
    """x [T, in]; lora_a [S, R, in]; lora_b [S, out, R]; token_slots [T] (-1: no adapter).
    Returns delta [T, out] fp32, to be added to the base projection's output.
    """
    slots = token_slots.tolist() if isinstance(token_slots, torch.Tensor) else list(token_slots)
    delta = x.new_zeros(x.shape[0], lora_b.shape[1], dtype=torch.float32)
    for t, s in enumerate(slots):
        if s >= 0:
            delta[t] = lora_b[s].float() @ (lora_a[s].float() @ x[t].float())
    return delta

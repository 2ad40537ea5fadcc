"""A differentiable, batched forward of linrec's Liger-GLA model, for fine-tuning it (LoRA on q/k/v).

linrec's own forward (models/liger_gla.py) serves requests over a state pool: a flat varlen token axis, one
state row per sequence, states and window rings updated in place. Autograd does go through it on the torch
backend from a fresh zero state (tests/recipes/test_liger_forward.py checks its gradients against this
forward's), but it walks the batch one sequence at a time in Python. Training only ever needs B sequences
of the same length T, each starting at position 0 from a zero state, so this forward runs the batch as
tensors instead: the window branch as one masked softmax attention over the 64-key band, the recurrent
branch as linrec's chunked GLA (kernels/gla/prefill.py) with the batch folded into the head axis. It calls
the model's own modules (embeddings, norms, MLPs and the q/k/v/o nn.Linear layers), so a PEFT LoRA that
wraps those layers trains here and is served by linrec unchanged; and it reproduces linrec's inference
logits at every position (test_training_forward_equals_linrec_forward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from linrec.kernels.gla.prefill import chunk_gla
from linrec.models.liger_gla import LigerGLAAttention, LigerGLAForCausalLM
from linrec.models.rope import apply_rotary


def liger_training_forward(model: LigerGLAForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [B, T], every row a sequence from position 0 and a zero state -> logits [B, T, vocab] fp32.

    The same function as linrec's forward + compute_logits over ForwardBatch.build([T] * B), written as
    batched tensor ops that autograd differentiates.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"expected input_ids [B, T], got shape {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    config = model.config
    positions = torch.arange(T, device=input_ids.device)
    cos, sin = model.rotary_emb(positions)  # [T, D]
    offset = positions[:, None] - positions[None, :]  # query - key
    band = (offset >= 0) & (offset < config.window_size)  # [T, T]: the window's keys, the current one included
    hidden = model.model.embed_tokens(input_ids)
    for layer in model.model.layers:
        mixed = _liger_attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin, band)
        hidden = hidden + mixed
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.compute_logits(model.model.norm(hidden))


def _liger_attention(
    attn: LigerGLAAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, band: torch.Tensor
) -> torch.Tensor:
    """x [B, T, hidden] -> o_proj(0.5 * window + 0.5 * recurrent) [B, T, hidden]."""
    B, T, _ = x.shape
    H, Hk, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    group = H // Hk
    q = attn.q_proj(x).view(B, T, H, D)
    k = attn.k_proj(x).view(B, T, Hk, D)
    v = attn.v_proj(x).view(B, T, Hk, D)
    phi_q, phi_k, g = attn.gla_inputs(q, k)  # fp32, pre-RoPE

    # Window branch: softmax over the band in fp32 on RoPE'd q, k; query head h reads KV head h // group.
    q_rope = apply_rotary(q, cos, sin)
    k_rope = apply_rotary(k, cos, sin)
    window = F.scaled_dot_product_attention(
        q_rope.float().transpose(1, 2),  # [B, H, T, D]
        k_rope.float().transpose(1, 2).repeat_interleave(group, dim=1),
        v.float().transpose(1, 2).repeat_interleave(group, dim=1),
        attn_mask=band,
        scale=1.0 / math.sqrt(D),
    ).transpose(1, 2)  # [B, T, H, D]
    window = window.to(q.dtype).float()  # linrec's window op returns q's dtype

    # Recurrent branch: fold B into the heads. Query head b * H + h then reads state b * Hk + h // group,
    # which is sequence b's state of KV head h // group, exactly chunk_gla's grouping.
    def fold(t: torch.Tensor) -> torch.Tensor:  # [B, T, n, D] -> [T, B * n, D]
        return t.transpose(0, 1).reshape(T, B * t.shape[2], D)

    recurrent, _ = chunk_gla(fold(phi_q), fold(phi_k), fold(v.float()), fold(g), scale=1.0)
    recurrent = recurrent.view(T, B, H, D).transpose(0, 1)
    mixed = 0.5 * window + 0.5 * recurrent
    return attn.o_proj(mixed.to(x.dtype).reshape(B, T, H * D))

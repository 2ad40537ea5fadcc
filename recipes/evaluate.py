"""Held-out perplexity and greedy samples: transformers' forward for the Llama, linrec's for Liger-GLA.

Every model is scored on the same held-out segments (the held-out documents' tokens, <|bos|> before and
<|eos|> after each document, cut into pieces of the training length, each read from a fresh state), every
position but each segment's first predicted from all before it. linrec's models are run the way the
engine runs a prefill: one varlen ForwardBatch over several segments, a zeroed state pool, compute_logits
over every hidden state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from linrec.models.base import CausalLM
from linrec.models.batch import ForwardBatch


@dataclass(frozen=True)
class Perplexity:
    num_tokens: int  # positions scored
    nll: float  # mean negative log-likelihood per token, nats

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def segments_of(token_ids: list[list[int]], seq_len: int) -> list[list[int]]:
    """Each document's ids cut into consecutive pieces of at most seq_len (pieces under 2 tokens dropped)."""
    out = []
    for ids in token_ids:
        for lo in range(0, len(ids), seq_len):
            piece = ids[lo : lo + seq_len]
            if len(piece) >= 2:
                out.append(piece)
    return out


@torch.no_grad()
def hf_perplexity(model, segments: list[list[int]], batch_size: int, pad_id: int) -> Perplexity:
    """A transformers causal LM over right-padded batches (padding follows every real token, so a causal
    model never attends to it; its positions are not scored)."""
    total, count = 0.0, 0
    for lo in range(0, len(segments), batch_size):
        batch = segments[lo : lo + batch_size]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.int64)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, s in enumerate(batch):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = True
        logits = model(input_ids=ids).logits.float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        scored = mask[:, 1:].flatten()
        total += nll[scored].sum().item()
        count += int(scored.sum())
    return Perplexity(count, total / count)


@torch.no_grad()
def linrec_perplexity(model: CausalLM, segments: list[list[int]], batch_size: int) -> Perplexity:
    """A linrec model over varlen batches of whole segments, each from a zeroed state slot."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for lo in range(0, len(segments), batch_size):
        batch = segments[lo : lo + batch_size]
        flat = torch.tensor([t for s in batch for t in s], dtype=torch.int64, device=device)
        layout = ForwardBatch.build([len(s) for s in batch], device=device)
        state = model.allocate_state(len(batch) + 1, device)
        logits = model.compute_logits(model(flat, layout, state))  # [N, vocab] fp32
        offset = 0
        for s in batch:
            n = len(s)
            nll = F.cross_entropy(logits[offset : offset + n - 1], flat[offset + 1 : offset + n], reduction="sum")
            total += nll.item()
            count += n - 1
            offset += n
    return Perplexity(count, total / count)


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """transformers' greedy generate; returns the new tokens (up to and excluding eos)."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )[0, len(prompt_ids) :].tolist()
    return out[: out.index(eos_id)] if eos_id in out else out


def linrec_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int, merge_lora=None) -> list[list[int]]:
    """Greedy continuations through linrec's engine (the path `linrec serve` takes): LLM + temperature 0."""
    from linrec.engine.llm import LLM
    from linrec.engine.sampling_params import SamplingParams

    kwargs = {"merge_lora": str(merge_lora)} if merge_lora is not None else {}
    llm = LLM(
        str(model_dir),
        dtype="auto",
        kernel_backend="torch",
        max_num_seqs=8,
        max_num_batched_tokens=2048,
        state_memory=256 << 20,
        enable_prefix_caching=False,
        **kwargs,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    outputs = llm.generate(prompts, params)
    return [list(o.outputs[0].token_ids) for o in outputs]

"""Sampler: turns one step's logits [B, V] into next tokens, row by row under each request's SamplingParams.

Order per row (vLLM V1's; the warpers as HF's): logit_bias, the min_tokens mask, penalties, then
temperature (0 = greedy), top_k, top_p, min_p, then one draw. The draw is the exponential race
argmax(p / q), q ~ Exp(1) i.i.d.: it picks token i with probability p_i, needs no cumulative sum, and
lets a seeded row draw its q from its own generator, so its token depends only on its own logits and
seed, never on the other rows of the batch. (One float caveat: top_p runs on a top-k window or on a full
sort depending on the batch, and the two cumulative sums can round differently for a token lying
exactly on the nucleus boundary.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from linrec.engine.sampling_params import SamplingParams

# Temperatures below this are greedy (vLLM's threshold): dividing by them only amplifies rounding noise.
_GREEDY_EPS = 1e-5
_MASK_64 = (1 << 64) - 1


def derive_seed(seed: int, child_index: int = 0) -> int:
    """The seed of sample `child_index` of a request seeded with `seed`, as an unsigned 64-bit int.

    Child 0 keeps the request's seed (n=1 and the first of n samples agree); child i > 0 gets a
    splitmix64 mix of (seed, i), so children differ from each other and from requests seeded seed+i.
    """
    if child_index < 0:
        raise ValueError(f"expected child_index >= 0, got {child_index}")
    x = int(seed) & _MASK_64
    if child_index == 0:
        return x
    x = (x + child_index * 0x9E3779B97F4A7C15) & _MASK_64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return x ^ (x >> 31)


def make_generator(seed: int, device: torch.device | str = "cpu", child_index: int = 0) -> torch.Generator:
    """A request's own generator on `device` (the logits' device), seeded from (seed, child_index)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, child_index))
    return generator


class SamplingRow(NamedTuple):
    """What the sampler needs of one row; the runner builds one per scheduled request."""

    params: SamplingParams
    # For the repetition penalty (it covers the prompt). Read only for rows with one; a cached CPU int64
    # tensor saves the list conversion (~50 ms per 512k tokens) every step.
    prompt_token_ids: Sequence[int] | torch.Tensor
    output_token_ids: Sequence[int] | torch.Tensor  # generated so far: penalties and the min_tokens count
    generator: torch.Generator | None  # the request's own generator when it has a seed


@dataclass
class SamplingMetadata:
    """One step's sampling parameters as tensors on the logits' device; built once per step by `build`.

    Optional fields are None when no row of the batch uses that feature, so such a step skips the work.
    B rows; P rows with a penalty; N logit_bias entries; M masked (row, token) pairs.
    """

    vocab_size: int  # V, the logits' last dimension
    temperature: torch.Tensor  # [B] fp32; 1.0 on greedy rows so that dividing by it is harmless
    is_greedy: torch.Tensor  # [B] bool; temperature < 1e-5 (0 in practice)
    all_greedy: bool  # every row is greedy: argmax only, no softmax, no draw
    top_k: torch.Tensor | None  # [B] int64 in [1, V]; V where a sampled row keeps all tokens, 1 on greedy rows
    max_top_k: int  # largest top_k below V of a sampled row (0: none), so top-k needs no device sync
    is_top_k_everywhere: bool  # every sampled row has a top_k: the filters work on a [B, max_top_k] window
    top_p: torch.Tensor | None  # [B] fp32 in (0, 1]; 1.0 where a row keeps all tokens
    min_p: torch.Tensor | None  # [B] fp32; 0.0 where a row keeps all tokens
    penalty_rows: torch.Tensor | None  # [P] int64, the rows with any penalty; the next five fields follow it
    presence_penalty: torch.Tensor | None  # [P] fp32, subtracted once from each generated token's logit
    frequency_penalty: torch.Tensor | None  # [P] fp32, subtracted per occurrence in the generated tokens
    repetition_penalty: torch.Tensor | None  # [P] fp32, divides positive / multiplies negative seen logits
    output_token_counts: torch.Tensor | None  # [P, V] fp32, occurrences of each token in the output so far
    seen_token_mask: torch.Tensor | None  # [P, V] bool, token in prompt or output; None if no repetition penalty
    logit_bias_rows: torch.Tensor | None  # [N] int64
    logit_bias_token_ids: torch.Tensor | None  # [N] int64
    logit_bias_values: torch.Tensor | None  # [N] fp32, added to logits[row, token]
    min_tokens_rows: torch.Tensor | None  # [M] int64, rows with fewer than min_tokens generated tokens
    min_tokens_token_ids: torch.Tensor | None  # [M] int64, their stop tokens (EOS unless ignore_eos), set to -inf
    generators: tuple[torch.Generator | None, ...]  # [B] a seeded sampled row's own generator, else None
    unseeded_rows: torch.Tensor | None  # [U] int64, sampled rows without a seed: they share the sampler's generator
    max_num_logprobs: int | None  # largest `logprobs` asked by any row; None: no row wants logprobs

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @classmethod
    def build(
        cls,
        rows: Sequence[SamplingRow | tuple],
        vocab_size: int,
        eos_token_ids: int | Sequence[int] | None,
        device: torch.device | str = "cpu",
    ) -> SamplingMetadata:
        """Tensors for B rows of (params, prompt_token_ids, output_token_ids, generator).

        Per-row scalars cross to the device as two small tensors; token lists are concatenated on the
        host and scattered on the device, so the cost is one pass over the tokens of the rows that
        have a penalty, and nothing for the rest.
        """
        device = torch.device(device)
        rows = [SamplingRow(*row) for row in rows]
        if not rows:
            raise ValueError("expected at least one row, got an empty batch")
        if isinstance(eos_token_ids, int):
            eos_token_ids = (eos_token_ids,)
        eos_token_ids = tuple(int(t) for t in (eos_token_ids or ()))
        _check_token_ids(eos_token_ids, vocab_size, "eos_token_ids")
        params = [row.params for row in rows]

        # Greedy rows carry neutral filters so that a step whose sampled rows use none skips them.
        is_greedy = [p.temperature < _GREEDY_EPS for p in params]
        # A greedy row's draw is discarded, so top_k = 1 costs it nothing and lets the window path serve it.
        top_k = [
            1 if g else (vocab_size if p.top_k <= 0 else min(p.top_k, vocab_size)) for p, g in zip(params, is_greedy)
        ]
        sampled_top_k = [k for k, g in zip(top_k, is_greedy) if not g]
        restricted_top_k = [k for k in sampled_top_k if k < vocab_size]
        unseeded = [i for i, (row, g) in enumerate(zip(rows, is_greedy)) if not g and row.generator is None]
        top_p = [1.0 if g else p.top_p for p, g in zip(params, is_greedy)]
        min_p = [0.0 if g else p.min_p for p, g in zip(params, is_greedy)]
        temperature = [1.0 if g else p.temperature for p, g in zip(params, is_greedy)]
        floats = torch.tensor([temperature, top_p, min_p], dtype=torch.float32).to(device, non_blocking=True)
        ints = torch.tensor([top_k, is_greedy], dtype=torch.int64).to(device, non_blocking=True)

        for i, row in enumerate(rows):
            if row.generator is not None and row.generator.device.type != device.type:
                raise ValueError(
                    f"expected row {i}'s generator on {device.type} (the logits' device), got {row.generator.device}"
                )

        logprobs_asked = [p.logprobs for p in params if p.logprobs is not None]
        if logprobs_asked and max(logprobs_asked) > vocab_size:
            raise ValueError(f"expected logprobs <= vocab size {vocab_size}, got {max(logprobs_asked)}")
        return cls(
            vocab_size=vocab_size,
            temperature=floats[0],
            is_greedy=ints[1].bool(),
            all_greedy=all(is_greedy),
            top_k=ints[0] if restricted_top_k else None,
            max_top_k=max(restricted_top_k, default=0),
            is_top_k_everywhere=bool(sampled_top_k) and len(restricted_top_k) == len(sampled_top_k),
            top_p=floats[1] if any(p < 1.0 for p in top_p) else None,
            min_p=floats[2] if any(p > 0.0 for p in min_p) else None,
            **_build_penalties(rows, vocab_size, device),
            **_build_logit_bias(rows, vocab_size, device),
            **_build_min_tokens(rows, vocab_size, eos_token_ids, device),
            # A greedy row's draw would be discarded; keeping its generator out leaves it untouched.
            generators=tuple(None if g else row.generator for row, g in zip(rows, is_greedy)),
            unseeded_rows=torch.tensor(unseeded, dtype=torch.int64).to(device) if unseeded else None,
            max_num_logprobs=max(logprobs_asked) if logprobs_asked else None,
        )


def _check_token_ids(token_ids: Sequence[int], vocab_size: int, what: str) -> None:
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"expected {what} in [0, {vocab_size}), got {bad[:8]}")


def _as_ids(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.int64).reshape(-1)


def _build_penalties(rows: list[SamplingRow], vocab_size: int, device: torch.device) -> dict:
    none = dict.fromkeys(
        (
            "penalty_rows",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "output_token_counts",
            "seen_token_mask",
        )
    )
    penalized = [
        i
        for i, r in enumerate(rows)
        if r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0 or r.params.repetition_penalty != 1.0
    ]
    if not penalized:
        return none
    values = torch.tensor(
        [
            [rows[i].params.presence_penalty for i in penalized],
            [rows[i].params.frequency_penalty for i in penalized],
            [rows[i].params.repetition_penalty for i in penalized],
        ],
        dtype=torch.float32,
    ).to(device)

    outputs = [_as_ids(rows[i].output_token_ids) for i in penalized]
    counts = _scatter_rows(outputs, vocab_size, device, "output_token_ids", torch.float32)
    seen = None
    with_repetition = [p for p, i in enumerate(penalized) if rows[i].params.repetition_penalty != 1.0]
    if with_repetition:
        # Rows without a repetition penalty contribute no prompt: their factor is 1 whatever the mask says.
        prompts = [
            _as_ids(rows[i].prompt_token_ids) if rows[i].params.repetition_penalty != 1.0 else outputs[p][:0]
            for p, i in enumerate(penalized)
        ]
        seen = _scatter_rows(prompts, vocab_size, device, "prompt_token_ids", torch.bool) | (counts > 0)
    return dict(
        none,
        penalty_rows=torch.tensor(penalized, dtype=torch.int64).to(device),
        presence_penalty=values[0],
        frequency_penalty=values[1],
        repetition_penalty=values[2],
        output_token_counts=counts,
        seen_token_mask=seen,
    )


def _scatter_rows(
    ids_per_row: list[torch.Tensor], vocab_size: int, device: torch.device, what: str, dtype: torch.dtype
) -> torch.Tensor:
    """[R, V] counts (float) or presence mask (bool) of the ids of each of R rows."""
    lengths = torch.tensor([len(ids) for ids in ids_per_row], dtype=torch.int64)
    out = torch.zeros(len(ids_per_row), vocab_size, dtype=dtype, device=device)
    if int(lengths.sum()) == 0:
        return out
    flat = torch.cat(ids_per_row)
    low, high = int(flat.min()), int(flat.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"expected {what} in [0, {vocab_size}), got values in [{low}, {high}]")
    row_index = torch.repeat_interleave(torch.arange(len(ids_per_row)), lengths)
    flat, row_index = flat.to(device), row_index.to(device)
    if dtype == torch.bool:
        out[row_index, flat] = True
    else:
        out.index_put_((row_index, flat), torch.ones(flat.shape, dtype=dtype, device=device), accumulate=True)
    return out


def _build_logit_bias(rows: list[SamplingRow], vocab_size: int, device: torch.device) -> dict:
    entries = [
        (i, int(token), float(value))
        for i, r in enumerate(rows)
        if r.params.logit_bias
        for token, value in r.params.logit_bias.items()
    ]
    if not entries:
        return dict(logit_bias_rows=None, logit_bias_token_ids=None, logit_bias_values=None)
    _check_token_ids([t for _, t, _ in entries], vocab_size, "logit_bias token ids")
    index = torch.tensor([(i, t) for i, t, _ in entries], dtype=torch.int64).to(device)
    return dict(
        logit_bias_rows=index[:, 0],
        logit_bias_token_ids=index[:, 1],
        logit_bias_values=torch.tensor([v for _, _, v in entries], dtype=torch.float32).to(device),
    )


def _build_min_tokens(
    rows: list[SamplingRow], vocab_size: int, eos_token_ids: tuple[int, ...], device: torch.device
) -> dict:
    pairs = []
    for i, r in enumerate(rows):
        p = r.params
        if len(r.output_token_ids) >= p.min_tokens:
            continue
        # With ignore_eos, EOS does not end the request, so it need not be masked (vLLM's rule).
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        _check_token_ids(sorted(stop_ids), vocab_size, f"row {i}'s stop_token_ids")
        pairs.extend((i, t) for t in sorted(stop_ids))
    if not pairs:
        return dict(min_tokens_rows=None, min_tokens_token_ids=None)
    index = torch.tensor(pairs, dtype=torch.int64).to(device)
    return dict(min_tokens_rows=index[:, 0], min_tokens_token_ids=index[:, 1])


@dataclass
class SamplerOutput:
    """One step's tokens and, when any row asked for them, logprobs of the model's raw distribution."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] fp32, log_softmax(raw logits) at the sampled token
    top_token_ids: torch.Tensor | None  # [B, k] int64, k = max_num_logprobs, most likely first
    top_logprobs: torch.Tensor | None  # [B, k] fp32, their raw logprobs


class Sampler:
    """Samples one token per row. Unseeded rows share `generator` (None: torch's default generator)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape != (metadata.num_rows, metadata.vocab_size):
            raise ValueError(
                f"expected logits [B={metadata.num_rows}, V={metadata.vocab_size}], got {tuple(logits.shape)}"
            )
        logits = logits.float()
        # Logprobs are of the raw distribution, before any processing (vLLM's default, raw_logprobs).
        logprobs = top_ids = top_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
            top_logprobs, top_ids = raw_logprobs.topk(metadata.max_num_logprobs, dim=-1)

        logits = self.apply_logits_processors(logits, metadata)
        greedy_tokens = logits.argmax(dim=-1)
        if metadata.all_greedy:
            token_ids = greedy_tokens
        else:
            probs = self.compute_probs(logits, metadata)
            token_ids = torch.where(metadata.is_greedy, greedy_tokens, self.draw(probs, metadata))

        if metadata.max_num_logprobs is not None:
            logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs, top_token_ids=top_ids, top_logprobs=top_logprobs)

    @staticmethod
    def apply_logits_processors(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """logit_bias, the min_tokens mask, then penalties; never edits `logits` (returned as is if none apply)."""
        if md.logit_bias_rows is None and md.min_tokens_rows is None and md.penalty_rows is None:
            return logits
        processed = logits.clone()
        if md.logit_bias_rows is not None:
            processed.index_put_((md.logit_bias_rows, md.logit_bias_token_ids), md.logit_bias_values, accumulate=True)
        if md.min_tokens_rows is not None:
            processed[md.min_tokens_rows, md.min_tokens_token_ids] = float("-inf")
        if md.penalty_rows is not None:
            rows = processed[md.penalty_rows]  # [P, V] copy
            if md.seen_token_mask is not None:
                factor = torch.where(md.seen_token_mask, md.repetition_penalty.unsqueeze(1), 1.0)
                rows = torch.where(rows > 0, rows / factor, rows * factor)
            rows = rows - md.frequency_penalty.unsqueeze(1) * md.output_token_counts
            rows = rows - md.presence_penalty.unsqueeze(1) * (md.output_token_counts > 0)
            processed[md.penalty_rows] = rows
        return processed

    @staticmethod
    def compute_probs(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """[B, V] probabilities after temperature, top_k, top_p and min_p (greedy rows: temperature 1)."""
        logits = logits / md.temperature.unsqueeze(1)
        if md.top_k is not None or md.top_p is not None:
            logits = _apply_top_k_top_p(logits, md)
        probs = logits.softmax(dim=-1)
        if md.min_p is not None:
            # Masking logits and taking the softmax again (not renormalising probs) leaves the rows with
            # min_p = 0 bit-identical, so a seeded row's draw does not depend on its neighbours' min_p.
            threshold = md.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
            probs = logits.masked_fill(probs < threshold, float("-inf")).softmax(dim=-1)
        return probs

    def draw(self, probs: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """[B] argmax(probs / q), q ~ Exp(1): seeded rows take q from their own generator."""
        # Greedy rows' q stays uninitialised: their result is discarded.
        q = torch.empty_like(probs)
        if md.unseeded_rows is not None:
            if md.unseeded_rows.shape[0] == md.num_rows:
                q.exponential_(generator=self.generator)
            else:
                shared = torch.empty((md.unseeded_rows.shape[0], q.shape[1]), dtype=q.dtype, device=q.device)
                q[md.unseeded_rows] = shared.exponential_(generator=self.generator)
        for i, generator in enumerate(md.generators):
            if generator is not None:
                q[i].exponential_(generator=generator)
        # Exp(1) can round to 0; 0/0 would be NaN, which argmax would return.
        q.clamp_min_(torch.finfo(q.dtype).tiny)
        return (probs / q).argmax(dim=-1)


def _apply_top_k_top_p(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Set to -inf the logits outside each row's top_k, then outside its top_p nucleus.

    top_p follows HF's warper: a token goes when the mass of the tokens no more likely than it is
    <= 1 - top_p, so top_p = 1 drops nothing whatever the rounding. Ties at the k-th value are kept.
    When every sampled row has a top_k, both filters run on the top-max_top_k window (a partial top-k
    instead of a full sort of [B, V]); top_p over the window equals top_p after the top_k mask.
    """
    neg_inf = float("-inf")
    if md.top_k is not None and (md.is_top_k_everywhere or md.top_p is None):
        values, index = logits.topk(md.max_top_k, dim=-1)  # [B, W] descending
        kth = values.gather(1, (md.top_k.clamp(max=md.max_top_k) - 1).unsqueeze(1))
        if not md.is_top_k_everywhere:
            # Rows keeping all tokens (top_k = V) cut nothing; only top_k alone comes here, so no window.
            kth = torch.where((md.top_k < md.vocab_size).unsqueeze(1), kth, neg_inf)
            return logits.masked_fill(logits < kth, neg_inf)
        values = values.masked_fill(values < kth, neg_inf)
        if md.top_p is not None:
            values = _apply_top_p_ascending(values.flip(-1), md.top_p).flip(-1)
        return torch.full_like(logits, neg_inf).scatter_(1, index, values)
    sorted_logits, sorted_index = logits.sort(dim=-1)
    if md.top_k is not None:
        kth = sorted_logits.gather(1, (md.vocab_size - md.top_k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, neg_inf)
    sorted_logits = _apply_top_p_ascending(sorted_logits, md.top_p)
    return torch.empty_like(logits).scatter_(1, sorted_index, sorted_logits)


def _apply_top_p_ascending(sorted_logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top_p on logits sorted ascending along the last dimension."""
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False  # the most likely token always stays
    return sorted_logits.masked_fill(drop, float("-inf"))

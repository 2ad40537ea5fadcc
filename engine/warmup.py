"""Warm-up: before the engine reports ready, every kernel a request can reach is compiled and tuned.

EngineCore.__init__ calls `warm_up` after the state pool and the CUDA graphs are set up. It runs dummy
forwards through the model on the null slot 0 (padding's slot: no request reads it) and the sampler through
each of its code paths, then hands back a report. It leaves the engine as it found it: it never goes through
the scheduler or the runner (no slot allocated, no prefix-cache entry, no stats counted), it restores row 0
of every state tensor afterwards, and it samples with generators of its own (the engine's generator, the
seeded requests' generators and torch's default ones are not drawn from). tests/engine/test_warmup.py checks.

Which shapes: Triton builds one binary per specialization of a kernel's arguments. It specializes on dtypes
(one engine has one model dtype and the ops cast the rest the same way on every step, so any forward covers
them), on constexprs (model dimensions, chunk sizes: constant per model), on an integer argument equal to 1
(it becomes a constexpr) or divisible by 16, on an integer's range (i32 below 2^31, never reached by a step's
sizes), and on a pointer's 16-byte alignment. What differs between steps, and the shapes that cover it:
- token count T of a prefill: not divisible by 16 (17), divisible and one chunk (64), several chunks with a
  tail (131), a 2-token prompt, and the largest chunk a step holds (max_num_batched_tokens);
- number of sequences N: 1, odd (3), 16 (a multiple of 16), each prefill alone or beside decodes;
- a prefill resumed at a later position (its state and window ring carried over: chunked prompts, prefix hits);
- pointer alignment of sub-batches: a mixed step runs its 1-token sequences and its longer ones as separate
  calls on slices of the step's tensors (kernels/varlen.py). The decodes come first (the scheduler's pass 1),
  so the prefill rows start at row n (n decodes); a tensor with rows of r bytes is then 16-byte aligned iff
  16 divides n * r, which depends only on how many times 2 divides n: n in 1, 2, 4, 8, 16 gives every
  combination over the model's tensors. 1-token sequences elsewhere in a step (a prompt's last 1-token
  chunk) are gathered into new, aligned tensors: one interleaved step covers that;
- decode: linrec's decode kernels take no argument that depends on the batch (strides are the model's, the
  batch is the grid); on CUDA the graph capture has already run every bucket, and with enforce_eager (or no
  graphs) eager decode batches of 1, 3, 16 and max_num_seqs run here.
- LoRA (EngineConfig.enable_lora): every shape again with adapters on every other sequence (slot 0, zeros at
  start-up), so that the shrink/expand kernels compile for each token-count class (their row block follows T)
  beside base rows; the CUDA graphs captured their LoRA variant already.
The sampler is torch, not Triton: its paths run here so that CUDA's lazily loaded kernels (sort, top-k,
exponential draws, scatter) are loaded before a request needs them.
What cannot be enumerated: a kernel that specializes on something the list above does not vary (fla's
autotune keys, a kernel written later), and pointer offsets of views other than the step's row slices. The
compile watch (kernels/toolchain.py) logs every compilation after the warm-up as a bug, naming the kernel
and its specialization, so that a gap shows up in the logs and gets a shape here.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from linrec.engine.sampler import Sampler, SamplingMetadata, SamplingRow, make_generator
from linrec.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from linrec.kernels.toolchain import CompileWatch, install_compile_watch
from linrec.models.batch import ForwardBatch

if TYPE_CHECKING:
    from linrec.engine.core import EngineCore
    from linrec.engine.state_pool import StatePool
    from linrec.models.base import CausalLM

logger = logging.getLogger(__name__)

NULL_SLOT = 0  # the pool's row 0: padding reads and writes it, no request owns it (engine/state_pool.py)
EAGER_DECODE_BATCHES = (1, 3, 16)  # and max_num_seqs
MIXED_DECODE_COUNTS = (1, 2, 4, 8, 16)  # every 2-adic class of a prefill sub-batch's row offset (docstring)
SEQUENCES_OF_16 = tuple(2 + i % 7 for i in range(16))  # 16 short prompts of 2..8 tokens (88 in all)
SAMPLER_BATCH = 4  # rows of the sampler calls that are not a single request


def is_enabled(setting: str, device: torch.device) -> bool:
    """EngineConfig.warmup against the device: auto warms up on CUDA only."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"expected warmup auto, on or off, got {setting!r}")
    return setting == "on" or (setting == "auto" and device.type == "cuda")


@dataclass(frozen=True)
class ForwardShape:
    what: str  # the specialization class it covers (the progress bar shows it)
    seq_lens: tuple[int, ...]  # tokens per sequence, in batch order
    start_positions: tuple[int, ...]  # tokens already in each sequence's state
    adapter_slots: tuple[int, ...] | None = None  # LoRA slot of each sequence (-1 none); None: LoRA off

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)


def forward_shapes(
    max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, eager_decode: bool, lora: bool = False
) -> list[ForwardShape]:
    """The dummy steps of a warm-up (see the module docstring), without those the engine can never run: more
    sequences than max_num_seqs, more tokens than max_num_batched_tokens, positions past max_model_len. With
    `lora`, each shape once more with an adapter on every other sequence."""
    shapes: list[ForwardShape] = []

    def add(what: str, seq_lens: Sequence[int], starts: Sequence[int] | None = None) -> None:
        starts = tuple(starts) if starts is not None else (0,) * len(seq_lens)
        shape = ForwardShape(what, tuple(seq_lens), starts)
        fits = (
            len(shape.seq_lens) <= max_num_seqs
            and shape.num_tokens <= max_num_batched_tokens
            and all(s + n <= max_model_len for s, n in zip(starts, seq_lens))
        )
        if fits and all(shape.seq_lens != s.seq_lens or shape.start_positions != s.start_positions for s in shapes):
            shapes.append(shape)

    largest = min(max_num_batched_tokens, max_model_len)
    for num_tokens, what in ((2, "a 2-token prompt"), (17, "T % 16 != 0"), (64, "T % 16 == 0, one chunk")):
        add(f"prefill, {what}", (num_tokens,))
    add("prefill, several chunks and a tail", (131,))
    if largest >= 2:
        add("prefill, the largest chunk a step holds", (largest,))
    add("prefill resumed at a later position", (17,), (80,))
    add("varlen prefill, 3 sequences", (5, 17, 64), (0, 70, 0))
    add("varlen prefill, 16 sequences", SEQUENCES_OF_16)
    for num_decodes in MIXED_DECODE_COUNTS:
        prefill = (17,) if num_decodes % 2 else (5, 16)
        add(f"{num_decodes} decode(s) then {len(prefill)} prefill(s)", (1,) * num_decodes + prefill)
    add("1-token chunks between prefills (gathered rows)", (1, 17, 1, 5))
    if eager_decode:
        for batch in sorted({*EAGER_DECODE_BATCHES, max_num_seqs}):
            add(f"eager decode, batch {batch}", (1,) * batch, (9,) * batch)
    if lora:
        shapes += [
            ForwardShape(
                f"{s.what}, with LoRA", s.seq_lens, s.start_positions, tuple(-(i % 2) for i in range(len(s.seq_lens)))
            )
            for s in list(shapes)
        ]
    return shapes


def sampler_cases() -> list[tuple[str, list[SamplingParams]]]:
    """One batch per code path of engine/sampler.py: greedy, logprobs, temperature, the top-k window, the
    full sort, min-p, penalties, logit bias and the min_tokens mask, seeded draws, and a mixed batch."""
    greedy = SamplingParams(temperature=0.0)
    return [
        ("greedy", [greedy]),
        ("greedy with logprobs", [SamplingParams(temperature=0.0, logprobs=MAX_LOGPROBS)]),
        ("temperature", [SamplingParams(temperature=0.7)] * SAMPLER_BATCH),
        ("top-k", [SamplingParams(top_k=8)]),
        ("top-p", [SamplingParams(top_p=0.9)]),
        ("top-k and top-p on the top-k window", [SamplingParams(top_k=8, top_p=0.9)]),
        ("top-k beside top-p, full sort", [SamplingParams(top_k=8, top_p=0.9), SamplingParams(top_p=0.9)]),
        ("top-k beside rows without", [SamplingParams(top_k=8), SamplingParams()]),
        ("min-p", [SamplingParams(min_p=0.05)]),
        (
            "penalties",
            [SamplingParams(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2), SamplingParams()],
        ),
        ("logit bias and min_tokens", [SamplingParams(logit_bias={0: 1.0}, min_tokens=4, max_tokens=8)]),
        ("seeded", [SamplingParams(seed=1234)]),
        (
            "mixed batch",
            [greedy, SamplingParams(seed=7), SamplingParams(top_k=8, logprobs=2), SamplingParams(min_p=0.05)],
        ),
    ]


@dataclass(frozen=True)
class WarmupReport:
    num_forwards: int
    num_sampler_batches: int
    seconds: float
    num_compilations: int | None  # Triton kernels built during the warm-up; None: not counted
    num_startup_compilations: int | None  # since the process first used Triton (load, graph capture, warm-up)

    def summary(self) -> str:
        """One line; `linrec bench ready` reads the count of start-up compilations from it."""
        if self.num_compilations is None:
            counted = "Triton compilations not counted (no compile watch)"
        else:
            counted = (
                f"{self.num_startup_compilations} Triton compilations at start-up "
                f"({self.num_compilations} in the warm-up)"
            )
        return (
            f"linrec warm-up: {self.num_forwards} forward shapes and {self.num_sampler_batches} sampler batches "
            f"in {self.seconds:.1f}s; {counted}"
        )


def warm_up(engine: EngineCore, progress: bool = False, watch: CompileWatch | None = None) -> WarmupReport | None:
    """Warm up `engine` if its config asks for it on its device (EngineConfig.warmup); None when it does not.
    `watch`: the compile watch to arm (default: the process's, installed on first use)."""
    config = engine.config
    if not is_enabled(config.warmup, engine.device):
        return None
    if watch is None:
        watch = install_compile_watch()
    shapes = forward_shapes(
        min(config.max_num_seqs, engine.num_slots),
        config.max_num_batched_tokens,
        engine.max_model_len,
        eager_decode=engine.runner.decode_graphs is None,
        lora=engine.runner.num_adapter_slots > 0,
    )
    report = run_warmup(
        engine.model,
        engine.pool,
        engine.device,
        engine.vocab_size,
        engine.eos_token_ids,
        shapes,
        sampler_cases(),
        progress=progress,
        watch=watch,
        num_adapter_slots=engine.runner.num_adapter_slots,
    )
    if progress:
        print(report.summary(), file=sys.stderr)
    else:
        logger.info(report.summary())
    return report


@torch.inference_mode()
def run_warmup(
    model: CausalLM,
    pool: StatePool,
    device: torch.device,
    vocab_size: int,
    eos_token_ids: tuple[int, ...],
    shapes: Sequence[ForwardShape],
    cases: Sequence[tuple[str, list[SamplingParams]]],
    progress: bool = False,
    watch: CompileWatch | None = None,
    num_adapter_slots: int = 0,
) -> WarmupReport:
    """The forwards of `shapes` on the null slot and the sampler over `cases`; row 0 of the pool is restored."""
    from tqdm import tqdm

    start = time.perf_counter()
    before = watch.num_compilations if watch is not None else None
    saved = [{name: tensor[NULL_SLOT].clone() for name, tensor in layer.items()} for layer in pool.layers]
    bar = tqdm(total=len(shapes) + len(cases), desc="warming up", unit="step", file=sys.stderr, disable=not progress)
    context = watch.warming_up() if watch is not None else contextlib.nullcontext()
    with context, bar:
        logits = None
        for shape in shapes:
            bar.set_postfix_str(shape.what, refresh=False)
            try:
                logits = _forward(model, pool, device, vocab_size, shape, num_adapter_slots)
            except Exception as exc:  # a request would have failed here too: say which shape at start-up
                raise RuntimeError(
                    f"linrec warm-up failed on {shape.what} (seq_lens {list(shape.seq_lens)}, start positions "
                    f"{list(shape.start_positions)}): {type(exc).__name__}: {exc}"
                ) from exc
            bar.update()
        if logits is None:  # no shape fits (max_num_batched_tokens 1): one decode token still gives logits
            logits = _forward(model, pool, device, vocab_size, ForwardShape("decode", (1,), (0,)))
        # Sampled rows are the first request's logits repeated: the sampler's cost does not depend on values.
        row = logits[:1].float()
        sampler = Sampler(torch.Generator(device=device).manual_seed(0))  # never the runner's generator
        for what, params in cases:
            bar.set_postfix_str(what, refresh=False)
            _sample(sampler, row.expand(len(params), -1).contiguous(), params, device, eos_token_ids)
            bar.update()
        for layer, rows in zip(pool.layers, saved):
            for name, tensor in layer.items():
                tensor[NULL_SLOT].copy_(rows[name])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    counted = watch is not None
    return WarmupReport(
        num_forwards=len(shapes),
        num_sampler_batches=len(cases),
        seconds=time.perf_counter() - start,
        num_compilations=watch.num_compilations - before if counted else None,
        num_startup_compilations=watch.num_compilations if counted else None,
    )


def _forward(
    model: CausalLM,
    pool: StatePool,
    device: torch.device,
    vocab_size: int,
    shape: ForwardShape,
    num_adapter_slots: int = 0,
) -> torch.Tensor:
    """One eager step as the runner runs it (every sequence in the null slot); its sampled rows' logits [N, V]."""
    batch = ForwardBatch.build(
        shape.seq_lens,
        shape.start_positions,
        (NULL_SLOT,) * len(shape.seq_lens),
        device=device,
        adapter_slots=shape.adapter_slots,
        num_adapter_slots=num_adapter_slots,
    )
    # Deterministic token ids spread over the vocabulary; no RNG is drawn.
    input_ids = (torch.arange(shape.num_tokens, device=device, dtype=torch.int64) * 7919 + 1) % vocab_size
    hidden = model(input_ids, batch, pool.layers)
    return model.compute_logits(hidden[batch.last_token_indices()])[:, :vocab_size]


def _sample(
    sampler: Sampler,
    logits: torch.Tensor,
    params: list[SamplingParams],
    device: torch.device,
    eos_token_ids: tuple[int, ...],
) -> None:
    vocab_size = logits.shape[-1]
    prompt, output = [t % vocab_size for t in (1, 2, 3)], [t % vocab_size for t in (4, 5)]
    rows = [
        SamplingRow(p, prompt, output, make_generator(p.seed, device) if p.seed is not None else None) for p in params
    ]
    metadata = SamplingMetadata.build(rows, vocab_size=vocab_size, eos_token_ids=eos_token_ids, device=device)
    out = sampler(logits, metadata)
    out.token_ids.tolist()  # the runner's host sync, as a step has it

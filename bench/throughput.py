"""`linrec bench throughput`: one mixed workload through linrec's LLM and through HF transformers `generate`.

Both sides run in this process on the same weights and dtype, one after the other, each warmed up first.
The workload is many prompts with prompt and output lengths drawn from a seeded RNG, greedy, EOS ignored.

Peers: a Llama/Qwen2/Mistral checkpoint (linrec serves it linearized as Liger-GLA), a Liger or a LoLCATs
checkpoint is compared with the ORIGINAL transformer under HF generate with its KV cache, which is what a
user would run instead of linearizing (for LoLCATs: its base Llama/Mistral weights, without the feature maps,
window factors and LoRA). A mamba2 checkpoint is compared with transformers' Mamba2ForCausalLM.

HF generate cannot stop rows of one batch at different lengths: each HF batch generates
max_new_tokens = min_new_tokens = the longest output requested in it, and only the requested tokens count
as useful output. linrec generates exactly the requested tokens per request.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from linrec.bench.common import (
    BENCH_FORMAT_VERSION,
    HF_PEER_MODEL_TYPES,
    LINEARIZABLE,
    Workload,
    cached_bench_model,
    hf_peer,
    run_hf,
    run_linrec,
    served_model_type,
)
from linrec.engine.config import EngineConfig

# linrec's max_num_seqs in this bench: wider than EngineConfig's default (64), because offline throughput comes
# from wide continuous batches; the figures in docs/benchmarks.md were measured with it.
THROUGHPUT_MAX_NUM_SEQS = 256


def make_workload(
    num_prompts: int,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    vocab_size: int,
    seed: int = 0,
) -> Workload:
    """num_prompts requests, lengths uniform in the inclusive ranges, token ids uniform in [0, vocab_size)."""
    for name, (lo, hi) in (("prompt_len", prompt_len), ("output_len", output_len)):
        if not 1 <= lo <= hi:
            raise ValueError(f"expected 1 <= min <= max for {name}, got {lo}..{hi}")
    if num_prompts < 1:
        raise ValueError(f"expected num_prompts >= 1, got {num_prompts}")
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_len))] for _ in range(num_prompts)]
    output_lens = [rng.randint(*output_len) for _ in range(num_prompts)]
    return Workload(prompts, output_lens)


@dataclass
class SideResult:
    """One side of the comparison over the whole workload."""

    name: str  # what ran, e.g. "linrec liger_gla" or "HF LlamaForCausalLM.generate"
    seconds: float  # wall time of the timed run
    cpu_seconds: float  # this process's CPU time (all threads) in the timed run; robust to other load at 1 thread
    num_prompt_tokens: int
    num_output_tokens: int  # useful output: the tokens requested
    num_generated_tokens: int  # what was computed: for HF, each batch's longest request times its rows
    output_tokens_per_s: float
    total_tokens_per_s: float  # (prompt + useful output tokens) / seconds
    token_ids: list[list[int]] | None = field(default=None, repr=False)  # per request, when asked to keep them

    @classmethod
    def of(
        cls,
        name: str,
        seconds: float,
        cpu_seconds: float,
        workload: Workload,
        num_generated: int,
        token_ids: list[list[int]] | None,
    ) -> SideResult:
        seconds = max(seconds, 1e-9)
        return cls(
            name,
            seconds,
            cpu_seconds,
            workload.num_prompt_tokens,
            workload.num_output_tokens,
            num_generated,
            workload.num_output_tokens / seconds,
            (workload.num_prompt_tokens + workload.num_output_tokens) / seconds,
            token_ids,
        )


@dataclass
class ThroughputResult:
    model: str
    dtype: str
    num_prompts: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    hf_batch_size: int  # the HF batch size of `hf`: the fastest of those tried
    max_num_seqs: int
    max_num_batched_tokens: int
    num_threads: int  # torch.get_num_threads() during the run
    linrec: SideResult
    hf: SideResult
    output_ratio: float  # linrec output tok/s / HF output tok/s
    total_ratio: float  # the same with prompt tokens counted
    cpu_ratio: float  # HF CPU seconds / linrec CPU seconds: the output ratio measured in CPU time instead of wall
    hf_runs: list[tuple[int, SideResult]] = field(default_factory=list)  # every HF batch size tried, in order

    def to_json(self) -> str:
        data = asdict(self)
        for side in ("linrec", "hf"):
            data[side].pop("token_ids", None)
        data["hf_runs"] = [
            {"batch_size": bs, **{k: v for k, v in side.items() if k != "token_ids"}} for bs, side in data["hf_runs"]
        ]
        return json.dumps(data, indent=2)

    def format(self) -> str:
        rows = [
            f"model: {self.model} ({self.dtype}), torch threads: {self.num_threads}",
            f"workload: {self.num_prompts} prompts, prompt len {self.prompt_len[0]}..{self.prompt_len[1]}, "
            f"output len {self.output_len[0]}..{self.output_len[1]}, greedy, ignore_eos; "
            f"{self.linrec.num_prompt_tokens} prompt + {self.linrec.num_output_tokens} output tokens",
            f"linrec: max_num_seqs={self.max_num_seqs}, max_num_batched_tokens={self.max_num_batched_tokens}; "
            f"HF: left-padded batches, each generating its longest request; the peer is the fastest batch size "
            f"tried ({self.hf_batch_size}: {self.hf.num_generated_tokens} tokens computed, "
            f"{self.hf.num_output_tokens} counted as useful)",
            "",
            f"{'':<44} {'seconds':>9} {'CPU s':>9} {'output tok/s':>13} {'total tok/s':>12}",
        ]
        sides = [(self.linrec.name, self.linrec)]
        sides += [(f"{side.name} (batch {bs})", side) for bs, side in self.hf_runs or [(self.hf_batch_size, self.hf)]]
        for name, side in sides:
            rates = f"{side.output_tokens_per_s:>13.1f} {side.total_tokens_per_s:>12.1f}"
            rows.append(f"{name:<44} {side.seconds:>9.2f} {side.cpu_seconds:>9.2f} {rates}")
        ratios = f"{self.output_ratio:>12.2f}x {self.total_ratio:>11.2f}x"
        rows.append(f"{'ratio linrec / HF (wall time)':<44} {'':>9} {'':>9} {ratios}")
        rows.append(f"{'ratio linrec / HF (CPU time)':<44} {'':>9} {'':>9} {self.cpu_ratio:>12.2f}x")
        return "\n".join(rows)


def bench_model_path(family: str = "liger_gla") -> Path:
    """The bench-sized seeded random checkpoint of `family`, written on first use under linrec's cache dir."""
    from linrec import __version__

    return cached_bench_model(f"bench-{family}-{__version__}-v{BENCH_FORMAT_VERSION}", family)


def run_throughput(
    model: str | None = None,
    *,
    family: str = "liger_gla",
    dtype: str = "auto",
    device: str = "auto",
    kernel_backend: str = "auto",
    num_prompts: int = 128,
    prompt_len: tuple[int, int] = (16, 256),
    output_len: tuple[int, int] = (16, 256),
    hf_batch_size: int | Sequence[int] = 32,
    max_num_seqs: int = THROUGHPUT_MAX_NUM_SEQS,
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens,
    seed: int = 0,
    threads: int | None = None,
    warmup: bool = True,
    keep_token_ids: bool = False,
) -> ThroughputResult:
    """Run the workload through linrec, then through the HF peer, and compare (see the module docstring).

    model: a local checkpoint directory; None builds (once) the bench-sized model of `family`.
    threads: torch CPU threads for both sides (None keeps torch's default). On a shared machine, 1 thread
    and the CPU-time ratio measure the work done rather than the neighbours' load.
    """
    import torch

    hf_batch_sizes = (hf_batch_size,) if isinstance(hf_batch_size, int) else tuple(hf_batch_size)
    if not hf_batch_sizes or min(hf_batch_sizes) < 1:
        raise ValueError(f"expected HF batch sizes >= 1, got {hf_batch_size}")
    if threads is not None and threads < 1:
        raise ValueError(f"expected threads >= 1, got {threads}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        return _measure(
            model, family, dtype, device, kernel_backend, num_prompts, prompt_len, output_len, hf_batch_sizes,
            max_num_seqs, max_num_batched_tokens, seed, warmup, keep_token_ids,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)


def _measure(
    model, family, dtype, device, kernel_backend, num_prompts, prompt_len, output_len, hf_batch_sizes,
    max_num_seqs, max_num_batched_tokens, seed, warmup, keep_token_ids,
) -> ThroughputResult:  # fmt: skip
    """run_throughput's body, under its thread setting."""
    import torch

    from linrec.engine.core import resolve_device
    from linrec.engine.llm import LLM
    from linrec.models.loader import read_hf_config, resolve_dtype

    path = Path(model) if model is not None else bench_model_path(family)
    hf_config = read_hf_config(path)
    model_type = hf_config.get("model_type")
    if model_type not in HF_PEER_MODEL_TYPES:
        raise ValueError(
            f"no HF transformers peer for model_type {model_type!r}; expected a Llama/Qwen2/Mistral, Liger, "
            "LoLCATs or mamba2 checkpoint"
        )
    linearize = "liger-gla" if model_type in LINEARIZABLE else None
    torch_dtype = resolve_dtype(dtype, hf_config)
    torch_device = resolve_device(device)
    workload = make_workload(num_prompts, prompt_len, output_len, int(hf_config["vocab_size"]), seed)
    warm = Workload(workload.prompts[:4], [4] * min(4, num_prompts))

    llm = LLM(
        str(path),
        dtype=str(torch_dtype).removeprefix("torch."),
        device=device,
        kernel_backend=kernel_backend,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        linearize=linearize,
        seed=seed,
    )
    linrec_family = served_model_type(hf_config, linearize)
    if warmup:
        run_linrec(llm, warm)
    seconds, cpu_seconds, linrec_ids = run_linrec(llm, workload)
    linrec_side = SideResult.of(
        f"linrec {linrec_family}",
        seconds,
        cpu_seconds,
        workload,
        workload.num_output_tokens,
        linrec_ids if keep_token_ids else None,
    )
    pad_token_id = hf_config.get("pad_token_id")
    if not isinstance(pad_token_id, int):
        pad_token_id = 0
    del llm

    hf_model = hf_peer(path, hf_config, torch_dtype, torch_device)
    hf_runs: list[tuple[int, SideResult]] = []
    for batch_size in hf_batch_sizes:
        if warmup:
            run_hf(hf_model, warm, batch_size, pad_token_id)
        seconds, cpu_seconds, num_generated, hf_ids = run_hf(hf_model, workload, batch_size, pad_token_id)
        side = SideResult.of(
            f"HF {type(hf_model).__name__}.generate",
            seconds,
            cpu_seconds,
            workload,
            num_generated,
            hf_ids if keep_token_ids else None,
        )
        hf_runs.append((batch_size, side))
    # The peer is HF at its best batch size; at one thread CPU time decides, which other load does not inflate.
    single = torch.get_num_threads() == 1
    hf_batch, hf_side = min(hf_runs, key=lambda run: run[1].cpu_seconds if single else run[1].seconds)
    return ThroughputResult(
        model=str(path),
        dtype=str(torch_dtype).removeprefix("torch."),
        num_prompts=num_prompts,
        prompt_len=tuple(prompt_len),
        output_len=tuple(output_len),
        hf_batch_size=hf_batch,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        num_threads=torch.get_num_threads(),
        linrec=linrec_side,
        hf=hf_side,
        output_ratio=linrec_side.output_tokens_per_s / hf_side.output_tokens_per_s,
        total_ratio=linrec_side.total_tokens_per_s / hf_side.total_tokens_per_s,
        cpu_ratio=hf_side.cpu_seconds / max(linrec_side.cpu_seconds, 1e-9),
        hf_runs=hf_runs,
    )


def parse_range(text: str | Sequence[int]) -> tuple[int, int]:
    """'16:256' or '32' -> (16, 256) or (32, 32)."""
    if not isinstance(text, str):
        lo, hi = text
        return int(lo), int(hi)
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"expected a length N or a range MIN:MAX, got {text!r}") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2:
        raise ValueError(f"expected a length N or a range MIN:MAX, got {text!r}")
    return values[0], values[1]

"""`linrec bench decode`: end-to-end decode tokens/s of linrec's engine against the HF `generate` users run.

At batch 1/8/64/256 on a 1.3B-class random model, against `generate` on the same weights: transformers'
for Liger-GLA and LoLCATs (the ORIGINAL Llama with its KV cache) and Mamba2; flash-linear-attention's own HF model
classes (`fla.models` GLAForCausalLM, GatedDeltaNetForCausalLM: the full `flash-linear-attention` package,
which fla-core alone does not ship) for GLA and Gated DeltaNet. Without fla.models those peer rows are
None and `peer_note` says why. Decode alone is isolated by difference: a run generating 1 + n tokens minus
a run generating 1 token, with the same prompts, on each side. Prefill tokens/s is timed once, at
`prefill_batch` prompts of `prefill_len` tokens generating one token each, on both sides.

`--size small` (a tiny config, batch 1 and 2) exists so CI can smoke-test it on a CPU in seconds. CPU
figures are not performance figures: the JSON says so in `note`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from linrec.bench.common import (
    BENCH_FAMILIES,
    BENCH_SEED,
    BENCH_VOCAB_SIZE,
    DEFAULT_BATCH_SIZES,
    LINEARIZABLE,
    LINREC_WRITTEN,
    NOTE_CPU,
    NOTE_GPU,
    Workload,
    cached_bench_model,
    check_batch_sizes,
    check_size,
    hf_peer,
    run_hf,
    run_linrec,
    served_model_type,
)

DECODE_FORMAT_VERSION = 1
# Families whose bench model linrec writes itself in fla's checkpoint format (transformers has no class for
# them), and whose peer is fla.models' class of the same name.
FLA_FAMILIES = ("gla", "gated_deltanet")
DECODE_FAMILIES = (*BENCH_FAMILIES, *FLA_FAMILIES)

# The Llama shapes that Liger-GLA and LoLCATs are built on (LoLCATs adds its window and feature dimension)
_LLAMA_1B3: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
}
_LLAMA_SMALL: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 300,
}

# Model overrides of the bench configs (bench/common.py): 1.3B-class (random weights, written once) and tiny.
DECODE_MODEL_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "1.3b": {
        # ~1.2B parameters: Llama shape with GQA (served as Liger-GLA, peer: this Llama under HF generate)
        "liger_gla": _LLAMA_1B3,
        # the same Llama as LoLCATs with the released attention's window (64) and feature maps (F = 64 on
        # 128-dim heads); peer: this Llama under HF generate
        "lolcats_llama": {**_LLAMA_1B3, "window_size": 64, "feature_dim": 64},
        # Mamba2-1.3B's shape
        "mamba2": {"hidden_size": 2048, "num_hidden_layers": 48, "num_heads": 64, "head_dim": 64, "state_size": 128},
        # fla's GLA-1.3B (4 heads: K=256, V=512; no short conv) and Gated DeltaNet-1.3B (6 heads: K=256, V=512)
        "gla": {
            "hidden_size": 2048,
            "num_hidden_layers": 24,
            "num_heads": 4,
            "expand_k": 0.5,
            "expand_v": 1.0,
            "use_short_conv": False,
            "tie_word_embeddings": False,
        },
        "gated_deltanet": {
            "hidden_size": 2048,
            "num_hidden_layers": 21,
            "num_heads": 6,
            "head_dim": 256,
            "expand_v": 2.0,
            "tie_word_embeddings": False,
        },
    },
    "small": {
        "liger_gla": _LLAMA_SMALL,
        # window 8: a 16-token prompt already moves keys into the linear state
        "lolcats_llama": {**_LLAMA_SMALL, "window_size": 8, "feature_dim": 8},
        "mamba2": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_heads": 8,
            "head_dim": 16,
            "state_size": 16,
            "n_groups": 2,
            "chunk_size": 16,
            "vocab_size": 300,
        },
        "gla": {"vocab_size": 300},  # the demo configs' sizes (hidden 64, 2 layers)
        "gated_deltanet": {"vocab_size": 300},
    },
}


def decode_model_path(family: str, size: str) -> Path:
    """The seeded random checkpoint of `family` at `size`, written on first use under linrec's cache dir."""
    from linrec import __version__
    from linrec.envs import cache_dir
    from linrec.models.staging import cached_dir

    check_size(size)
    if family not in DECODE_FAMILIES:
        raise ValueError(f"expected a family in {DECODE_FAMILIES}, got {family!r}")
    name = f"decode-{family}-{size}-{__version__}-v{DECODE_FORMAT_VERSION}"
    overrides = DECODE_MODEL_OVERRIDES.get(size, {}).get(family)
    if family in FLA_FAMILIES:
        return cached_dir(
            cache_dir() / "models" / name, lambda staging: write_fla_bench_model(staging, family, overrides)
        )
    # linrec's own writer saves in bf16, as for the fla families: a 1.3B model writes in half the time
    return cached_bench_model(name, family, overrides, "bfloat16" if family in LINREC_WRITTEN else "float32")


def write_fla_bench_model(dst: str | Path, family: str, overrides: dict[str, Any] | None = None) -> Path:
    """A seeded random checkpoint of fla's GLA or Gated DeltaNet, written by linrec's own model class (its
    parameter names and config.json are fla's: fla.models loads it), with the byte-level tokenizer."""
    from linrec.models.demo import write_seeded_model

    if family not in FLA_FAMILIES:
        raise ValueError(f"expected a family in {FLA_FAMILIES}, got {family!r}")
    # bf16 on disk: the bench runs bf16 on a GPU, and a 1.3B model writes in half the time (5.1 GB fp32 took
    # 91 s on a 2-core machine, most of it writing)
    return write_seeded_model(dst, family, overrides, vocab_size=BENCH_VOCAB_SIZE, dtype="bfloat16", seed=BENCH_SEED)


def fla_peer(path: Path, dtype, device):
    """flash-linear-attention's own HF model class for a gla or gated_deltanet checkpoint (what fla users run).
    Raises ImportError without fla.models. Importing fla.models re-registers transformers' mamba/mamba2
    configs: only a process benching a fla family imports it (bench/gpu_check.py runs each family alone)."""
    import fla.models  # noqa: F401 - registers GLAConfig and GatedDeltaNetConfig with transformers' Auto classes
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), config=config, dtype=dtype, output_loading_info=True
    )
    missing, unexpected = info.get("missing_keys", []), info.get("unexpected_keys", [])
    if missing or unexpected:  # a peer with random weights in place of ours would time a different model
        raise ValueError(
            f"expected fla's {type(model).__name__} to take every tensor of {path}, got missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device).eval()


@dataclass
class DecodeRow:
    batch: int
    # decode tokens / s: batch * output_len / (t(1 + output_len) - t(1)); None when timing noise exceeded
    # the decode time (only seen on tiny CPU smoke runs)
    linrec_tokens_per_s: float | None
    hf_tokens_per_s: float | None  # None also when the peer did not run (see peer_note)
    ratio: float | None  # linrec / HF


@dataclass
class DecodeResult:
    model: str
    family: str
    size: str
    device: str
    dtype: str
    kernel_backend: str
    cuda_graphs: bool
    prompt_len: int
    output_len: int  # decode tokens per request that are timed
    hf_peer: str
    rows: list[DecodeRow]
    note: str = ""
    peer_note: str = ""  # why the peer did not run, where it did not
    prefill_len: int = 0  # prompt tokens per request of the prefill timing
    prefill_batch: int = 0  # requests in the prefill timing
    # prompt tokens / s over a prefill_batch x prefill_len run generating one token each (prefill and the first token)
    linrec_prefill_tokens_per_s: float | None = None
    hf_prefill_tokens_per_s: float | None = None
    prefill_ratio: float | None = None  # linrec / HF

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def format(self) -> str:
        lines = [
            f"model: {self.model} ({self.family}, {self.size}, {self.dtype}) on {self.device}; kernel_backend "
            f"{self.kernel_backend}, CUDA graphs {'on' if self.cuda_graphs else 'off'}; {self.note}",
            f"decode tokens/s over {self.output_len} tokens per request after a {self.prompt_len}-token prompt; "
            f"peer {self.hf_peer}" + (f" ({self.peer_note})" if self.peer_note else ""),
            "",
            f"{'batch':>5} {'linrec tok/s':>13} {'HF tok/s':>10} {'ratio':>7}",
        ]

        def cell(value: float | None, width: int, fmt: str, missing: str = "noise") -> str:
            return f"{value:>{width}{fmt}}" if value is not None else f"{missing:>{width}}"

        peer_missing = "-" if self.peer_note else "noise"
        for r in self.rows:
            lines.append(
                f"{r.batch:>5} {cell(r.linrec_tokens_per_s, 13, '.1f')} "
                f"{cell(r.hf_tokens_per_s, 10, '.1f', peer_missing)} {cell(r.ratio, 6, '.2f', '-')}x"
            )
        if self.prefill_batch:
            lines += [
                "",
                f"prefill {self.prefill_batch} x {self.prefill_len} tokens: linrec "
                f"{cell(self.linrec_prefill_tokens_per_s, 1, '.0f', '-')} tok/s, peer "
                f"{cell(self.hf_prefill_tokens_per_s, 1, '.0f', '-')} tok/s, "
                f"ratio {cell(self.prefill_ratio, 1, '.2f', '-')}x",
            ]
        return "\n".join(lines)


def _rate(tokens: int, seconds: float | None) -> str:
    return f"{tokens / seconds:.1f} tok/s" if seconds else "noise"


def _decode_seconds(
    run: Callable[[Workload], float], prompts: list[list[int]], output_len: int, repeats: int = 3
) -> float | None:
    """Seconds spent decoding output_len tokens per request: the fastest of `repeats` (1 + output_len)-token
    runs minus the fastest 1-token run. None when noise swallows the difference (raise output_len)."""
    short = min(run(Workload(prompts, [1] * len(prompts))) for _ in range(repeats))
    long = min(run(Workload(prompts, [1 + output_len] * len(prompts))) for _ in range(repeats))
    return long - short if long > short else None


def _linrec_decode_seconds(
    path: str,
    *,
    prompts: list[list[int]],
    batch_sizes: tuple[int, ...],
    output_len: int,
    repeats: int,
    prefill_prompts: list[list[int]],
    progress: Callable[[str], object],
    **engine_kwargs,
) -> tuple[dict[int, float | None], bool, float]:
    """Decode seconds per batch size through linrec's engine, whether it replayed CUDA graphs, and the
    seconds of the prefill run. The engine is dropped on return, so the peer loads into freed memory."""
    from linrec.engine.llm import LLM

    llm = LLM(path, **engine_kwargs)
    cuda_graphs = llm.engine.can_replay_cuda_graphs
    run_linrec(llm, Workload(prompts[:2], [4] * len(prompts[:2])))  # warm-up: Triton compiles, allocator settles

    def linrec_run(w: Workload) -> float:
        return run_linrec(llm, w)[0]

    seconds = {}
    for b in batch_sizes:
        seconds[b] = _decode_seconds(linrec_run, prompts[:b], output_len, repeats)
        progress(f"linrec decode batch {b}: {_rate(b * output_len, seconds[b])}")
    prefill = min(linrec_run(Workload(prefill_prompts, [1] * len(prefill_prompts))) for _ in range(repeats))
    progress(f"linrec prefill: {_rate(sum(map(len, prefill_prompts)), prefill)}")
    return seconds, cuda_graphs, prefill


def run_decode(
    model: str | None = None,
    *,
    family: str = "liger_gla",
    size: str = "1.3b",
    batch_sizes: Sequence[int] | None = None,
    prompt_len: int = 16,
    output_len: int = 64,
    dtype: str = "auto",
    device: str = "auto",
    kernel_backend: str = "auto",
    enforce_eager: bool = False,
    seed: int = 0,
    repeats: int = 3,
    prefill_len: int | None = None,
    prefill_batch: int | None = None,
    progress: Callable[[str], object] | None = None,
) -> DecodeResult:
    """linrec's decode tokens/s beside its peer's generate at each batch size, on the same weights and dtype,
    and prefill tokens/s of prefill_batch prompts of prefill_len tokens (default 8 x 512; small: 2 x 32).
    progress, when given, gets a line per figure as it is measured (a run cut short still shows those).

    model: a Llama/Qwen2/Mistral/Liger/LoLCATs/mamba2/gla/gated_deltanet checkpoint directory; None writes (once)
    the random model of `family` at `size`. dtype auto is bfloat16 on CUDA and float32 on the CPU.
    """
    import random

    import torch

    from linrec.engine.core import resolve_device
    from linrec.models.loader import read_hf_config

    check_size(size)
    progress = progress or (lambda line: None)
    batch_sizes = check_batch_sizes(batch_sizes or DEFAULT_BATCH_SIZES[size])
    prefill_len = prefill_len or (32 if size == "small" else 512)
    prefill_batch = prefill_batch or (2 if size == "small" else 8)
    if min(prompt_len, output_len, repeats, prefill_len, prefill_batch) < 1:
        raise ValueError(
            f"expected prompt_len, output_len, repeats, prefill_len and prefill_batch >= 1, got {prompt_len}, "
            f"{output_len}, {repeats}, {prefill_len} and {prefill_batch}"
        )
    torch_device = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if torch_device.type == "cuda" else "float32"
    path = Path(model) if model is not None else decode_model_path(family, size)
    hf_config = read_hf_config(path)
    model_type = hf_config.get("model_type")
    linearize = "liger-gla" if model_type in LINEARIZABLE else None
    rng = random.Random(seed)
    vocab_size = int(hf_config["vocab_size"])
    largest = max(batch_sizes)
    prompts = [[rng.randrange(vocab_size) for _ in range(prompt_len)] for _ in range(largest)]
    prefill_prompts = [[rng.randrange(vocab_size) for _ in range(prefill_len)] for _ in range(prefill_batch)]
    pad_token_id = hf_config.get("pad_token_id") if isinstance(hf_config.get("pad_token_id"), int) else 0

    linrec_seconds, cuda_graphs, linrec_prefill = _linrec_decode_seconds(
        str(path),
        dtype=dtype,
        device=str(torch_device),
        kernel_backend=kernel_backend,
        max_num_seqs=max(largest, prefill_batch),
        max_num_batched_tokens=max(largest * prompt_len, prefill_batch * prefill_len),
        linearize=linearize,
        enforce_eager=enforce_eager,
        seed=seed,
        prompts=prompts,
        batch_sizes=batch_sizes,
        output_len=output_len,
        repeats=repeats,
        prefill_prompts=prefill_prompts,
        progress=progress,
    )
    if torch_device.type == "cuda":
        torch.cuda.empty_cache()

    peer_note = ""
    hf_model = None
    if model_type in FLA_FAMILIES:
        peer_name = f"fla.models {'GLAForCausalLM' if model_type == 'gla' else 'GatedDeltaNetForCausalLM'}.generate"
        try:
            hf_model = fla_peer(path, getattr(torch, dtype), torch_device)
        except ImportError as e:
            peer_note = f"peer skipped: fla.models is not importable ({e}); install flash-linear-attention"
    else:
        hf_model = hf_peer(path, hf_config, getattr(torch, dtype), torch_device)
        peer_name = f"HF {type(hf_model).__name__}.generate"

    hf_decode: dict[int, float | None] = dict.fromkeys(batch_sizes)
    hf_prefill = None
    if hf_model is not None:
        run_hf(hf_model, Workload(prompts[:2], [4] * len(prompts[:2])), 2, pad_token_id)

        def hf_run(w: Workload) -> float:
            return run_hf(hf_model, w, len(w.prompts), pad_token_id)[0]

        for b in batch_sizes:
            hf_decode[b] = _decode_seconds(hf_run, prompts[:b], output_len, repeats)
            progress(f"peer decode batch {b}: {_rate(b * output_len, hf_decode[b])}")
        hf_prefill = min(hf_run(Workload(prefill_prompts, [1] * prefill_batch)) for _ in range(repeats))
        progress(f"peer prefill: {_rate(prefill_batch * prefill_len, hf_prefill)}")

    rows = []
    for b in batch_sizes:
        hf_rate = b * output_len / hf_decode[b] if hf_decode[b] else None
        linrec_rate = b * output_len / linrec_seconds[b] if linrec_seconds[b] else None
        ratio = linrec_rate / hf_rate if linrec_rate and hf_rate else None
        rows.append(DecodeRow(b, linrec_rate, hf_rate, ratio))
    prefill_tokens = prefill_batch * prefill_len
    linrec_prefill_rate = prefill_tokens / linrec_prefill
    hf_prefill_rate = prefill_tokens / hf_prefill if hf_prefill else None
    return DecodeResult(
        model=str(path),
        family=str(served_model_type(hf_config, linearize)),
        size=size,
        device=torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu",
        dtype=dtype,
        kernel_backend=kernel_backend,
        cuda_graphs=cuda_graphs,
        prompt_len=prompt_len,
        output_len=output_len,
        hf_peer=peer_name,
        rows=rows,
        note=NOTE_GPU if torch_device.type == "cuda" else NOTE_CPU,
        peer_note=peer_note,
        prefill_len=prefill_len,
        prefill_batch=prefill_batch,
        linrec_prefill_tokens_per_s=linrec_prefill_rate,
        hf_prefill_tokens_per_s=hf_prefill_rate,
        prefill_ratio=linrec_prefill_rate / hf_prefill_rate if hf_prefill_rate else None,
    )

"""`linrec bench decode`: end-to-end decode tokens/s of linrec's engine against HF transformers `generate`.

At batch 1/8/64/256 on a 1.3B-class random model, against HF `generate` on the same weights (for Liger-GLA,
the ORIGINAL Llama with its KV cache). Decode alone is isolated by difference: a run generating 1 + n
tokens minus a run generating 1 token, with the same prompts, on each side.

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
    DEFAULT_BATCH_SIZES,
    LINEARIZABLE,
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

# Model overrides of the bench configs (bench/common.py): 1.3B-class (random weights, written once) and tiny.
DECODE_MODEL_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "1.3b": {
        # ~1.2B parameters: Llama shape with GQA (served as Liger-GLA, peer: this Llama under HF generate)
        "liger_gla": {
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "head_dim": 128,
        },
        # Mamba2-1.3B's shape
        "mamba2": {"hidden_size": 2048, "num_hidden_layers": 48, "num_heads": 64, "head_dim": 64, "state_size": 128},
    },
    "small": {
        "liger_gla": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 300,
        },
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
    },
}


def decode_model_path(family: str, size: str) -> Path:
    """The seeded random checkpoint of `family` at `size`, written on first use under linrec's cache dir."""
    from linrec import __version__

    check_size(size)
    name = f"decode-{family}-{size}-{__version__}-v{DECODE_FORMAT_VERSION}"
    return cached_bench_model(name, family, DECODE_MODEL_OVERRIDES.get(size, {}).get(family))


@dataclass
class DecodeRow:
    batch: int
    # decode tokens / s: batch * output_len / (t(1 + output_len) - t(1)); None when timing noise exceeded
    # the decode time (only seen on tiny CPU smoke runs)
    linrec_tokens_per_s: float | None
    hf_tokens_per_s: float | None
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def format(self) -> str:
        lines = [
            f"model: {self.model} ({self.family}, {self.size}, {self.dtype}) on {self.device}; kernel_backend "
            f"{self.kernel_backend}, CUDA graphs {'on' if self.cuda_graphs else 'off'}; {self.note}",
            f"decode tokens/s over {self.output_len} tokens per request after a {self.prompt_len}-token prompt; "
            f"peer {self.hf_peer}",
            "",
            f"{'batch':>5} {'linrec tok/s':>13} {'HF tok/s':>10} {'ratio':>7}",
        ]

        def cell(value: float | None, width: int, fmt: str) -> str:
            return f"{value:>{width}{fmt}}" if value is not None else f"{'noise':>{width}}"

        for r in self.rows:
            lines.append(
                f"{r.batch:>5} {cell(r.linrec_tokens_per_s, 13, '.1f')} {cell(r.hf_tokens_per_s, 10, '.1f')} "
                f"{cell(r.ratio, 6, '.2f')}x"
            )
        return "\n".join(lines)


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
    **engine_kwargs,
) -> tuple[dict[int, float | None], bool]:
    """Decode seconds per batch size through linrec's engine, and whether it replayed CUDA graphs. The
    engine is dropped on return, so the peer loads into freed memory."""
    from linrec.engine.llm import LLM

    llm = LLM(path, **engine_kwargs)
    cuda_graphs = llm.engine.can_replay_cuda_graphs
    run_linrec(llm, Workload(prompts[:2], [4] * len(prompts[:2])))  # warm-up: Triton compiles, allocator settles

    def linrec_run(w: Workload) -> float:
        return run_linrec(llm, w)[0]

    seconds = {b: _decode_seconds(linrec_run, prompts[:b], output_len, repeats) for b in batch_sizes}
    return seconds, cuda_graphs


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
) -> DecodeResult:
    """linrec's decode tokens/s beside HF generate's at each batch size, on the same weights and dtype.

    model: a Llama/Qwen2/Mistral/Liger/mamba2 checkpoint directory; None writes (once) the random model of
    `family` at `size`. dtype auto is bfloat16 on CUDA and float32 on the CPU.
    """
    import random

    import torch

    from linrec.engine.core import resolve_device
    from linrec.models.loader import read_hf_config

    check_size(size)
    batch_sizes = check_batch_sizes(batch_sizes or DEFAULT_BATCH_SIZES[size])
    if prompt_len < 1 or output_len < 1 or repeats < 1:
        raise ValueError(
            f"expected prompt_len, output_len and repeats >= 1, got {prompt_len}, {output_len} and {repeats}"
        )
    torch_device = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if torch_device.type == "cuda" else "float32"
    path = Path(model) if model is not None else decode_model_path(family, size)
    hf_config = read_hf_config(path)
    linearize = "liger-gla" if hf_config.get("model_type") in LINEARIZABLE else None
    rng = random.Random(seed)
    vocab_size = int(hf_config["vocab_size"])
    largest = max(batch_sizes)
    prompts = [[rng.randrange(vocab_size) for _ in range(prompt_len)] for _ in range(largest)]
    pad_token_id = hf_config.get("pad_token_id") if isinstance(hf_config.get("pad_token_id"), int) else 0

    linrec_seconds, cuda_graphs = _linrec_decode_seconds(
        str(path),
        dtype=dtype,
        device=str(torch_device),
        kernel_backend=kernel_backend,
        max_num_seqs=largest,
        max_num_batched_tokens=largest * prompt_len,
        linearize=linearize,
        enforce_eager=enforce_eager,
        seed=seed,
        prompts=prompts,
        batch_sizes=batch_sizes,
        output_len=output_len,
        repeats=repeats,
    )
    if torch_device.type == "cuda":
        torch.cuda.empty_cache()

    hf_model = hf_peer(path, hf_config, getattr(torch, dtype), torch_device)
    peer_name = f"HF {type(hf_model).__name__}.generate"
    run_hf(hf_model, Workload(prompts[:2], [4] * len(prompts[:2])), 2, pad_token_id)

    def hf_run(w: Workload) -> float:
        return run_hf(hf_model, w, len(w.prompts), pad_token_id)[0]

    rows = []
    for b in batch_sizes:
        hf_seconds = _decode_seconds(hf_run, prompts[:b], output_len, repeats)
        hf_rate = b * output_len / hf_seconds if hf_seconds else None
        linrec_rate = b * output_len / linrec_seconds[b] if linrec_seconds[b] else None
        ratio = linrec_rate / hf_rate if linrec_rate and hf_rate else None
        rows.append(DecodeRow(b, linrec_rate, hf_rate, ratio))
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
    )

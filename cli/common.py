"""What the subcommands share: the model and engine flags, whose destinations are EngineConfig's field names.

Nothing here imports torch: `linrec --help` must stay fast.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

# Literal copies so that parsing imports no torch; tests check them against their sources
# (models.loader.DTYPE_CHOICES, kernels.backend.BACKENDS, models.registry.DEMO_FAMILIES).
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
KERNEL_BACKENDS = ("auto", "triton", "torch")
DEMO_FAMILIES = ("liger_gla", "gla", "gated_deltanet", "mamba2")
LINEARIZE_CHOICES = ("liger-gla",)
MODEL_ARG_FIELDS = ("model", "dtype", "device", "kernel_backend", "linearize", "merge_lora")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags every model-running subcommand shares; dest names equal EngineConfig's fields."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="local HF-format model directory (default: a tiny demo Liger-GLA model, created on first use "
        "under $LINREC_CACHE_DIR or ~/.cache/linrec)",
    )
    group.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto = config.json's torch_dtype")
    group.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    group.add_argument(
        "--kernel-backend", dest="kernel_backend", default="auto", choices=KERNEL_BACKENDS, help="op implementation"
    )
    group.add_argument(
        "--linearize",
        default=None,
        choices=LINEARIZE_CHOICES,
        help="load a Llama/Qwen2/Mistral checkpoint as Liger-GLA (same weights, new config)",
    )
    group.add_argument(
        "--merge-lora", dest="merge_lora", default=None, metavar="DIR", help="merge a PEFT LoRA adapter at load"
    )


def parse_state_memory(text: str) -> int | float:
    """'0.5' -> a fraction of free memory; '2GiB', '512MiB', '1e9' or '123456' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    lowered = text.strip().lower()
    factor = 1
    for suffix, unit in units.items():
        if lowered.endswith(suffix):
            lowered, factor = lowered[: -len(suffix)], unit
            break
    try:
        value = float(lowered) * factor
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # 'lots', 'inf', 'nan', '1e400GiB'
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] or a byte count such as 2GiB, got {text!r}")
    return value if factor == 1 and value <= 1.0 else int(value)


ENGINE_ARG_FIELDS = (
    "max_num_seqs",
    "max_num_batched_tokens",
    "state_memory",
    "max_waiting_requests",
    "max_model_len",
    "long_prefill_token_threshold",
    "max_long_partial_prefills",
    "enable_prefix_caching",
    "prefix_grouping",
    "max_cached_states",
    "seed",
    "enforce_eager",
)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Scheduling and memory flags; dest names equal EngineConfig's fields (defaults are its defaults)."""
    group = parser.add_argument_group("engine")
    group.add_argument("--max-num-seqs", dest="max_num_seqs", type=int, default=64, help="requests running at once")
    group.add_argument(
        "--max-num-batched-tokens",
        dest="max_num_batched_tokens",
        type=int,
        default=2048,
        help="token budget per step (decode tokens first, then prefill chunks)",
    )
    group.add_argument(
        "--state-memory",
        dest="state_memory",
        type=parse_state_memory,
        default=0.5,
        help="memory for request states: a fraction of free memory (0.5) or bytes (2GiB)",
    )
    group.add_argument("--max-waiting-requests", dest="max_waiting_requests", type=int, default=4096)
    group.add_argument(
        "--max-model-len",
        dest="max_model_len",
        type=int,
        default=None,
        help="prompt + output tokens at most (default: the checkpoint's max_position_embeddings, else 32768; "
        "states do not grow, so raise it as far as time allows)",
    )
    group.add_argument(
        "--long-prefill-token-threshold",
        dest="long_prefill_token_threshold",
        type=int,
        default=None,
        help="a prompt with more tokens left to prefill is long: it takes at most this many tokens a step before "
        "short prompts had theirs (default: max-num-batched-tokens / 4; 0: strict arrival order)",
    )
    group.add_argument(
        "--max-long-partial-prefills",
        dest="max_long_partial_prefills",
        type=int,
        default=1,
        help="long prompts prefilling at once; others wait while short prompts pass them",
    )
    group.add_argument(
        "--enable-prefix-caching",
        dest="enable_prefix_caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prefix-state cache: reuse state snapshots of shared prompt prefixes (exact; on by default)",
    )
    group.add_argument(
        "--prefix-grouping",
        dest="prefix_grouping",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prefill each prefix shared by waiting prompts once and run its group together (BatchLLM-style)",
    )
    group.add_argument(
        "--max-cached-states",
        dest="max_cached_states",
        type=int,
        default=256,
        help="prefix snapshot rows at most (taken from --state-memory after the running slots)",
    )
    group.add_argument("--seed", type=int, default=0, help="the engine generator's seed (requests may carry their own)")
    group.add_argument(
        "--enforce-eager",
        dest="enforce_eager",
        action="store_true",
        help="no CUDA graphs: run decode steps eagerly (graphs are captured only on CUDA)",
    )


def engine_config_from_args(args: argparse.Namespace):
    from linrec.engine.config import EngineConfig

    return EngineConfig(**model_kwargs(args), **{name: getattr(args, name) for name in ENGINE_ARG_FIELDS})


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The model flags of parsed `args` as EngineConfig keyword arguments."""
    return {name: getattr(args, name) for name in MODEL_ARG_FIELDS}

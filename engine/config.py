"""EngineConfig: every engine knob in one frozen, validated dataclass.

Each field carries its command-line help in `metadata` (and, where plain int/float/str conversion is not
enough, its `parse` function, `choices` or `metavar`): the `linrec` command builds its engine flags from
these fields (cli/common.py), so a default or a choice is written here and nowhere else. Importing this
module loads no torch (tests/engine/test_config.py checks), so that `linrec --help` stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from linrec.kernels.backend import BACKENDS
from linrec.models.loader import DTYPE_CHOICES, LINEARIZE_CHOICES

# auto: warm up on CUDA only (on the CPU nothing is compiled: the torch kernels are precompiled and
# Triton's interpreter compiles nothing), on: everywhere, off: never (a request may then wait on a compiler).
WARMUP_CHOICES = ("auto", "on", "off")

_BYTE_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_byte_size(text: str) -> tuple[float, bool]:
    """'2GiB' -> (2147483648.0, True), '0.5' -> (0.5, False): a finite number and whether it had a unit.
    ValueError for anything else ('lots', 'inf', 'nan', '1e400GiB')."""
    lowered = text.strip().lower()
    factor = 1
    for suffix, unit in _BYTE_UNITS.items():
        if lowered.endswith(suffix):
            lowered, factor = lowered[: -len(suffix)], unit
            break
    try:
        value = float(lowered) * factor
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"expected a number with an optional unit such as 2GiB, got {text!r}")
    return value, factor != 1


def parse_state_memory(text: str) -> int | float:
    """'0.5' -> a fraction of free memory; '2GiB', '512MiB', '1e9' or '123456' -> bytes."""
    try:
        value, has_unit = parse_byte_size(text)
    except ValueError:
        raise ValueError(f"expected a fraction in (0, 1] or a byte count such as 2GiB, got {text!r}") from None
    return value if not has_unit and value <= 1.0 else int(value)


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1e9' or '123456' -> bytes."""
    try:
        value, _ = parse_byte_size(text)
    except ValueError:
        raise ValueError(f"expected a byte count such as 2GiB, got {text!r}") from None
    return int(value)


@dataclass(frozen=True)
class EngineConfig:
    # The model: what to load and how.
    model: str | None = field(
        default=None,
        metadata={
            "help": "local HF-format model directory (default: a tiny demo Liger-GLA model, created on first use "
            "under $LINREC_CACHE_DIR or ~/.cache/linrec)",
            "metavar": "DIR",
        },
    )
    dtype: str = field(default="auto", metadata={"help": "auto = config.json's torch_dtype", "choices": DTYPE_CHOICES})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available, else cpu), cpu, cuda, cuda:N"})
    kernel_backend: str = field(
        default="auto", metadata={"help": "op implementation (auto: triton on CUDA, else torch)", "choices": BACKENDS}
    )
    linearize: str | None = field(
        default=None,
        metadata={
            "help": "load a Llama/Qwen2/Mistral checkpoint as Liger-GLA (same weights, new config)",
            "choices": LINEARIZE_CHOICES,
        },
    )
    merge_lora: str | None = field(
        default=None,
        metadata={"help": "merge a PEFT LoRA adapter directory into the weights at load", "metavar": "DIR"},
    )
    route_state_rows: int = field(
        default=0,
        metadata={
            "help": "request state rows per layer beyond --max-num-seqs, from --state-memory (docs/routing.md): "
            "routes that repeat a layer hold a second row of it, so without these repeats run fewer requests "
            "at once"
        },
    )
    router: str | None = field(
        default=None,
        metadata={
            "help": "layer routers (docs/routing.md) that decide a request's layer_route 'auto'",
            "metavar": "DIR",
        },
    )
    # Per-request LoRA adapters (engine/adapters.py): max_loras device slots of rank up to max_lora_rank beside
    # every projection, and a host tier of the last max_cpu_loras adapters read. Off, no slot exists and a
    # projection costs what it did.
    enable_lora: bool = field(
        default=False, metadata={"help": "serve LoRA adapters per request (the request's model names one)"}
    )
    max_loras: int = field(
        default=4, metadata={"help": "adapters resident on the device at once, LoRA and sparse (the device slots)"}
    )
    max_lora_rank: int = field(default=16, metadata={"help": "the largest adapter rank a slot holds"})
    max_cpu_loras: int | None = field(
        default=None, metadata={"help": "adapters kept in host memory, least recently used out (default: max-loras)"}
    )
    # Scheduling and memory.
    max_num_seqs: int = field(default=64, metadata={"help": "requests running at once, each holding a state slot"})
    max_num_batched_tokens: int = field(
        default=2048, metadata={"help": "token budget per step (decode tokens first, then prefill chunks)"}
    )
    # Memory for request states: bytes (int) or a fraction of free device memory (float). It buys
    # min(budget // state_bytes_per_request, max_num_seqs) slots, whatever the context length.
    state_memory: int | float = field(
        default=0.5,
        metadata={
            "help": "memory for request states: a fraction of free memory (0.5) or bytes (2GiB)",
            "parse": parse_state_memory,
            "metavar": "FRACTION|BYTES",
        },
    )
    max_waiting_requests: int = field(
        default=4096, metadata={"help": "queued requests at most; beyond, a request is refused (HTTP 429)"}
    )
    # States do not grow with length, but a request's time does.
    max_model_len: int | None = field(
        default=None,
        metadata={
            "help": "prompt + output tokens at most (default: the checkpoint's max_position_embeddings, else 32768; "
            "states do not grow, so raise it as far as time allows)"
        },
    )
    # Fair admission (see engine/scheduler.py): a prompt with more than this many tokens left to prefill is
    # long; while max_long_partial_prefills long prompts prefill, other long ones wait and short ones go
    # first, and a long prefill takes at most this many tokens a step before everyone else had theirs.
    long_prefill_token_threshold: int | None = field(
        default=None,
        metadata={
            "help": "a prompt with more tokens left to prefill is long: it takes at most this many tokens a step "
            "before short prompts had theirs (default: max-num-batched-tokens / 4; 0: strict arrival order)"
        },
    )
    max_long_partial_prefills: int = field(
        default=1, metadata={"help": "long prompts prefilling at once; others wait while short prompts pass them"}
    )
    # Prefix-state cache: snapshots of whole states at exact token positions, reused by later prompts
    # with the same prefix (one row copy per hit). On by default, as in vLLM: a hit is exact (the state
    # after the same tokens), so outputs do not change, and without sharing it costs a row copy at the
    # end of a prompt or request and memory the budget leaves after the running slots.
    enable_prefix_caching: bool = field(
        default=True,
        metadata={"help": "prefix-state cache: reuse state snapshots of shared prompt prefixes (exact outputs)"},
    )
    # Global prefix grouping (BatchLLM on states): shared prefixes among all waiting prompts are
    # prefilled once and their groups admitted together, ordered by decode-to-prefill ratio. False
    # keeps arrival order and only reuses what earlier requests left in the cache.
    prefix_grouping: bool = field(
        default=True,
        metadata={
            "help": "prefill each prefix shared by waiting prompts once and run its group together (BatchLLM-style)"
        },
    )
    # Snapshot rows come out of state_memory after the max_num_seqs running slots:
    # rows = min(budget // state_bytes_per_request - slots, max_cached_states).
    max_cached_states: int = field(
        default=256,
        metadata={"help": "prefix snapshot rows at most (taken from --state-memory after the running slots)"},
    )
    # Stored states (engine/state_store.py, docs/responses.md): a finished request's end state kept under an id, so
    # that a continuation (the Responses API's previous_response_id) prefills only its new tokens. Tiers: rows of
    # the pool (taken from state_memory after the running slots, before the prefix snapshots), host memory, and a
    # directory, which also survives a restart.
    max_device_states: int = field(
        default=16,
        metadata={
            "help": "stored states kept in pool rows at most (from --state-memory after the running slots and "
            "prefix snapshot rows)"
        },
    )
    state_store_host_bytes: int = field(
        default=1 << 30,
        metadata={
            "help": "host memory for stored states pushed out of the pool (bytes; 2GiB); beyond, the least "
            "recently used go to --state-store, or are dropped without one",
            "parse": parse_bytes,
            "metavar": "BYTES",
        },
    )
    state_store: str | None = field(
        default=None,
        metadata={
            "help": "directory for stored states pushed out of host memory and for every stored state at "
            "shutdown, so that conversations survive a restart",
            "metavar": "DIR",
        },
    )
    state_store_max_bytes: int = field(
        default=8 << 30,
        metadata={
            "help": "bytes --state-store may hold; beyond, the least recently used states are deleted",
            "parse": parse_bytes,
            "metavar": "BYTES",
        },
    )
    state_ttl: float = field(
        default=30 * 24 * 3600.0,
        metadata={"help": "seconds a stored state lives after it was stored (default 30 days, as OpenAI's)"},
    )
    seed: int = field(default=0, metadata={"help": "the engine generator's seed (requests may carry their own)"})
    # True: every step runs eagerly. False: on CUDA, decode-only steps replay CUDA graphs captured per
    # batch-size bucket at start-up (engine/cuda_graphs.py); on the CPU there are no graphs either way.
    enforce_eager: bool = field(
        default=False,
        metadata={"help": "no CUDA graphs: run decode steps eagerly (graphs are captured only on CUDA)"},
    )
    # Before the engine reports ready, dummy forwards and sampler calls on the null slot compile and tune
    # every kernel a request can reach (engine/warmup.py).
    warmup: str = field(
        default="auto",
        metadata={
            "help": "compile and tune every kernel before serving: auto (on CUDA only), on, off",
            "choices": WARMUP_CHOICES,
        },
    )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"expected dtype in {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.kernel_backend not in BACKENDS:
            raise ValueError(f"expected kernel_backend in {BACKENDS}, got {self.kernel_backend!r}")
        if self.linearize is not None and self.linearize not in LINEARIZE_CHOICES:
            raise ValueError(f"expected linearize in {LINEARIZE_CHOICES} or None, got {self.linearize!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"expected device auto, cpu, cuda or cuda:N, got {self.device!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                "expected max_num_batched_tokens >= max_num_seqs (each running request decodes every step), "
                f"got {self.max_num_batched_tokens} < {self.max_num_seqs}"
            )
        if isinstance(self.state_memory, bool) or not isinstance(self.state_memory, int | float):
            raise ValueError(f"expected state_memory as bytes (int) or a fraction (float), got {self.state_memory!r}")
        if isinstance(self.state_memory, float) and not 0.0 < self.state_memory <= 1.0:
            raise ValueError(f"expected a state_memory fraction in (0, 1], got {self.state_memory}")
        if isinstance(self.state_memory, int) and self.state_memory < 1:
            raise ValueError(f"expected state_memory >= 1 byte, got {self.state_memory}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"expected max_model_len >= 2 or None, got {self.max_model_len}")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 0:
            raise ValueError(
                f"expected long_prefill_token_threshold >= 0 or None, got {self.long_prefill_token_threshold}"
            )
        if self.max_long_partial_prefills < 1:
            raise ValueError(f"expected max_long_partial_prefills >= 1, got {self.max_long_partial_prefills}")
        if self.warmup not in WARMUP_CHOICES:
            raise ValueError(f"expected warmup in {WARMUP_CHOICES}, got {self.warmup!r}")
        for name in ("max_loras", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"expected max_cpu_loras >= max_loras={self.max_loras}, got {self.max_cpu_loras}")
        if self.max_cached_states < 0:
            raise ValueError(f"expected max_cached_states >= 0, got {self.max_cached_states}")
        for name in ("max_device_states", "state_store_host_bytes", "state_store_max_bytes", "route_state_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"expected {name} as an int >= 0, got {value!r}")
        if isinstance(self.state_ttl, bool) or not isinstance(self.state_ttl, int | float) or not self.state_ttl > 0:
            raise ValueError(f"expected state_ttl > 0 (seconds), got {self.state_ttl!r}")

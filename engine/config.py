"""EngineConfig: every engine knob in one frozen, validated dataclass (CLI flags map onto its fields).

Importing it loads no torch (tests/engine/test_config.py checks), so that `linrec --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from linrec.kernels.backend import BACKENDS
from linrec.models.loader import DTYPE_CHOICES, LINEARIZE_CHOICES


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # local HF-format directory; None = the tiny demo model (created on first use)
    dtype: str = "auto"  # auto = the checkpoint's torch_dtype
    device: str = "auto"  # auto = cuda when available, else cpu
    kernel_backend: str = "auto"  # auto | triton | torch
    max_num_seqs: int = 64  # requests holding a state slot at once
    max_num_batched_tokens: int = 2048  # tokens per step: decode tokens first, prefill chunks fill the rest
    # Memory for request states: bytes (int) or a fraction of free device memory (float). It buys
    # min(budget // state_bytes_per_request, max_num_seqs) slots, whatever the context length.
    state_memory: int | float = 0.5
    max_waiting_requests: int = 4096  # beyond this add_request raises QueueFullError (HTTP 429)
    # Longest prompt + output accepted. None: the checkpoint's max_position_embeddings, else 32768. States do
    # not grow with length, but a request's time does; raise it as far as you like.
    max_model_len: int | None = None
    # Fair admission (see engine/scheduler.py): a prompt with more than this many tokens left to prefill is
    # long; while max_long_partial_prefills long prompts prefill, other long ones wait and short ones go
    # first, and a long prefill takes at most this many tokens a step before everyone else had theirs.
    # None: max_num_batched_tokens // 4; 0: no prompt is long (strict arrival order).
    long_prefill_token_threshold: int | None = None
    max_long_partial_prefills: int = 1
    # Prefix-state cache: snapshots of whole states at exact token positions, reused by later prompts
    # with the same prefix (one row copy per hit). On by default, as in vLLM: a hit is exact (the state
    # after the same tokens), so outputs do not change, and without sharing it costs a row copy at the
    # end of a prompt or request and memory the budget leaves after the running slots.
    enable_prefix_caching: bool = True
    # Global prefix grouping (BatchLLM on states): shared prefixes among all waiting prompts are
    # prefilled once and their groups admitted together, ordered by decode-to-prefill ratio. False
    # keeps arrival order and only reuses what earlier requests left in the cache.
    prefix_grouping: bool = True
    # Snapshot rows at most. They come out of state_memory after the max_num_seqs running slots:
    # rows = min(budget // state_bytes_per_request - slots, max_cached_states).
    max_cached_states: int = 256
    seed: int = 0  # the engine's generator for requests without their own seed
    linearize: str | None = None  # "liger-gla": load a Llama/Qwen2/Mistral checkpoint as Liger-GLA
    merge_lora: str | None = None  # a PEFT LoRA directory merged into the weights at load
    # True: every step runs eagerly. False: on CUDA, decode-only steps replay CUDA graphs captured per
    # batch-size bucket at start-up (engine/cuda_graphs.py); on the CPU there are no graphs either way.
    enforce_eager: bool = False

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
        if self.max_cached_states < 0:
            raise ValueError(f"expected max_cached_states >= 0, got {self.max_cached_states}")

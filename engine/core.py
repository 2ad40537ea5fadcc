"""EngineCore: owns the model, the state pool, the scheduler and the runner; one step at a time."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from linrec.engine.config import EngineConfig
from linrec.engine.cuda_graphs import DecodeGraphs
from linrec.engine.output import OutputProcessor, SampleDelta
from linrec.engine.request import Request, RequestStatus
from linrec.engine.runner import Runner
from linrec.engine.sampling_params import SamplingParams
from linrec.engine.scheduler import Scheduler
from linrec.engine.state_pool import StatePool, num_slots_for_budget

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available")
    return torch.device(device)


def eos_token_ids_of(tokenizer, model) -> tuple[int, ...]:
    """EOS ids from the tokenizer and from the model's config (Llama-3 lists several)."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(model.config, "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, list | tuple):
        ids.update(int(t) for t in config_eos)
    return tuple(sorted(ids))


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics; read from another thread, so each count may be one step stale."""

    num_running: int  # requests holding a slot
    num_waiting: int  # requests queued for a slot
    num_slots_used: int
    num_slots_total: int
    state_bytes_per_request: int  # constant in context length


class EngineCore:
    def __init__(self, config: EngineConfig, progress: bool = False):
        from linrec.models.demo import default_model_path
        from linrec.models.loader import load_model
        from linrec.models.tokenizer import load_tokenizer

        self.config = config
        self.device = resolve_device(config.device)
        self.model_path = str(config.model) if config.model is not None else str(default_model_path())
        self.model = load_model(
            self.model_path,
            dtype=config.dtype,
            device=self.device,
            kernel_backend=config.kernel_backend,
            linearize=config.linearize,
            merge_lora=config.merge_lora,
            progress=progress,
        )
        self.tokenizer = load_tokenizer(self.model_path)
        self.vocab_size = self.model.config.vocab_size
        bytes_per_request = self.bytes_per_request = self.model.state_bytes_per_request()
        num_slots = min(config.max_num_seqs, num_slots_for_budget(config.state_memory, bytes_per_request, self.device))
        self.pool = StatePool(self.model, num_slots, self.device)
        self.eos_token_ids = eos_token_ids_of(self.tokenizer, self.model)
        self.scheduler = Scheduler(
            num_slots=num_slots,
            max_num_seqs=min(config.max_num_seqs, num_slots),
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_waiting_requests=config.max_waiting_requests,
            eos_token_ids=self.eos_token_ids,
        )
        decode_graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            decode_graphs = DecodeGraphs(self.model, self.pool, self.device, min(config.max_num_seqs, num_slots))
            decode_graphs.capture()
        self.runner = Runner(
            self.model, self.pool, self.device, self.vocab_size, self.eos_token_ids, config.seed, decode_graphs
        )
        self.outputs = OutputProcessor(self.tokenizer)
        logger.info(
            "linrec engine: %s on %s, %d state slots x %d bytes (constant per request)",
            self.model_path,
            self.device,
            num_slots,
            bytes_per_request,
        )

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Validate and queue one prompt (with its n-1 forks). Raises ValueError or QueueFullError."""
        if not prompt_token_ids:
            raise ValueError("expected a non-empty prompt, got 0 tokens")
        bad = [t for t in prompt_token_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise ValueError(f"expected token ids in [0, {self.vocab_size}), got {bad[0]}")
        limit = self.config.max_model_len
        if limit is not None and len(prompt_token_ids) + params.max_tokens > limit:
            raise ValueError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len={limit}"
            )
        bad_bias = [t for t in (params.logit_bias or {}) if not 0 <= int(t) < self.vocab_size]
        if bad_bias:
            raise ValueError(f"expected logit_bias token ids in [0, {self.vocab_size}), got {bad_bias[0]}")
        prompt = [int(t) for t in prompt_token_ids]
        parent = Request(request_id, prompt, params)
        parent.children = [
            Request(f"{request_id}#{i}", prompt, params, sample_index=i, parent_id=request_id)
            for i in range(1, params.n)
        ]
        self.scheduler.add_request(parent)
        self.outputs.add(parent)

    def abort(self, request_ids: list[str]) -> None:
        """Cancel prompts by id (all their samples); their slots are free before the next step."""
        wanted = set(request_ids)
        # A prompt's samples: the parent and its children, any of which may outlive the parent.
        engine_ids = [rid for rid, r in self.scheduler.requests.items() if rid in wanted or r.parent_id in wanted]
        self.scheduler.abort(engine_ids)
        self.outputs.abort(engine_ids)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        allocator = self.scheduler.allocator
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_slots_used=allocator.num_used,
            num_slots_total=allocator.num_slots,
            state_bytes_per_request=self.bytes_per_request,
        )

    def step(self) -> list[SampleDelta]:
        out = self.scheduler.schedule()
        result = self.runner.execute(out)
        updates = self.scheduler.update(out, result)
        deltas, stopped = self.outputs.process(updates)
        for request, stop_string in stopped:
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED, stop_reason=stop_string)
        return deltas

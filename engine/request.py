"""A request's life in the engine, and what the engine hands back for it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from linrec.engine.prefix_cache import PrefixKey
from linrec.engine.sampling_params import SamplingParams
from linrec.models.lora import LoraWeights

if TYPE_CHECKING:
    from linrec.models.sparse import SparseWeights


@dataclass(frozen=True)
class EngineRequest:
    """What every front end (LLM, AsyncLLM and through it the server) hands the engine for one prompt: plain
    data, validated once, by EngineCore.add_request, against the model it will run on."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    lora_name: str | None = None  # a LoRA adapter known to the engine's registry; None: the base model
    # One count per layer: 0 skip, 1 execute, 2 repeat (DESIGN.md, layer routing); "auto": the model's routers
    # decide it at prefill (--router); None: every layer once.
    layer_route: tuple[int, ...] | str | None = None
    route_skip_bias: float = 0.0  # with "auto": added to every router's skip logit (> 0 skips more)
    # Prefix-cache states are shared only between requests with the same salt (vLLM's cache_salt), so that
    # tenants cannot probe each other's prompts.
    cache_salt: str | None = None
    # Stored states (engine/state_store.py, docs/responses.md): keep the end state under this id when the request
    # completes (n must be 1); continue from the state stored under this id (prompt_token_ids are then only the
    # new tokens: the stored conversation comes first); JSON-able metadata kept with the stored state.
    store_state: str | None = None
    resume_state: str | None = None
    state_meta: dict | None = None


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no slot
    RUNNING = "running"  # holds a slot; prefilling or decoding
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens reached
    FINISHED_ABORTED = "abort"  # cancelled by the caller
    FINISHED_ERROR = "error"  # an engine step failed on it (traced to this request); the engine went on

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass
class Request:
    """One sequence the scheduler runs. An n > 1 prompt becomes one parent and n-1 children that
    fork from the parent's slot once the prompt is prefilled."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    sample_index: int = 0  # which of the prompt's n samples this is
    parent_id: str | None = None  # children: the request whose prefilled state they copy
    children: list[Request] = field(default_factory=list)  # parent: the n-1 forks waiting on its prefill
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    slot_id: int = 0  # 0 = holds no slot (the null slot)
    num_computed_tokens: int = 0  # tokens whose effect is folded into the state in slot_id
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    first_scheduled_time: float | None = None  # time.monotonic() when it got a slot (queue time ends)
    cache_key: PrefixKey | None = None  # prefix-cache namespace (model, adapter, route, salt); None = not cached
    num_cached_tokens: int = 0  # prompt tokens loaded from a prefix snapshot instead of prefilled
    num_failed_steps: int = 0  # engine steps that failed while running this request (see Scheduler.recover)
    lora: LoraWeights | None = None  # its LoRA adapter, held to the end even if the name is unloaded meanwhile
    sparse: SparseWeights | None = None  # its sparse (SHiRA) adapter, scattered into the weights while it runs
    adapter_slot: int = -1  # the device adapter slot it pins while running (-1: none)
    # Its layer route (one count per layer: 0 skip, 1 execute, 2 repeat), None for every layer once.
    layer_route: tuple[int, ...] | None = None
    # A routed request's rows of the pool, layer by layer (engine/state_pool.py's RowAllocator; its slot_id is 0):
    # the row each layer it executes keeps its state in (0: skipped), and the second-lane row of each layer it
    # repeats, where the second pass keeps its state (0: none). None while it holds none, and for a request
    # without a route, which holds slot_id in every layer.
    layer_rows: tuple[int, ...] | None = None
    lane_rows: tuple[int, ...] | None = None
    # layer_route "auto" not decided yet: the skip bias its routers get at its first step (None: decided/given).
    auto_route_bias: float | None = None
    # A continuation: the stored state (engine/state_store.py's StoredState) it loads at admission, pinned until
    # then; and the id its own end state is stored under when it completes (with its metadata).
    resume: object | None = None
    store_id: str | None = None
    store_key: object | None = None  # engine/state_store.py's StateKey: model, adapter, tenant
    state_meta: dict | None = None

    def row_counts(self, num_layers: int) -> tuple[int, ...] | None:
        """The rows it needs in each layer, or None for one row in every layer (no route, or all ones): its route's
        counts, and two everywhere while "auto" is undecided (it may repeat any layer)."""
        if self.auto_route_bias is not None:
            return (2,) * num_layers
        if self.layer_route is None or all(count == 1 for count in self.layer_route):
            return None
        return self.layer_route

    @property
    def state_rows(self) -> int | tuple[int, ...] | None:
        """Where its state is (Rows: slot_id, or its per-layer rows), None while it holds none."""
        if self.layer_rows is not None:
            return self.layer_rows
        return self.slot_id or None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens not yet folded into the state: the prompt's rest while prefilling, 1 while decoding (the
        last sampled token), every token when the state is rebuilt after a failed step. The request
        samples again once they are all fed."""
        return self.num_tokens - self.num_computed_tokens

    def token_ids_to_compute(self, num_tokens: int) -> list[int]:
        """The next `num_tokens` tokens not yet folded into the state (they may span prompt and output)."""
        start, end, num_prompt = self.num_computed_tokens, self.num_computed_tokens + num_tokens, self.num_prompt_tokens
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.is_finished else None


@dataclass
class Logprob:
    """A token's log probability under the model's raw distribution, with the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class CompletionOutput:
    """One of a prompt's n samples."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[Logprob] | None
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string, None for EOS/length
    layer_route: tuple[int, ...] | None = None  # the layer route it ran (given, or decided by the routers)


@dataclass
class RequestOutput:
    """What LLM.generate returns per prompt; AsyncLLM streams these with only the new text and tokens."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool

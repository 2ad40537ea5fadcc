"""The engine client boundary: everything a front end (the HTTP server) may ask of an engine, as one typed
protocol. AsyncLLM implements it in process; server/ray_serve.py implements it over Ray Serve replicas. The
server holds an EngineClient and nothing else of the engine: no EngineCore, no scheduler, no pool.

Every method is safe to call on the event loop: the synchronous ones (stats, health, the adapter list, abort)
answer from what the client already knows or queue work, and never wait on an engine step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

# The errors a client raises, importable from here: the boundary is this module.
from linrec.engine.adapters import AdapterInfo, AdapterNotFoundError
from linrec.engine.core import EngineStats
from linrec.engine.output import SampleDelta
from linrec.engine.sampling_params import InvalidRequestError, SamplingParams
from linrec.engine.scheduler import QueueFullError
from linrec.engine.state_store import StateInfo, StateNotFoundError

__all__ = [
    "AdapterNotFoundError",
    "EngineClient",
    "EngineDeadError",
    "EngineError",
    "EngineInfo",
    "InvalidRequestError",
    "QueueFullError",
    "RequestFailedError",
    "StateNotFoundError",
]


class EngineError(RuntimeError):
    """The engine could not finish a request for a reason of its own (HTTP 500). The message never quotes
    a request's content: the same error may reach many clients, and only their own input is theirs to see."""


class EngineDeadError(EngineError):
    """The engine stopped on an unexpected error; every open and later request gets this."""


class RequestFailedError(EngineError):
    """An error inside an engine step was traced to this request: it ended, and the engine goes on."""


@dataclass(frozen=True)
class EngineInfo:
    """What does not change while an engine serves: what the server sizes and checks requests by."""

    model_path: str  # the checkpoint (what /v1/models calls the root)
    max_model_len: int  # prompt + output tokens at most
    vocab_size: int  # token ids the model takes: [0, vocab_size)
    num_layers: int  # decoder layers (a layer route has one count per layer)
    serves_adapters: bool  # --enable-lora: adapters can be loaded and named by requests
    num_replicas: int = 1  # engines behind this client


@runtime_checkable
class EngineClient(Protocol):
    """One engine, or several behind one client, as the server sees it."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def info(self) -> EngineInfo: ...

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        layer_route: tuple[int, ...] | str | None = None,
        route_skip_bias: float = 0.0,
        store_state: str | None = None,
        resume_state: str | None = None,
        state_meta: dict | None = None,
    ) -> AsyncIterator[SampleDelta]:
        """The request's deltas until all its samples finish; closing the iterator early aborts it. Raises
        InvalidRequestError (and its StateNotFoundError), QueueFullError or AdapterNotFoundError before the first
        delta, EngineError after."""
        ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats:
        """A snapshot for metrics. In process: each count may be one step stale; several engines (server/ray_serve.py):
        their sum, from a poll twice a second."""
        ...

    def check_health(self) -> None:
        """Raise EngineDeadError unless the engine can serve."""
        ...

    def has_lora_adapter(self, lora_name: str) -> bool: ...

    def list_lora_adapters(self) -> list[AdapterInfo]: ...

    async def load_lora_adapter(self, lora_name: str, lora_path: str) -> AdapterInfo: ...

    async def remove_lora_adapter(self, lora_name: str) -> None:
        """Forget an adapter (AdapterNotFoundError if unknown); running requests finish on it."""
        ...

    async def state_info(self, state_id: str, cache_salt: str | None = None) -> StateInfo: ...

    async def delete_state(self, state_id: str, cache_salt: str | None = None) -> None: ...

    async def set_state_meta(self, state_id: str, meta: dict, cache_salt: str | None = None) -> None: ...

    async def export_state(self, state_id: str, cache_salt: str | None = None) -> bytes: ...

    async def import_state(
        self, data: bytes, state_id: str, cache_salt: str | None = None, meta: dict | None = None
    ) -> StateInfo: ...

    async def fork_state(
        self, state_id: str, new_state_id: str, cache_salt: str | None = None, meta: dict | None = None
    ) -> StateInfo: ...

    def shutdown(self, timeout: float = 5.0) -> None: ...

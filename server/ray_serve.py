"""Engine replicas on Ray Serve behind one OpenAI endpoint (docs/scale-out.md).

- EngineReplica: a Ray Serve deployment holding one AsyncLLM; generate streams where it runs and why (Routed), then
  SampleDeltas; stats, adapters and stored states are calls that name their replica (a Target), which
  AffinityRouter (server/ray_router.py) honours. The client learns where a call went from these answers alone, so it
  works wherever the handle is used: this process (`linrec serve --replicas`) or an ingress replica (`serve run`).
- RayEngineClient: the EngineClient (engine/client.py) over the deployment's handle, so that build_app serves N
  replicas as it serves one engine. A background thread asks every replica for its stats twice a second: the
  server's synchronous reads (stats, health, adapters) answer from that snapshot and never wait on a replica.
- run_ray_server: `linrec serve --replicas N` (a local Ray instance, N replicas, this process serving HTTP);
  build_serve_app: the same app as a Serve application for `serve run` on an existing cluster.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import math
import os
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any

import ray
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from linrec.engine.adapters import AdapterInfo, AdapterNotFoundError
from linrec.engine.async_llm import AsyncLLM
from linrec.engine.client import EngineDeadError, EngineError, EngineInfo
from linrec.engine.config import EngineConfig
from linrec.engine.core import EngineStats
from linrec.engine.output import SampleDelta
from linrec.engine.sampling_params import SamplingParams
from linrec.engine.state_store import StateInfo, StateNotFoundError
from linrec.server.config import ServerConfig
from linrec.server.metrics import PREFIX
from linrec.server.ray_router import REASONS, ReplicaRequest, Target

logger = logging.getLogger(__name__)

APP_NAME = "linrec"
ENGINE_DEPLOYMENT = "LinrecEngine"
ROUTER_CLASS = "linrec.server.ray_router.AffinityRouter"
CPUS_PER_REPLICA = 0.5  # on the CPU: a fraction, so that a 2-core machine holds 2 replicas and the ingress
MAX_ONGOING_REQUESTS = 1024  # per replica: the engine queues beyond its slots, Serve need not hold them back
STATS_PERIOD_S = 0.5  # the client's snapshot of every replica's stats
ROUTING_STATS_PERIOD_S = 1.0  # record_routing_stats, as Serve polls it for the router
CALL_TIMEOUT_S = 10.0  # a stats call to a replica that does not answer in this long counts it as gone
RECENT_STATES = 4096  # stored state ids a replica reports to the router (the most recent)
INGRESS_CONNECT_TIMEOUT_S = 1800.0  # `serve run`: the ingress waits this long for the engines to load the model
RECENT_ADAPTERS = 64  # adapter names a replica reports as recently served (so likely resident)


class ReplicaGoneError(EngineError):
    """A call named a replica that is no longer serving (it died, or Serve replaced it)."""


@dataclass
class ReplicaStats:
    """One replica's snapshot, as the client polls it."""

    replica_id: str
    actor_name: str  # Ray's name of the replica's actor (namespace "serve")
    stats: EngineStats
    adapters: list[AdapterInfo]  # adapters the replica knows
    states: list[str] = field(default_factory=list)  # stored state ids it holds (most recent last, bounded)
    known_replicas: list[str] = field(default_factory=list)  # every replica the router knew when it sent this call


@dataclass
class Routed:
    """A generate stream's first item: the replica serving it and the routing reason (ray_router.REASONS; None when
    no AffinityRouter routed it)."""

    replica_id: str
    reason: str | None


class EngineReplica:
    """One engine: an AsyncLLM in a Ray Serve replica. Every call but generate takes a Target first."""

    def __init__(self, engine_config: EngineConfig):
        self.llm = AsyncLLM(engine_config)
        replica = serve.get_replica_context().replica_id
        self.replica_id = replica.unique_id
        self.actor_name = replica.to_full_id_str()
        self._states: OrderedDict[str, None] = OrderedDict()  # stored here (most recent last)
        self._adapters_used: OrderedDict[str, None] = OrderedDict()

    def _check(self, target: Target) -> None:
        if target.replica_id is not None and target.replica_id != self.replica_id:
            raise ReplicaGoneError(f"expected replica {target.replica_id}, got {self.replica_id}: it is gone")

    def _stored(self, state_id: str) -> None:
        self._states[state_id] = None
        self._states.move_to_end(state_id)
        while len(self._states) > RECENT_STATES:
            self._states.popitem(last=False)

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[Routed | SampleDelta]:
        yield Routed(self.replica_id, request.reason_on(self.replica_id))
        if request.lora_name is not None:
            self._adapters_used[request.lora_name] = None
            self._adapters_used.move_to_end(request.lora_name)
            while len(self._adapters_used) > RECENT_ADAPTERS:
                self._adapters_used.popitem(last=False)
        async for delta in self.llm.generate(
            request.prompt_token_ids,
            request.params,
            request.request_id,
            lora_name=request.lora_name,
            cache_salt=request.cache_salt,
            layer_route=request.layer_route,
            route_skip_bias=request.route_skip_bias,
            store_state=request.store_state,
            resume_state=request.resume_state,
            state_meta=request.state_meta,
        ):
            yield delta
        if request.store_state is not None:
            self._stored(request.store_state)

    async def info(self, target: Target) -> EngineInfo:
        self._check(target)
        return self.llm.info

    async def stats(self, target: Target) -> ReplicaStats:
        self._check(target)
        return ReplicaStats(
            self.replica_id,
            self.actor_name,
            self.llm.stats(),
            self.llm.list_lora_adapters(),
            list(self._states),
            target.known_replicas,
        )

    async def check_health(self) -> None:
        """Serve's health check: a replica whose engine died is replaced."""
        self.llm.check_health()

    async def record_routing_stats(self) -> dict[str, Any]:
        """What AffinityRouter reads per replica (refreshed every ROUTING_STATS_PERIOD_S)."""
        stats = self.llm.stats()
        adapters = set(self._adapters_used) | set(stats.running_lora_adapters) | set(stats.waiting_lora_adapters)
        load = stats.num_running + stats.num_waiting
        return {"load": load, "adapters": sorted(adapters), "states": list(self._states)}

    async def load_lora_adapter(self, target: Target, lora_name: str, lora_path: str) -> AdapterInfo:
        self._check(target)
        return await self.llm.load_lora_adapter(lora_name, lora_path)

    async def remove_lora_adapter(self, target: Target, lora_name: str) -> None:
        self._check(target)
        self._adapters_used.pop(lora_name, None)
        await self.llm.remove_lora_adapter(lora_name)

    async def state_info(self, target: Target, state_id: str, cache_salt: str | None) -> StateInfo:
        self._check(target)
        return await self.llm.state_info(state_id, cache_salt)

    async def delete_state(self, target: Target, state_id: str, cache_salt: str | None) -> None:
        self._check(target)
        await self.llm.delete_state(state_id, cache_salt)
        self._states.pop(state_id, None)

    async def set_state_meta(self, target: Target, state_id: str, meta: dict, cache_salt: str | None) -> None:
        self._check(target)
        await self.llm.set_state_meta(state_id, meta, cache_salt)

    async def export_state(self, target: Target, state_id: str, cache_salt: str | None) -> bytes:
        self._check(target)
        return await self.llm.export_state(state_id, cache_salt)

    async def import_state(
        self, target: Target, data: bytes, state_id: str, cache_salt: str | None, meta: dict | None
    ) -> tuple[str, StateInfo]:
        """The state's info, and this replica's id (the target may name none: the least loaded replica took it)."""
        self._check(target)
        info = await self.llm.import_state(data, state_id, cache_salt, meta)
        self._stored(state_id)
        return self.replica_id, info

    async def fork_state(
        self, target: Target, state_id: str, new_state_id: str, cache_salt: str | None, meta: dict | None
    ) -> StateInfo:
        self._check(target)
        info = await self.llm.fork_state(state_id, new_state_id, cache_salt, meta)
        self._stored(new_state_id)
        return info

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.shutdown()


def uses_gpu(engine_config: EngineConfig) -> bool:
    if engine_config.device.startswith("cuda"):
        return True
    if engine_config.device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def engine_deployment(
    engine_config: EngineConfig,
    num_replicas: int,
    *,
    policy: str = "affinity",
    router_kwargs: dict[str, Any] | None = None,
    cpus_per_replica: float = CPUS_PER_REPLICA,
):
    """The EngineReplica deployment, unbound: one GPU per replica when the engine runs on CUDA, else a fraction of a
    CPU. policy: 'affinity' (AffinityRouter) or 'power_of_two' (Ray's default choice, through the same router so
    that per-replica calls still reach their replica: the baseline `linrec bench prefix --replicas` compares)."""
    if num_replicas < 1:
        raise ValueError(f"expected replicas >= 1, got {num_replicas}")
    actor_options = {"num_cpus": 1, "num_gpus": 1} if uses_gpu(engine_config) else {"num_cpus": cpus_per_replica}
    return serve.deployment(EngineReplica).options(
        name=ENGINE_DEPLOYMENT,
        num_replicas=num_replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=MAX_ONGOING_REQUESTS,
        logging_config={"log_level": "WARNING", "enable_access_log": False},
        health_check_period_s=2.0,
        health_check_timeout_s=60.0,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_CLASS,
            request_router_kwargs={"policy": policy, **(router_kwargs or {})},
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
            request_routing_stats_timeout_s=CALL_TIMEOUT_S,
        ),
    )


def _sum_stats(snapshots: list[EngineStats]) -> EngineStats:
    """Several replicas' stats as one engine's: counts and bytes add up, adapter names unite; the per-request
    state size is each replica's (one model)."""
    if not snapshots:
        return EngineStats(0, 0, 0, 0, 0)
    values: dict[str, Any] = {}
    for f in fields(EngineStats):
        items = [getattr(s, f.name) for s in snapshots]
        if f.name == "state_bytes_per_request":
            values[f.name] = max(items)
        elif isinstance(items[0], tuple):
            values[f.name] = tuple(sorted({name for item in items for name in item}))
        elif f.name == "stored_states":  # tier -> (states, bytes)
            tiers: dict[str, tuple[int, int]] = {}
            for item in items:
                for tier, (count, size) in item.items():
                    old = tiers.get(tier, (0, 0))
                    tiers[tier] = (old[0] + count, old[1] + size)
            values[f.name] = tiers
        elif isinstance(items[0], dict):
            total: Counter = Counter()
            for item in items:
                total.update(item)
            values[f.name] = dict(total)
        else:
            values[f.name] = sum(items)
    return EngineStats(**values)


class RayEngineClient:
    """EngineClient over EngineReplica replicas (see the module docstring). Adapters are loaded on every replica
    (and on one that joins later); a stored state lives on the replica that stored it, and the client finds it."""

    def __init__(
        self, handle: DeploymentHandle, *, stats_period_s: float = STATS_PERIOD_S, connect_timeout_s: float = 0.0
    ):
        """connect_timeout_s: how long to wait for a first replica to answer (an ingress deployed beside its engines
        starts before they have loaded the model)."""
        import time

        from linrec.models.tokenizer import load_tokenizer

        self._handle = handle
        self._stream = handle.options(stream=True)
        self._stats_period_s = stats_period_s
        self._replicas: dict[str, ReplicaStats] = {}  # replaced whole by each poll (readers take a reference)
        self._states: OrderedDict[str, str] = OrderedDict()  # stored state id -> the replica holding it
        self._adapters: dict[str, AdapterInfo] = {}  # what every replica serves
        self._open: dict[str, Any] = {}  # request id -> its response stream (abort cancels it)
        self._decisions: Counter = Counter()  # routing reason -> generate requests routed so
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:8]
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        deadline = time.monotonic() + connect_timeout_s
        self.poll()
        while not self._replicas and time.monotonic() < deadline:
            time.sleep(1.0)
            self.poll()
        if not self._replicas:
            raise EngineDeadError("no engine replica answered: the deployment has none running")
        first = next(iter(self._replicas.values()))
        info = self._remote("info", Target(first.replica_id)).result(timeout_s=CALL_TIMEOUT_S, _skip_asyncio_check=True)
        self._info = replace(info, num_replicas=len(self._replicas))
        self._tokenizer = load_tokenizer(info.model_path)
        for stats in self._replicas.values():
            for adapter in stats.adapters:
                self._adapters.setdefault(adapter.name, adapter)
        self._thread = threading.Thread(target=self._poll_loop, name="linrec-ray-stats", daemon=True)
        self._thread.start()

    # -- the replica snapshot -----------------------------------------------------------------------------

    def poll(self) -> None:
        """Ask every replica for its stats (any one first: its answer names the replicas the router knows), and load
        adapters that a replica lacks (one that joined after they were loaded)."""
        found: dict[str, ReplicaStats] = {}
        first = self._stats_of(Target())
        if first is not None:
            found[first.replica_id] = first
            for replica_id in first.known_replicas:
                if replica_id not in found:
                    stats = self._stats_of(Target(replica_id))
                    if stats is not None and stats.replica_id == replica_id:
                        found[replica_id] = stats
        self._replicas = found
        with self._lock:
            for stats in found.values():
                for state_id in stats.states:
                    self._states.setdefault(state_id, stats.replica_id)
            wanted = dict(self._adapters)
        for stats in found.values():
            for name in wanted.keys() - {a.name for a in stats.adapters}:
                try:
                    self._remote("load_lora_adapter", Target(stats.replica_id), name, wanted[name].path).result(
                        timeout_s=CALL_TIMEOUT_S, _skip_asyncio_check=True
                    )
                except Exception as exc:  # noqa: BLE001 -- tried again at the next poll
                    logger.warning("linrec: loading adapter %r on replica %s failed: %s", name, stats.replica_id, exc)

    def _stats_of(self, target: Target) -> ReplicaStats | None:
        # _skip_asyncio_check: an ingress replica builds its client inside its event loop; the handle's router runs
        # on a loop of its own, so blocking here waits on nothing this thread holds.
        response = self._remote("stats", target)
        try:
            return response.result(timeout_s=CALL_TIMEOUT_S, _skip_asyncio_check=True)
        except Exception as exc:  # noqa: BLE001 -- dead, replaced or not answering: not counted as serving
            logger.debug("linrec: no stats from replica %s: %r", target.replica_id, exc)
            response.cancel()
            return None

    def _poll_loop(self) -> None:
        while not self._stopped.wait(self._stats_period_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 -- the next poll tries again
                logger.exception("linrec: polling the engine replicas failed")

    def replica_stats(self) -> dict[str, EngineStats]:
        """Each live replica's last stats, by replica id (for per-replica metrics)."""
        return {replica_id: s.stats for replica_id, s in self._replicas.items()}

    def replica_adapters(self) -> dict[str, list[str]]:
        return {replica_id: sorted(a.name for a in s.adapters) for replica_id, s in self._replicas.items()}

    def replica_actor_names(self) -> dict[str, str]:
        return {replica_id: s.actor_name for replica_id, s in self._replicas.items()}

    def routing_decisions(self) -> dict[str, int]:
        """Generate requests routed, by reason (ray_router.REASONS)."""
        return dict(self._decisions)

    # -- EngineClient ----------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def info(self) -> EngineInfo:
        return self._info

    def stats(self) -> EngineStats:
        return _sum_stats([s.stats for s in self._replicas.values()])

    def check_health(self) -> None:
        if not self._replicas:
            raise EngineDeadError(f"no engine replica is alive (of {self._info.num_replicas} deployed)")

    async def generate(
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
        self.check_health()  # with no replica, Serve would hold the request until one comes
        request_id = request_id or f"req-{self._id_prefix}-{next(self._ids)}"
        state_replica = None
        if resume_state is not None:
            state_replica = await self._find_state(resume_state, cache_salt, required=False)
        call = ReplicaRequest(
            list(prompt_token_ids),
            params,
            request_id,
            lora_name=lora_name,
            cache_salt=cache_salt,
            layer_route=layer_route,
            route_skip_bias=route_skip_bias,
            store_state=store_state,
            resume_state=resume_state,
            state_meta=state_meta,
            state_replica=state_replica,
        )
        stream = self._remote("generate", call, stream=True)
        self._open[request_id] = stream
        routed: Routed | None = None  # the stream's first item
        finished = False
        try:
            while True:
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as exc:  # noqa: BLE001 -- mapped to the engine's own errors
                    raise self._engine_error(exc, routed and routed.replica_id, f"request {request_id}") from None
                if isinstance(item, Routed):
                    routed = item
                    if routed.reason is not None:
                        self._decisions[routed.reason] += 1
                    continue
                yield item
            finished = True
        finally:
            self._open.pop(request_id, None)
            if not finished:
                stream.cancel()
        if store_state is not None and routed is not None:
            self._remember_state(store_state, routed.replica_id)

    def abort(self, request_id: str) -> None:
        stream = self._open.get(request_id)
        if stream is not None:
            stream.cancel()

    # -- adapters: on every replica ---------------------------------------------------------------------------

    def has_lora_adapter(self, lora_name: str) -> bool:
        return lora_name in self._adapters

    def list_lora_adapters(self) -> list[AdapterInfo]:
        return list(self._adapters.values())

    async def load_lora_adapter(self, lora_name: str, lora_path: str) -> AdapterInfo:
        replica_ids = list(self._replicas)
        if not replica_ids:
            self.check_health()
        results = await asyncio.gather(
            *(self._call(r, "load_lora_adapter", lora_name, lora_path) for r in replica_ids), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors and len(errors) == len(results):
            raise errors[0]
        for error in errors:  # the others loaded it; the next poll loads it where it failed
            logger.warning("linrec: adapter %r failed on a replica: %s", lora_name, error)
        info = next(r for r in results if not isinstance(r, BaseException))
        with self._lock:
            self._adapters[lora_name] = info
        return info

    async def remove_lora_adapter(self, lora_name: str) -> None:
        with self._lock:
            if self._adapters.pop(lora_name, None) is None:
                raise AdapterNotFoundError(f"The lora adapter '{lora_name}' cannot be found.")
        await asyncio.gather(
            *(self._call(r, "remove_lora_adapter", lora_name) for r in list(self._replicas)), return_exceptions=True
        )

    # -- stored states: on the replica that stored them ----------------------------------------------------------

    def _remember_state(self, state_id: str, replica_id: str) -> None:
        with self._lock:
            self._states[state_id] = replica_id
            self._states.move_to_end(state_id)
            while len(self._states) > 16 * RECENT_STATES:
                self._states.popitem(last=False)

    async def _find_state(self, state_id: str, cache_salt: str | None, required: bool = True) -> str | None:
        """The replica holding state_id: the one it was stored on, else the first that knows it. None (or, when
        required, StateNotFoundError) if no live replica has it."""
        known = self._states.get(state_id)
        if known in self._replicas:
            return known
        missing: StateNotFoundError | None = None
        for replica_id in list(self._replicas):
            try:
                await self._call(replica_id, "state_info", state_id, cache_salt)
            except StateNotFoundError as exc:
                missing = exc
                continue
            except EngineError:
                continue
            self._remember_state(state_id, replica_id)
            return replica_id
        if required:
            raise missing or StateNotFoundError(f"no stored state {state_id!r}")
        return None

    async def _on_state(self, state_id: str, cache_salt: str | None, method: str, *args: Any) -> Any:
        return await self._call(await self._find_state(state_id, cache_salt), method, *args)

    async def state_info(self, state_id: str, cache_salt: str | None = None) -> StateInfo:
        return await self._on_state(state_id, cache_salt, "state_info", state_id, cache_salt)

    async def delete_state(self, state_id: str, cache_salt: str | None = None) -> None:
        await self._on_state(state_id, cache_salt, "delete_state", state_id, cache_salt)
        with self._lock:
            self._states.pop(state_id, None)

    async def set_state_meta(self, state_id: str, meta: dict, cache_salt: str | None = None) -> None:
        await self._on_state(state_id, cache_salt, "set_state_meta", state_id, meta, cache_salt)

    async def export_state(self, state_id: str, cache_salt: str | None = None) -> bytes:
        return await self._on_state(state_id, cache_salt, "export_state", state_id, cache_salt)

    async def import_state(
        self, data: bytes, state_id: str, cache_salt: str | None = None, meta: dict | None = None
    ) -> StateInfo:
        # Target(): the least loaded replica takes it
        replica_id, info = await self._call_target(Target(), "import_state", data, state_id, cache_salt, meta)
        self._remember_state(state_id, replica_id)
        return info

    async def fork_state(
        self, state_id: str, new_state_id: str, cache_salt: str | None = None, meta: dict | None = None
    ) -> StateInfo:
        replica_id = await self._find_state(state_id, cache_salt)
        info = await self._call(replica_id, "fork_state", state_id, new_state_id, cache_salt, meta)
        self._remember_state(new_state_id, replica_id)
        return info

    # -- calls -----------------------------------------------------------------------------------------------

    async def _call(self, replica_id: str, method: str, *args: Any) -> Any:
        return await self._call_target(Target(replica_id), method, *args)

    async def _call_target(self, target: Target, method: str, *args: Any) -> Any:
        try:
            return await self._remote(method, target, *args)
        except Exception as exc:  # noqa: BLE001 -- mapped to the engine's own errors
            raise self._engine_error(exc, target.replica_id, method) from None

    def _remote(self, method: str, *args: Any, stream: bool = False) -> Any:
        """handle.method.remote(*args) as a Serve request of its own, made in an empty context. In an ingress replica
        the context holds the HTTP request being served, and Serve would give every call made for it that request's
        internal id, by which its router matches a chosen replica to a waiting call: the calls of one HTTP request
        (a prompt list, n > 1) would take each other's replicas, and one of them would wait forever."""
        handle = self._stream if stream else self._handle
        return contextvars.Context().run(getattr(handle, method).remote, *args)

    @staticmethod
    def _engine_error(exc: BaseException, replica_id: str | None, what: str) -> BaseException:
        """A replica's own exception as the in-process engine raises it (InvalidRequestError, QueueFullError,
        ...); a replica that died or went away as an EngineError that says so."""
        if isinstance(exc, RayTaskError):
            cause = exc.cause
            if isinstance(cause, BaseException) and not isinstance(cause, (RayTaskError, RayActorError)):
                return cause
            exc = cause if isinstance(cause, BaseException) else exc
        if isinstance(exc, RayActorError):
            return EngineError(
                f"engine replica {replica_id or '(unknown)'} stopped while serving {what}; the other replicas serve "
                "new requests"
            )
        if isinstance(exc, EngineError):
            return exc
        return EngineError(f"{what} failed on engine replica {replica_id or '(unknown)'} ({type(exc).__name__})")

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


class ReplicaCollector(Collector):
    """Per-replica gauges (label `replica`) and routing decisions by reason, beside the summed engine metrics."""

    def __init__(self, client: RayEngineClient, model_name: str):
        self._client = client
        self._model_name = model_name

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        decisions = CounterMetricFamily(
            PREFIX + "routing_decisions",
            "Generate requests routed to an engine replica, by reason (docs/scale-out.md).",
            labels=["model_name", "reason"],
        )
        counts = self._client.routing_decisions()
        for reason in REASONS:
            decisions.add_metric([self._model_name, reason], counts.get(reason, 0))
        yield decisions
        per_replica = self._client.replica_stats()
        alive = GaugeMetricFamily(PREFIX + "replicas_alive", "Engine replicas answering.", labels=["model_name"])
        alive.add_metric([self._model_name], len(per_replica))
        yield alive
        labels = ["model_name", "replica"]
        gauges = (
            ("replica_num_requests_running", "Requests holding a state slot, per replica.", "num_running"),
            ("replica_num_requests_waiting", "Requests queued for a state slot, per replica.", "num_waiting"),
            ("replica_state_slots_used", "Requests holding state, per replica.", "num_slots_used"),
            ("replica_state_slots_total", "State slots in the pool, per replica.", "num_slots_total"),
            ("replica_prefix_cache_states", "Prefix-cache snapshots held, per replica.", "prefix_cache_states"),
        )
        for name, doc, attr in gauges:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            for replica_id, stats in per_replica.items():
                family.add_metric([self._model_name, replica_id], getattr(stats, attr))
            yield family
        counters = (
            ("replica_prefix_cache_hits", "Prompt tokens loaded from prefix snapshots, per replica.",
             "prefix_cache_hit_tokens"),
            ("replica_prefill_tokens_computed", "Prompt tokens fed to the model, per replica.",
             "prefill_tokens_computed"),
        )  # fmt: skip
        for name, doc, attr in counters:
            family = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            for replica_id, stats in per_replica.items():
                family.add_metric([self._model_name, replica_id], getattr(stats, attr))
            yield family
        adapters = GaugeMetricFamily(
            PREFIX + "replica_lora_adapters", "LoRA adapters loaded, per replica (names in `adapters`).",
            labels=[*labels, "adapters"],
        )  # fmt: skip
        for replica_id, names in self._client.replica_adapters().items():
            adapters.add_metric([self._model_name, replica_id, ",".join(names)], len(names))
        yield adapters


def build_ray_app(client: RayEngineClient, server_config: ServerConfig, model_name: str):
    """build_app over the replicas, with the per-replica and routing metrics on its /metrics."""
    from linrec.server.app import build_app

    app = build_app(client, server_config, model_name)
    app.state.metrics.registry.register(ReplicaCollector(client, model_name))
    return app


# -- `linrec serve --replicas N`: a local Ray instance ---------------------------------------------------------


def start_local_ray(engine_config: EngineConfig, num_replicas: int) -> None:
    """A local Ray instance sized for N replicas: no dashboard, a small object store (deltas are small), and Serve
    without its HTTP proxy (this process serves HTTP)."""
    if not ray.is_initialized():
        # whole CPUs: Ray refuses 2.5 (3 replicas on a 2-core machine)
        num_cpus = max(os.cpu_count() or 1, math.ceil(num_replicas * CPUS_PER_REPLICA + 1))
        if uses_gpu(engine_config):
            num_cpus = max(num_cpus, num_replicas + 1)
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            object_store_memory=256 * 2**20,
            log_to_driver=True,
            logging_level=logging.WARNING,
        )
    serve.start(http_options={"location": "NoServer"})


def deploy_engines(
    engine_config: EngineConfig, num_replicas: int, *, policy: str = "affinity", app_name: str = APP_NAME
) -> DeploymentHandle:
    """Deploy N replicas (on the running Ray instance) and wait until they serve."""
    deployment = engine_deployment(engine_config, num_replicas, policy=policy)
    return serve.run(deployment.bind(engine_config), name=app_name, route_prefix=None)


def run_ray_server(engine_config: EngineConfig, config: ServerConfig, num_replicas: int) -> int:
    """`linrec serve --replicas N`: N engine replicas on a local Ray instance behind this process's HTTP server
    (the same app, auth, errors, streaming, drain and metrics as one engine's)."""
    from linrec.server.app import model_name_for, serve_app

    if config.lora_modules and not engine_config.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora (the engine allocates adapter slots only then)")
    start_local_ray(engine_config, num_replicas)
    client = None
    try:
        client = RayEngineClient(deploy_engines(engine_config, num_replicas))
        serve_app(build_ray_app(client, config, model_name_for(engine_config, config)), config)
    finally:
        if client is not None:
            client.shutdown()
        serve.shutdown()
        ray.shutdown()
    return 0


# -- `serve run linrec.server.ray_serve:build_serve_app ...`: an existing Ray cluster -----------------------------


class _Ingress:
    """The HTTP ingress deployment (its ASGI app comes from _ingress_app); holds the engines' handle so that
    Serve deploys them with it."""

    def __init__(self, engines: DeploymentHandle):
        self.engines = engines


def _ingress_app(engine_config: EngineConfig, server_config: ServerConfig):
    from linrec.server.app import model_name_for

    app_name = serve.get_replica_context().app_name
    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=app_name)
    client = RayEngineClient(handle, connect_timeout_s=INGRESS_CONNECT_TIMEOUT_S)
    return build_ray_app(client, server_config, model_name_for(engine_config, server_config))


def build_serve_app(args: dict[str, Any]):
    """Ray Serve application builder: `serve run linrec.server.ray_serve:build_serve_app model=DIR replicas=2`
    (or a serve config's `import_path` and `args`). Keys: `replicas`, `policy`, `ingress_replicas`, and
    EngineConfig's and ServerConfig's field names (values as the command line takes them)."""
    args = dict(args)
    num_replicas = int(args.pop("replicas", 1))
    num_ingress = int(args.pop("ingress_replicas", 1))
    policy = str(args.pop("policy", "affinity"))
    engine_names = {f.name for f in fields(EngineConfig)}
    server_names = {f.name for f in fields(ServerConfig)}
    unknown = set(args) - engine_names - server_names
    if unknown:
        raise ValueError(f"expected EngineConfig or ServerConfig fields, got unknown {sorted(unknown)}")
    engine_config = EngineConfig(**_parsed(EngineConfig, {k: v for k, v in args.items() if k in engine_names}))
    server_config = ServerConfig(**_parsed(ServerConfig, {k: v for k, v in args.items() if k in server_names}))
    engines = engine_deployment(engine_config, num_replicas, policy=policy).bind(engine_config)

    def asgi_app():  # a function, not a partial: Serve calls functions and takes anything else for the app itself
        return _ingress_app(engine_config, server_config)

    ingress = serve.deployment(serve.ingress(asgi_app)(_Ingress))
    ingress = ingress.options(name="LinrecIngress", num_replicas=num_ingress, ray_actor_options={"num_cpus": 0.25})
    return ingress.bind(engines)


def _parsed(config_cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """String values (as `serve run k=v` passes them) through the field's parser, or its type."""
    out = {}
    by_name = {f.name: f for f in fields(config_cls)}
    for name, value in values.items():
        f = by_name[name]
        if isinstance(value, str) and "parse" in f.metadata:
            value = f.metadata["parse"](value)
        elif isinstance(value, str) and f.type in ("int", "int | None"):
            value = int(value)
        elif isinstance(value, str) and f.type in ("float", "float | None"):
            value = float(value)
        elif isinstance(value, str) and f.type in ("bool",):
            value = value.lower() in ("1", "true", "yes", "on")
        out[name] = value
    return out

"""Affinity routing for engine replicas on Ray Serve (docs/scale-out.md): a request goes where its state is.

A recurrent model's reusable work lives on one replica: a stored conversation (resume_state), prefix-cache
snapshots of the prompts it was sent, the adapters it has loaded. AffinityRouter, a Ray Serve RequestRouter,
ranks the replicas per request:

1. session: resume_state names a conversation: the replica holding it (the only one that can serve it).
2. imbalance: the busiest replica runs more than `imbalance_abs` requests beyond the idlest and more than
   `imbalance_rel` times as many: the least loaded one (SGLang's cache-aware router's rule, 64 / 1.5x).
3. prefix: the replica the longest leading part of this prompt was last sent to, when that part covers at
   least `match_threshold` of the prompt (0.3, as SGLang's and vLLM's routers).
4. adapter: the least loaded replica that served this adapter lately (so it is likely resident).
5. least_loaded: everything else.

Prefix knowledge is router-side and approximate, as in SGLang's router: a table of prompt blocks (block hashes
chained from the adapter and cache salt, so equal hashes mean equal leading tokens) -> the replica each was
last sent to, bounded in size; it says where a prefix went, not whether that replica still caches it. A prompt
enters the table when its replica is chosen, not when the replica accepts it: Serve chooses for a whole burst of
requests before the first is accepted, and the later requests of a group must find where its first one went.

Load, as SGLang's router counts it, is this router's own generate requests per replica, from the choice until the
stream ends. (Serve's queue-length cache is refreshed only when a replica accepts a request, so it does not move
within a burst of choices and still shows a burst's requests for seconds after they finished.)

The router reads only the first argument of a call: a ReplicaRequest (generate) or a Target (every other
call), both plain data. It writes its choice into that argument before Serve sends it, so that the choice travels
with the call and the replica reports it back in its answer (a generate stream's first item, a stats call's
result): the caller never depends on the router changing the caller's own object, which Serve may have copied.

Serve pickles a router's module by value (RequestRouterConfig): in a process other than the one that deployed it
(an ingress replica under `serve run`), this module's classes in the router are copies of those the caller builds
its calls with. So the router recognizes a call by its class's import path (_is), not by isinstance.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from linrec.engine.sampling_params import SamplingParams

# Routing reasons, the `reason` label of linrec:routing_decisions_total; `fallback`: the preferred replica
# refused the request (its queue was full) and another took it.
# `power_of_two`: the baseline policy's choice.
REASONS = ("session", "imbalance", "prefix", "adapter", "least_loaded", "fallback", "power_of_two")
POLICIES = ("affinity", "power_of_two")
MAX_PENDING = 65_536  # routing choices awaiting their request's dispatch
IDLE_ROUTING_TASK_PAUSE_S = 0.05  # a routing task with no request to route asks again after this long
STALE_CHOICE_S = 60.0  # a request given its replica this long ago and still not routed was cancelled on the way
PREFIX_BLOCK_TOKENS = 16  # prompt tokens per prefix-table entry: a match is counted in whole blocks
MAX_PREFIX_BLOCKS = 200_000  # table entries kept (least recently sent dropped first): ~20 MB at most
MAX_KNOWN_STATES = 100_000  # state id -> replica entries kept


@dataclass
class ReplicaRequest:
    """One generate call as it travels to a replica: the engine request's fields, and where it went."""

    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str
    lora_name: str | None = None
    cache_salt: str | None = None
    layer_route: tuple[int, ...] | str | None = None
    route_skip_bias: float = 0.0
    store_state: str | None = None
    resume_state: str | None = None
    state_meta: dict | None = None
    state_replica: str | None = None  # the replica the client knows holds resume_state (None: unknown)
    # Written by the router before the call is sent, so that they travel with it: the replica it ranked first (None:
    # any it offered) and why (REASONS; None: no AffinityRouter routed it).
    preferred_replica: str | None = None
    reason: str | None = None

    def reason_on(self, replica_id: str) -> str | None:
        """Why the request runs on replica_id: the router's reason, or `fallback` where the replica it preferred
        refused the request and another took it."""
        if self.reason is None or self.preferred_replica in (None, replica_id):
            return self.reason
        return "fallback"


@dataclass
class Target:
    """A call for one replica (replica_id), or for any (None): stats, adapters, stored states."""

    replica_id: str | None = None
    # Written by the router before the call is sent: every replica it routes to (a stats call answers with them:
    # the client's census of the replicas).
    known_replicas: list[str] = field(default_factory=list)


class PrefixTable:
    """Prompt blocks -> the replica they were last sent to: an approximate radix tree of token-id prefixes."""

    def __init__(self, block_tokens: int = PREFIX_BLOCK_TOKENS, max_blocks: int = MAX_PREFIX_BLOCKS):
        self.block_tokens = block_tokens
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[int, str] = OrderedDict()  # chained block hash -> replica id

    def _hashes(self, token_ids: list[int], root: tuple) -> list[int]:
        hashes, h = [], hash(root)
        for start in range(0, len(token_ids) - self.block_tokens + 1, self.block_tokens):
            h = hash((h, tuple(token_ids[start : start + self.block_tokens])))
            hashes.append(h)
        return hashes

    def match(self, token_ids: list[int], root: tuple) -> dict[str, int]:
        """Per replica, how many leading tokens of `token_ids` were last sent to it (in whole blocks): the
        blocks are walked from the start, and a replica's match ends where the chain leaves it."""
        matched: dict[str, int] = {}
        for i, h in enumerate(self._hashes(token_ids, root)):
            replica = self._blocks.get(h)
            if replica is None:
                break
            matched[replica] = (i + 1) * self.block_tokens
        return matched

    def insert(self, token_ids: list[int], root: tuple, replica_id: str) -> None:
        for h in self._hashes(token_ids, root):
            self._blocks[h] = replica_id
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def forget(self, replica_id: str) -> None:
        for h in [h for h, r in self._blocks.items() if r == replica_id]:
            del self._blocks[h]


class AffinityRouter(RequestRouter):
    """Ray Serve RequestRouter for linrec's engine replicas (see the module docstring)."""

    def initialize_state(
        self,
        policy: str = "affinity",
        match_threshold: float = 0.3,
        imbalance_abs: int = 64,
        imbalance_rel: float = 1.5,
        **_: Any,
    ) -> None:
        """policy: 'affinity' (the module docstring), or 'power_of_two' (Ray Serve's default choice for generate
        calls: two random replicas, the one with fewer ongoing requests; the baseline affinity is measured
        against). Targeted calls reach their replica under either."""
        if policy not in POLICIES:
            raise ValueError(f"expected policy in {POLICIES}, got {policy!r}")
        if not 0.0 < match_threshold <= 1.0:
            raise ValueError(f"expected 0 < match_threshold <= 1, got {match_threshold}")
        if imbalance_abs < 0 or imbalance_rel < 1.0:
            raise ValueError(
                f"expected imbalance_abs >= 0 and imbalance_rel >= 1, got {imbalance_abs} and {imbalance_rel}"
            )
        self.policy = policy
        self.match_threshold = match_threshold
        self.imbalance_abs = imbalance_abs
        self.imbalance_rel = imbalance_rel
        self.prefixes = PrefixTable()
        self.states: OrderedDict[str, str] = OrderedDict()  # stored state id -> the replica it was stored on
        # internal request id -> (its pending request, the preferred replica): read back when it is routed
        self._preferred: OrderedDict[str, tuple[PendingRequest, str]] = OrderedDict()
        # Generate requests per replica id: chosen and not yet routed (the event loop's), and routed and not yet
        # finished (also decremented by Ray's threads when a stream ends: under the lock). _load is their sum.
        self._num_chosen: Counter[str] = Counter()
        self._num_running: Counter[str] = Counter()
        self._running_lock = threading.Lock()
        # routing task -> the request it adopted (choose_replicas): a task's choice is fulfilled within the task
        self._adopted: weakref.WeakKeyDictionary[asyncio.Task, PendingRequest] = weakref.WeakKeyDictionary()

    def _get_pending_request_matching_metadata(self, request_metadata=None) -> PendingRequest | None:
        """The replica chosen for a request goes to that request. (RequestRouter's default hands it to the oldest
        pending request, FIFO: under concurrency a targeted call or a conversation's turn would land elsewhere.)"""
        return self._get_pending_request_matching_internal_request_id(request_metadata)

    def _oldest_waiting(self) -> PendingRequest | None:
        """The oldest request still waiting for a replica (the queue is cleaned lazily: done ones stay a while)."""
        for pending_request in self._pending_requests_to_fulfill:
            if not pending_request.future.done():
                return pending_request
        return None

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """The replica goes to the request it was chosen for: a task without a request of its own chose it for the
        request it adopted (choose_replicas), unless that one's own task routed it meanwhile."""
        if request_metadata is None:
            adopted = self._adopted.pop(asyncio.current_task(), None)
            if adopted is None:
                return
            request_metadata = adopted.metadata
        super()._fulfill_next_pending_request(replica, request_metadata)

    # -- load and residency ------------------------------------------------------------------------

    def _load(self, replica: RunningReplica) -> int:
        """This router's generate requests on the replica: chosen for it, or running there (module docstring)."""
        replica_id = replica.replica_id.unique_id
        return self._num_chosen[replica_id] + self._num_running[replica_id]

    def _least_loaded(self, replicas: list[RunningReplica]) -> list[RunningReplica]:
        """Replicas by load, ties in random order (so that equal replicas share the first requests)."""
        shuffled = random.sample(replicas, len(replicas))
        return sorted(shuffled, key=self._load)

    def _state_holder(self, request: ReplicaRequest, by_id: dict[str, RunningReplica]) -> RunningReplica | None:
        state_id = request.resume_state
        for replica_id in (request.state_replica, self.states.get(state_id)):
            if replica_id in by_id:
                return by_id[replica_id]
        for replica in by_id.values():
            if state_id in (replica.routing_stats or {}).get("states", ()):
                return replica
        return None

    # -- RequestRouter ---------------------------------------------------------------------------------

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:
            # A routing task without a request of its own: Serve's tasks each take one, and one that finds more tasks
            # than requests retires still holding it, which nothing else would route (Serve's base router hands a
            # replica only to the request it was chosen for). So: the oldest waiting request is adopted, and
            # _fulfill_next_pending_request hands it the replica chosen here. With none waiting, a pause before the
            # task asks again, or it would loop without yielding to the event loop, probing queue lengths.
            pending_request = self._oldest_waiting()
            if pending_request is None:
                await asyncio.sleep(IDLE_ROUTING_TASK_PAUSE_S)
                return [self._least_loaded(candidate_replicas)]
            self._adopted[asyncio.current_task()] = pending_request
        # Every rank below names every candidate: when none takes the request (a full queue, or a queue-length probe
        # unanswered within Serve's 0.1 s deadline on a busy machine), Serve must back off before asking again. Left
        # False (Serve's default, for its locality mixins' first passes) it asks again at once and probes again.
        pending_request.routing_context.should_backoff = True
        call = pending_request.args[0] if pending_request.args else None
        if _is(call, Target):
            # A targeted call goes to its replica; one no longer here goes anywhere, and the replica refuses it
            # (it checks the target), so that the caller hears at once instead of waiting for it forever.
            call.known_replicas = sorted(r.unique_id for r in self.curr_replicas)
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == call.replica_id]
            return [chosen or self._least_loaded(candidate_replicas)]
        if not _is(call, ReplicaRequest):
            return [self._least_loaded(candidate_replicas)]
        if self.policy == "power_of_two":
            two = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
            self._prefer(pending_request, two[0] if len(two) == 1 else min(two, key=self._load), "power_of_two")
            return [two]
        earlier = self._preferred.get(pending_request.metadata.internal_request_id)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if earlier is not None and earlier[1] in by_id:
            # Chosen before (by two routing tasks, or before the replica refused it): the same choice, the same reason
            preferred = by_id[earlier[1]]
        else:
            preferred, reason = self._choose(call, candidate_replicas)
            self._prefer(pending_request, preferred, reason)
            if call.resume_state is None and call.prompt_token_ids:  # now: the burst's next request must find it
                self.prefixes.insert(call.prompt_token_ids, _root(call), preferred.replica_id.unique_id)
        others = [r for r in self._least_loaded(candidate_replicas) if r is not preferred]
        return [[preferred], others]

    def _prefer(self, pending_request: PendingRequest, replica: RunningReplica, reason: str) -> None:
        """Count the choice as the replica's load until the request is routed, and write it into the call (for
        power_of_two, the reason holds on whichever of the two replicas Serve takes)."""
        internal_id = pending_request.metadata.internal_request_id
        self._unprefer(internal_id)  # chosen again (power_of_two: a retry after a refusal)
        replica_id = replica.replica_id.unique_id
        self._preferred[internal_id] = (pending_request, replica_id)
        self._num_chosen[replica_id] += 1
        call = pending_request.args[0]
        call.preferred_replica = None if reason == "power_of_two" else replica_id
        call.reason = reason
        # Requests cancelled before they were routed are never routed: dropped once they reach the front.
        now = time.time()
        while self._preferred:
            oldest, (pending, _) = next(iter(self._preferred.items()))
            future = pending.future
            is_stale = future.done() and now - pending.created_at > STALE_CHOICE_S
            if not (future.cancelled() or is_stale or len(self._preferred) > MAX_PENDING):
                break
            self._unprefer(oldest)

    def _unprefer(self, internal_id: str) -> None:
        entry = self._preferred.pop(internal_id, None)
        if entry is not None:
            self._num_chosen[entry[1]] -= 1
            if self._num_chosen[entry[1]] <= 0:
                del self._num_chosen[entry[1]]

    def _choose(self, request: ReplicaRequest, replicas: list[RunningReplica]) -> tuple[RunningReplica, str]:
        by_id = {r.replica_id.unique_id: r for r in replicas}
        ordered = self._least_loaded(replicas)
        if request.resume_state is not None:
            holder = self._state_holder(request, by_id)
            if holder is not None:
                return holder, "session"
        loads = [self._load(r) for r in ordered]
        if loads[-1] - loads[0] > self.imbalance_abs and loads[-1] > self.imbalance_rel * loads[0]:
            return ordered[0], "imbalance"
        if request.resume_state is None and request.prompt_token_ids:
            matched = self.prefixes.match(request.prompt_token_ids, _root(request))
            matched = {replica_id: n for replica_id, n in matched.items() if replica_id in by_id}
            if matched:
                replica_id = max(matched, key=matched.__getitem__)
                if matched[replica_id] >= self.match_threshold * len(request.prompt_token_ids):
                    return by_id[replica_id], "prefix"
        if request.lora_name is not None:
            with_adapter = [r for r in ordered if request.lora_name in (r.routing_stats or {}).get("adapters", ())]
            if with_adapter:
                return with_adapter[0], "adapter"
        return ordered[0], "least_loaded"

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        call = pending_request.args[0] if pending_request.args else None
        chosen = replica_id.unique_id
        if _is(call, Target):
            return
        self._unprefer(pending_request.metadata.internal_request_id)
        if not _is(call, ReplicaRequest):
            return
        with self._running_lock:
            self._num_running[chosen] += 1
        result.add_done_callback(lambda _: self._finished(chosen))
        if call.resume_state is None and call.prompt_token_ids:
            self.prefixes.insert(call.prompt_token_ids, _root(call), chosen)
        if call.store_state is not None:
            self.states[call.store_state] = chosen
            self.states.move_to_end(call.store_state)
            while len(self.states) > MAX_KNOWN_STATES:
                self.states.popitem(last=False)

    def _finished(self, replica_id: str) -> None:
        """A routed generate request's stream ended (on one of Ray's threads)."""
        with self._running_lock:
            self._num_running[replica_id] -= 1
            if self._num_running[replica_id] <= 0:
                del self._num_running[replica_id]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.prefixes.forget(replica_id.unique_id)
        for state_id in [s for s, r in self.states.items() if r == replica_id.unique_id]:
            del self.states[state_id]


def _is(call: Any, cls: type) -> bool:
    """isinstance by import path (the module docstring): in a router Serve unpickled in another process, `cls` is a
    copy of the class the caller's call was built from."""
    kind = type(call)
    return (kind.__module__, kind.__qualname__) == (cls.__module__, cls.__qualname__)


def _root(request: ReplicaRequest) -> tuple:
    """What a prefix's states depend on beside its tokens: the adapter and the tenant's cache salt."""
    return (request.lora_name, request.cache_salt)

"""Continuous batching under a token budget over a fixed pool of state slots.

One engine step is schedule() -> runner.execute() -> update(). Only the scheduler changes a
request's status or allocates and frees slots; everything it hands the runner is plain data.
A recurrent request never grows, so there is no preemption: admission is "is there a free slot" (for a
routed request, "are the rows its route needs free in each layer": engine/state_pool.py's RowAllocator).

With a PrefixCache the scheduler also decides where states are saved and loaded (see prefix_cache.py):
- a request admitted with a hit loads the snapshot into its slot and prefills from the next token
  (a hit is capped at the prompt's length - 1: the last prompt token is always fed, for its logits);
- a prefill chunk is cut at the request's claimed branch points, so the snapshot lands at the exact
  token where prompts diverge; chunk ends, prompt ends and finished requests' end states are saved
  when a row is free or worth less;
- with `group_prefixes` (BatchLLM on states) every waiting prompt's path is in the tree from the moment
  it arrives: the first of a group to be admitted claims the shared branch points and prefills them
  once, the others wait (blocked, holding nothing) for those snapshots and run right after, and the
  queue is ordered by decode-to-prefill ratio (max_tokens x n over uncached prompt tokens), largest first.

Fair admission (no head-of-line blocking behind a long prompt). A prompt is long while more than
`long_prefill_token_threshold` of its tokens remain to prefill (after its prefix hit). Each step's budget goes:
1. one token to every decoding request;
2. to the prompts already prefilling, oldest first: a short one gets all it needs, a long one at most the
   threshold, and at most `max_long_partial_prefills` long ones get tokens in this pass;
3. to waiting prompts, in queue order, while slots and budget last; a long one is passed over (keeping its
   place) while `max_long_partial_prefills` long prompts are prefilling, so short prompts behind it go first;
4. whatever is left, to the long prefills of this step, oldest first.
Bounds: a short prompt that finds a free slot is admitted at the next step, since pass 2 leaves at least
budget - decodes - max_long_partial_prefills x threshold - (short prefills, each done within a step); a long
prompt, once prefilling, gets at least min(threshold, budget - decodes) tokens every step whatever arrives
(no starvation), and a waiting long prompt waits only for the long prefills ahead of it (FIFO). With the
threshold at 0 every prompt is short: pure arrival order, the oldest prefill taking all the budget.

Adapters. A request with an adapter (LoRA or sparse) is admitted once a device adapter slot holds its adapter
(pinned while it runs: at most max_loras distinct adapters run at once); a request whose adapter finds every
slot pinned by others waits, keeping its place, and after MAX_ADAPTER_WAIT_STEPS steps nobody behind it is
admitted, so the slots drain (bounded wait). Once running, every request runs every step, whatever its adapter.
Sparse adapters (SHiRA) take one of two forms per step, chosen in `_output` from the step's sequences alone: a
step whose sequences all use one sparse adapter runs with it scattered into the weights
(SchedulerOutput.sparse_slot: its requests pay nothing per token); any other step keeps the base weights, and
the runner adds each sparse request's delta to its tokens (kernels/sparse), as LoRA adds its term. So base and
LoRA requests never run on an adapter's weights and never wait for one. Weight affinity keeps batches whole
when slots are scarce: admission takes the waiting requests on the running batch's weights first (the base
weights, LoRA included, or one sparse adapter; with nothing running, the queue head's), then the rest in queue
order. A request passed over that way (left waiting while one that arrived after it was admitted) in
MAX_SPARSE_PASSES steps turns admission back to queue order until it is admitted, so its wait stays bounded;
when the running batch already mixes weights, admission is in queue order. Without sparse requests nothing
here changes admission.

Failed steps. The runner only computes, so when it raises, the states of that step's requests (and the
snapshot rows it wrote) are unknown, while everything else is intact. `recover` drops the step's snapshots
and puts the step's requests in quarantine, as one group: before anything else runs, the group rebuilds its
states from its own tokens (a recurrent state is a function of them) and then takes one more step (so a fault
tied to a decode shows again). A group that fails again is split in two halves, each tried the same way
(bisection: about 2 log2(n) quarantine rounds find one culprit among n); a request that fails alone is the
cause and ends with FINISHED_ERROR, and everyone else goes on with the tokens it would have had anyway.
A transient fault costs one rebuild and changes no output. A request in MAX_FAILED_STEPS failed batches that
no quarantine caught (a fault that needs company) ends with an error too, so the engine always moves on.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from linrec.engine.adapters import AdapterSlots
from linrec.engine.prefix_cache import PrefixCache, PrefixKey, RadixNode
from linrec.engine.request import Request, RequestStatus
from linrec.engine.sampling_params import InvalidRequestError, SamplingParams
from linrec.engine.state_pool import RowAllocator, Rows

# A branch point is claimed (the leader's chunk cut there, followers waiting one step for it) only if it
# saves at least this many tokens beyond the snapshot a request would otherwise start from: below it the
# extra step costs more latency than recomputing costs compute.
MIN_SNAPSHOT_TOKENS = 16
# Chunk ends, prompt ends and end states are saved (a row copy, no wait) from this many new tokens on;
# the eviction by value sorts out which of them stay.
MIN_SAVE_TOKENS = 4
# A request in this many failed batched steps ends with an error even if no quarantine step caught it: a
# fault that needs company to strike must not make the engine rebuild the same states forever.
MAX_FAILED_STEPS = 3
# A suspect is cleared once its rebuilt state sampled and one more step ran and sampled.
QUARANTINE_SAMPLES = 2
# Weight affinity: while slots are scarce, admission prefers requests on the running batch's weights, so that a
# batch of one sparse adapter's requests stays one (scattered, nothing per token). A waiting request passed over
# for it in this many steps turns admission back to queue order until it is admitted.
MAX_SPARSE_PASSES = 16
_NO_GROUP = object()  # admission in queue order
# A request whose adapter found every device slot pinned by other adapters waits, and requests behind it on
# resident adapters go first; after this many steps of waiting, nobody behind it is admitted any more, so the
# slots drain and it gets one (bounded wait, no starvation by a steady stream on the resident adapters).
MAX_ADAPTER_WAIT_STEPS = 32


def _weights(request: Request) -> int | None:
    """The weights a request runs on: its sparse adapter's uid, or None for the base weights (LoRA included)."""
    return request.sparse.uid if request.sparse is not None else None


def _sample_row(request: Request) -> SampleRow:
    return SampleRow(
        request.request_id,
        request.sample_index,
        request.sampling_params,
        request.prompt_token_ids,
        request.output_token_ids,
    )


def _split(rows: tuple[int, ...], keep: list[bool]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-layer rows as (the kept ones, the others), 0 in the layers each leaves out."""
    return tuple(r if k else 0 for r, k in zip(rows, keep)), tuple(0 if k else r for r, k in zip(rows, keep))


def _adapter(request: Request):
    """The request's adapter, LoRA or sparse (LoraWeights | SparseWeights), or None for the base model."""
    return request.lora if request.lora is not None else request.sparse


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 429)."""


def default_long_prefill_threshold(max_num_batched_tokens: int) -> int:
    """A quarter of the step budget: one long prefill leaves three quarters to everyone else."""
    return max(1, max_num_batched_tokens // 4)


@dataclass
class ScheduledSequence:
    request_id: str  # the engine request (a parent or a child sample) this sequence feeds
    slot_id: int  # state row this sequence reads and writes in every layer it runs (0: per layer, layer_rows)
    token_ids: list[int]  # tokens fed this step: a prefill chunk or the one pending decode token
    start_position: int  # tokens already folded into the state before this step
    needs_sample: bool  # the chunk ends the prompt, or it is a decode: sample the next token
    adapter_slot: int = -1  # device LoRA slot of its LoRA adapter (-1: none)
    sparse_slot: int = -1  # device adapter slot of its sparse adapter (-1: none)
    layer_route: tuple[int, ...] | None = None  # its route (None: every layer once)
    layer_rows: tuple[int, ...] | None = None  # per layer, its state row (0: skips it); None: slot_id everywhere
    lane_rows: tuple[int, ...] | None = None  # per layer, its second-lane row (0: none); None: no repeat
    auto_route: float | None = None  # its routers decide its route in this step, with this skip bias


@dataclass(frozen=True)
class SampleRow:
    """What the sampler needs of one sample: its parameters and its tokens so far (penalties, seeded generators).
    Plain data, like all of SchedulerOutput: no live request crosses to the runner, so an engine's runner could
    live in another process."""

    request_id: str
    sample_index: int
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class SchedulerOutput:
    sequences: list[ScheduledSequence]  # decodes first, then prefill chunks; their order is the batch order
    # State rows handed to new requests this step (a slot, or a routed request's rows: engine/state_pool.py's
    # Rows): zeroed before the forward.
    slots_to_reset: list[Rows]
    # After the forward, copy the state in the first rows into each of the others (n > 1 children
    # forking from their parent's prefilled prompt).
    forks: list[tuple[Rows, list[Rows]]]
    # Rows to sample: (what sampling it needs, index into `sequences` whose last-token logits it samples from).
    # Forking children sample from their parent's row, each with its own generator.
    samples: list[tuple[SampleRow, int]]
    finished_request_ids: list[str]  # finished since the last step (the runner drops their generators)
    # Prefix-state cache row copies, in the runner's order: end_saves (rows -> snapshot row: the end
    # states of requests finished since the last step, whose rows are not reused before this copy),
    # then resets, then loads (snapshot row -> rows: prefix hits), the forward, forks, then saves
    # (rows -> snapshot row: states at this step's chunk ends). A routed request's rows copy only the layers it
    # executes: a snapshot is loaded only by requests of the same route.
    end_saves: list[tuple[Rows, int]] = field(default_factory=list)
    # (a load's source is a snapshot row, a stored state's device row, or its host copy: a list of CPU tensors)
    loads: list[tuple[int | list, Rows]] = field(default_factory=list)
    saves: list[tuple[Rows, int]] = field(default_factory=list)
    # A quarantine step: a group of requests rebuilding their states after a failed step, nothing else; if it
    # fails too, the group is split (a group of one is the cause).
    is_quarantine: bool = False
    # Adapters to copy into device slots before the forward: (slot, its new adapter's LoraWeights or
    # SparseWeights).
    adapter_loads: list[tuple[int, object]] = field(default_factory=list)
    # The device slot of the sparse adapter scattered into the weights for this step: every sequence uses it.
    # -1: the base weights (sparse sequences of a mixed step get the per-token add-on).
    sparse_slot: int = -1

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)

    @property
    def is_empty(self) -> bool:
        return not self.sequences


@dataclass
class StepResult:
    """What the runner computed: the sampled token (and logprobs) per request id."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, object] = field(default_factory=dict)  # request id -> Logprob
    routes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # request id -> the route its routers chose


@dataclass
class RequestUpdate:
    """One request's progress in one step, for the output processor."""

    request: Request
    new_token_ids: list[int]
    new_logprobs: list[object]
    finished: bool


@dataclass
class PrefixStats:
    """Cumulative prefix-cache counters (vLLM counts queries and hits in tokens; we keep both)."""

    num_queries: int = 0  # prompts looked up (at admission)
    num_hits: int = 0  # prompts that loaded a snapshot
    num_query_tokens: int = 0  # prompt tokens looked up
    num_hit_tokens: int = 0  # prompt tokens loaded from snapshots instead of prefilled (prefill saved)
    num_prefill_tokens: int = 0  # prompt tokens actually fed to the model (with or without a cache)


@dataclass
class _PrefixPlan:
    """The scheduler's prefix bookkeeping for one prompt (the parent of its n samples)."""

    key: PrefixKey
    priority: tuple[float, int]  # the waiting list's sort key: (-decode/prefill ratio, arrival order)
    path: RadixNode | None = None  # this prompt's live path prompt[:-1] in the tree, until its prefill ends
    claims: dict[int, RadixNode] = field(default_factory=dict)  # depth -> node it saves at (chunks cut there)
    pinned: RadixNode | None = None  # the snapshot a readied follower will load (pinned until admitted)
    blocked_on: RadixNode | None = None  # waiting for this node's snapshot; not in any queue meanwhile


class Scheduler:
    def __init__(
        self,
        num_slots: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_waiting_requests: int,
        eos_token_ids: tuple[int, ...] = (),
        prefix_cache: PrefixCache | None = None,
        group_prefixes: bool = False,
        min_snapshot_tokens: int = MIN_SNAPSHOT_TOKENS,
        min_save_tokens: int = MIN_SAVE_TOKENS,
        long_prefill_token_threshold: int | None = None,
        max_long_partial_prefills: int = 1,
        adapter_slots: AdapterSlots | None = None,
        num_layers: int = 1,
        state_store=None,
    ):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"expected max_num_batched_tokens >= max_num_seqs so every running request can decode each step, "
                f"got {max_num_batched_tokens} < {max_num_seqs}"
            )
        if long_prefill_token_threshold is None:
            long_prefill_token_threshold = default_long_prefill_threshold(max_num_batched_tokens)
        if long_prefill_token_threshold < 0 or max_long_partial_prefills < 1:
            raise ValueError(
                "expected long_prefill_token_threshold >= 0 and max_long_partial_prefills >= 1, got "
                f"{long_prefill_token_threshold} and {max_long_partial_prefills}"
            )
        # Each layer's request rows: a request without a route holds one slot in every layer, a routed one rows
        # that follow its route (RowAllocator), so routes that skip layers leave rows to others.
        self.allocator = RowAllocator(num_slots, num_layers)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold  # 0: no prompt counts as long
        self.max_long_partial_prefills = max_long_partial_prefills
        self.max_waiting_requests = max_waiting_requests
        self.eos_token_ids = frozenset(eos_token_ids)
        # Admission order: arrival, or (group_prefixes) decode-to-prefill ratio. A list, for bisect.
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # holds slots; in admission order
        self.requests: dict[str, Request] = {}  # every unfinished request, children included
        self._finished_since_step: list[str] = []
        self.cache = prefix_cache
        self.group_prefixes = group_prefixes and prefix_cache is not None
        self.min_snapshot_tokens = min_snapshot_tokens
        self.min_save_tokens = min_save_tokens
        self.prefix_stats = PrefixStats()
        self._plans: dict[str, _PrefixPlan] = {}  # parent request id -> its plan (cached requests only)
        self._ready: deque[Request] = deque()  # followers whose snapshot landed: admitted before `waiting`
        self._num_blocked = 0  # followers parked on a pending snapshot
        self._arrivals = itertools.count()
        self._end_saves: list[tuple[Rows, int]] = []  # end states to copy at the start of the next step
        self._step_pins: list[RadixNode] = []  # snapshots loaded this step: unpinned in update()
        self._step_saves: list[RadixNode] = []  # snapshots written this step: ready in update()
        # Failed-step recovery: groups of requests in quarantine, the first one running; samples each
        # suspect still owes (rebuild + one more step); slots to zero at the next schedule().
        self._quarantine: deque[list[Request]] = deque()
        self._samples_owed: dict[str, int] = {}  # suspect request id -> samples left before it is cleared
        self._pending_resets: list[Rows] = []
        # Device adapter slots, LoRA and sparse (None: the engine serves no adapters). A request with an adapter is
        # admitted only once a slot holds it; loads planned this step go to the runner in SchedulerOutput.adapter_loads.
        self.adapter_slots = adapter_slots
        self._adapter_loads: list[tuple[int, object]] = []
        self._adapter_waits: dict[str, int] = {}  # request id -> steps it waited for an adapter slot
        # Steps whose sequences mixed a sparse adapter with other weights (the per-token add-on), for metrics;
        # sparse requests in the scheduler; request id -> steps weight affinity passed it over.
        self.num_sparse_mixed_steps = 0
        # Layer routes, per token fed: layers skipped, and second passes of repeated layers (metrics).
        self.num_layer_passes_skipped = 0
        self.num_layer_passes_repeated = 0
        self._num_sparse = 0
        self._passes: dict[str, int] = {}
        # Stored states (engine/state_store.py): where a continuation loads its state from, and the requests
        # that completed with a state to keep, (request, its rows, its second-lane rows), which the engine
        # copies out after the step, before their rows are reused.
        self.state_store = state_store
        self._state_saves: list[tuple[Request, Rows, Rows | None]] = []
        self._step: dict[str, Request] = {}  # request id -> the live request behind the last output's plain data

    # -- requests in and out -----------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a prompt; an n > 1 prompt must arrive as one parent with its children attached."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        # Free slots take waiting requests at the next step: a burst may fill them as well as the waiting places.
        if self.num_waiting >= self.max_waiting_requests + self.num_free_places:
            raise QueueFullError(
                f"waiting queue is full ({self.max_waiting_requests} waiting places, every state slot taken)"
            )
        if 1 + len(request.children) > min(self.max_num_seqs, self.allocator.num_slots):
            raise InvalidRequestError(
                f"n={1 + len(request.children)} samples need that many state slots at once, but at most "
                f"{min(self.max_num_seqs, self.allocator.num_slots)} requests can run together",
                "n",
            )
        self.requests[request.request_id] = request
        self._num_sparse += request.sparse is not None
        for child in request.children:
            self.requests[child.request_id] = child
        if self.cache is None or request.cache_key is None:
            self.waiting.append(request)
            return
        plan = _PrefixPlan(request.cache_key, (0.0, next(self._arrivals)))
        self._plans[request.request_id] = plan
        if not self.group_prefixes:
            self.waiting.append(request)
            return
        # Global grouping: the path joins the tree now, so that whoever of a group is admitted first
        # sees every other waiting prompt that shares its prefix.
        prompt = request.prompt_token_ids
        plan.path = self.cache.insert_path(plan.key, prompt[:-1])
        info = self.cache.path_info(plan.key, prompt, len(prompt) - 1)
        shared = max([info.hit_depth] + [n.depth for n in info.branches] + [info.pending.depth if info.pending else 0])
        ratio = request.sampling_params.max_tokens * (1 + len(request.children)) / max(1, len(prompt) - shared)
        plan.priority = (-ratio, plan.priority[1])
        bisect.insort(self.waiting, request, key=lambda r: self._plans[r.request_id].priority)

    def abort(self, request_ids: list[str]) -> None:
        """Cancel requests; their slots are free for the very next schedule()."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None:
                self.finish(request, RequestStatus.FINISHED_ABORTED)

    def finish(self, request: Request, status: RequestStatus, stop_reason: int | str | None = None) -> None:
        """End a request (stop string found by the output processor, abort, or update's own checks)."""
        if request.status.is_finished:
            return
        is_suspect = self._samples_owed.pop(request.request_id, None) is not None
        if is_suspect:
            self._leave_quarantine(request)
        if request.status is RequestStatus.WAITING:
            self._unqueue(request)
        elif request in self.running:
            self.running.remove(request)
        plan = self._plans.pop(request.request_id, None)
        if plan is not None:
            self._drop_plan(request, plan)
        if request.resume is not None:  # a continuation that never loaded its state
            self.state_store.unpin(request.resume)
            request.resume = None
        if request.state_rows is not None:
            # A failed or quarantined request's state is unknown or half rebuilt: never a snapshot.
            is_state_sound = status is not RequestStatus.FINISHED_ERROR and not is_suspect
            if request.status is RequestStatus.RUNNING and request.num_computed_tokens > 0 and is_state_sound:
                self._save_end_state(request)
                if request.store_id is not None and status in (
                    RequestStatus.FINISHED_STOPPED,
                    RequestStatus.FINISHED_LENGTH,
                ):
                    self._state_saves.append((request, request.state_rows, request.lane_rows))
            self.allocator.free(request.state_rows, *[request.lane_rows] if request.lane_rows else [])
            request.slot_id, request.layer_rows, request.lane_rows = 0, None, None
        self._adapter_waits.pop(request.request_id, None)
        self._passes.pop(request.request_id, None)
        if request.parent_id is None and request.request_id in self.requests:
            self._num_sparse -= request.sparse is not None
        if request.adapter_slot >= 0 and self.adapter_slots is not None:
            self.adapter_slots.release(request.adapter_slot)
            request.adapter_slot = -1
        request.status = status
        request.stop_reason = stop_reason
        self.requests.pop(request.request_id, None)
        self._finished_since_step.append(request.request_id)
        # Children not yet forked only hold reserved slots: they end with their parent.
        for child in request.children:
            if child.status is RequestStatus.WAITING:
                self.finish(child, status)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self._ready) + self._num_blocked

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_free_places(self) -> int:
        """Requests without a route that could start running now: free slots, within max_num_seqs."""
        return max(0, min(self.allocator.num_free, self._num_free_seqs()))

    def _num_free_seqs(self) -> int:
        return self.max_num_seqs - len(self.running) - self._num_reserved()

    @property
    def num_suspects(self) -> int:
        """Requests in quarantine after a failed step (their states being rebuilt)."""
        return len(self._samples_owed)

    # -- one step ----------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        slots_to_reset, self._pending_resets = self._pending_resets, []
        if self._quarantine:
            # The first quarantine group rebuilds its states and takes one more step; everything else waits.
            budget = self.max_num_batched_tokens
            chunks: list[list] = []
            for request in self._quarantine[0]:
                if self._samples_owed[request.request_id] and budget > 0:
                    chunks.append([request, self._chunk_len(request, budget)])
                    budget -= chunks[-1][1]
            return self._output(chunks, slots_to_reset, [], is_quarantine=True)
        budget = self.max_num_batched_tokens
        threshold = self.long_prefill_token_threshold
        chunks: list[list] = []  # [request, tokens to feed], in batch order
        # Pass 1: every decoding request gets its one token first: decode latency never waits on prefills.
        for request in self.running:
            if not request.is_prefilling:
                chunks.append([request, 1])
                budget -= 1
        if self._num_sparse:  # decodes by sparse adapter: each adapter's add-on runs over one run of rows
            chunks.sort(key=lambda chunk: chunk[0].adapter_slot if chunk[0].sparse is not None else -1)
        # Pass 2: the prompts already started, oldest first; a long one at most `threshold` tokens for now.
        num_long = 0
        for request in self.running:
            if not request.is_prefilling:
                continue
            cap = request.num_pending_tokens
            if self._is_long(cap):
                num_long += 1
                cap = threshold if num_long <= self.max_long_partial_prefills else 0
            num_tokens = self._chunk_len(request, min(budget, cap)) if budget > 0 else 0
            chunks.append([request, num_tokens])
            budget -= num_tokens
        # Pass 3: admit waiting prompts while there are slots (n of them for an n-sample prompt). A long one
        # is passed over while the long prefills are at their bound; it keeps its place in the queue.
        loads: list[tuple[int | list, Rows]] = []
        # A routed request may fit in rows that other routes left, with no whole slot free.
        has_rows = self.allocator.num_rows_used < self.allocator.num_rows * self.allocator.num_layers
        queued = [*self._ready, *self.waiting] if budget > 0 and self._num_free_seqs() > 0 and has_rows else []
        candidates, group = self._weight_affinity(queued)
        for request in candidates:
            if budget <= 0:
                break
            num_samples = 1 + len(request.children)
            counts = request.row_counts(self.allocator.num_layers)
            if self._num_free_seqs() < num_samples or (counts is None and self.allocator.num_free < num_samples):
                break
            if counts is not None and not self.allocator.can_allocate_route(counts, num_samples):
                continue  # the rows its route needs are taken: it waits, keeping its place
            plan = self._plans.get(request.request_id)
            is_long = self._is_long(request.num_prompt_tokens - self._hit_depth(request, plan))
            if is_long and num_long >= self.max_long_partial_prefills:
                continue
            if _adapter(request) is not None and not self._can_place_adapter(request):
                # every adapter slot is pinned by other adapters' requests: it waits, keeping its place
                waited = self._adapter_waits[request.request_id] = self._adapter_waits.get(request.request_id, 0) + 1
                if waited > MAX_ADAPTER_WAIT_STEPS:
                    break
                continue
            self._adapter_waits.pop(request.request_id, None)
            hit: RadixNode | None = None
            if plan is not None:
                hit, wait_on = self._plan_admission(request, plan)
                if wait_on is not None:
                    self._unqueue(request)
                    self._block(request, plan, wait_on)
                    continue
            self._unqueue(request)
            self._allocate_rows(request, counts)
            if request.lane_rows is not None:  # each repeated layer's second pass starts from a zeroed row
                slots_to_reset.append(request.lane_rows)
            if _adapter(request) is not None:
                self._place_adapter(request)
            if request.resume is not None:  # a continuation: its stored state, from the device row or the host
                entry, request.resume = request.resume, None
                first, second = self.state_store.source(entry)
                loads.append((first, request.state_rows))
                if second is not None:
                    loads.append((second, request.lane_rows))
                self.state_store.unpin(entry)
                request.num_computed_tokens = request.num_cached_tokens = entry.num_fed
            elif hit is not None:
                loads.append((hit.row, request.state_rows))
                request.num_computed_tokens = request.num_cached_tokens = hit.depth
            else:
                slots_to_reset.append(request.state_rows)
            for child in request.children:
                self._allocate_rows(child, counts)  # reserved; filled by the fork, not zeroed
            request.status = RequestStatus.RUNNING
            request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            num_long += is_long
            num_tokens = self._chunk_len(request, min(budget, threshold if is_long else budget))
            chunks.append([request, num_tokens])
            budget -= num_tokens
        if group is not _NO_GROUP:
            self._count_passes(queued, group)
        # Pass 4: what is left goes to the long prefills of this step, oldest first.
        for chunk in chunks:
            if budget <= 0:
                break
            request, num_tokens = chunk
            if request.is_prefilling and self._is_long(request.num_pending_tokens):
                chunk[1] = self._chunk_len(request, num_tokens + budget)
                budget -= chunk[1] - num_tokens
        return self._output([c for c in chunks if c[1] > 0], slots_to_reset, loads)

    def _output(
        self,
        chunks: list[list],
        slots_to_reset: list[Rows],
        loads: list[tuple[int | list, Rows]],
        is_quarantine: bool = False,
    ) -> SchedulerOutput:
        """The step's plain-data output for chunks of [request, tokens to feed] in batch order: the
        sequences, snapshot saves, n > 1 forks and the rows to sample."""
        sequences = [self._sequence(request, num_tokens) for request, num_tokens in chunks]
        # The live requests behind this step's plain data: update() and recover() fold the results into them.
        self._step = {request.request_id: request for request, _ in chunks}
        # One sparse adapter for every sequence: scattered into the weights; any other mix: the per-token add-on.
        sparse_slots = {seq.sparse_slot for seq in sequences}
        sparse_slot = sparse_slots.pop() if len(sparse_slots) == 1 else -1
        self.num_sparse_mixed_steps += sparse_slot < 0 and any(seq.sparse_slot >= 0 for seq in sequences)
        saves = self._plan_saves(sequences) if self.cache is not None else []
        for seq in sequences:
            if seq.start_position < self._step[seq.request_id].num_prompt_tokens:
                self.prefix_stats.num_prefill_tokens += len(seq.token_ids)
        forks: list[tuple[Rows, list[Rows]]] = []
        samples: list[tuple[SampleRow, int]] = []
        for index, seq in enumerate(sequences):
            if not seq.needs_sample:
                continue
            request = self._step[seq.request_id]
            samples.append((_sample_row(request), index))
            children = [c for c in request.children if c.status is RequestStatus.WAITING]
            if children and request.num_computed_tokens + len(seq.token_ids) == request.num_prompt_tokens:
                forks.append((request.state_rows, [c.state_rows for c in children]))
                samples.extend((_sample_row(child), index) for child in children)
                self._step.update((child.request_id, child) for child in children)
        finished, self._finished_since_step = self._finished_since_step, []
        end_saves, self._end_saves = self._end_saves, []
        adapter_loads, self._adapter_loads = self._adapter_loads, []
        return SchedulerOutput(
            sequences,
            slots_to_reset,
            forks,
            samples,
            finished,
            end_saves,
            loads,
            saves,
            is_quarantine,
            adapter_loads,
            sparse_slot=sparse_slot,
        )

    def take_state_saves(self) -> list[tuple[Request, Rows, Rows | None]]:
        """The completed requests whose end state is to be stored, with their rows (still unchanged: call before
        the next schedule())."""
        saves, self._state_saves = self._state_saves, []
        return saves

    def _allocate_rows(self, request: Request, counts: tuple[int, ...] | None) -> None:
        """Its rows: a slot in every layer (counts None), or per layer what its route needs."""
        if counts is None:
            request.slot_id = self.allocator.allocate()
            return
        first, second = self.allocator.allocate_route(counts)
        request.layer_rows, request.lane_rows = first, second if any(second) else None

    # -- weight affinity (sparse adapters) --------------------------------------------------------------------------

    def _weight_affinity(self, queued: list[Request]) -> tuple[list[Request], object]:
        """Admission order: the requests on the running batch's weights first (see the module docstring), and
        the group preferred (_NO_GROUP: queue order)."""
        if not self._num_sparse or not queued:
            return queued, _NO_GROUP
        running = {_weights(r) for r in self.running}
        if len(running) > 1 or any(self._passes.get(r.request_id, 0) >= MAX_SPARSE_PASSES for r in queued):
            return queued, _NO_GROUP
        group = running.pop() if running else _weights(queued[0])
        preferred = [r for r in queued if _weights(r) == group]
        return preferred + [r for r in queued if _weights(r) != group], group

    def _count_passes(self, queued: list[Request], group) -> None:
        """A request of another group still waiting behind an admitted one that arrived after it was passed over."""
        admitted = [i for i, r in enumerate(queued) if r.status is RequestStatus.RUNNING]
        last = max(admitted, default=-1)
        for i, request in enumerate(queued):
            if request.status is RequestStatus.RUNNING:
                self._passes.pop(request.request_id, None)
            elif i < last and _weights(request) != group:
                self._passes[request.request_id] = self._passes.get(request.request_id, 0) + 1

    # -- device adapter slots (LoRA and sparse) ------------------------------------------------------------------------

    def _can_place_adapter(self, request: Request) -> bool:
        return self.adapter_slots is not None and self.adapter_slots.can_acquire(_adapter(request))

    def _place_adapter(self, request: Request) -> None:
        """Pin a device slot holding the request's adapter for it and its children (one pin per sample)."""
        samples = [request, *request.children]
        adapter = _adapter(request)
        placed = self.adapter_slots.acquire(adapter, count=len(samples))
        if placed is None:  # _can_place_adapter said yes within this same step
            raise RuntimeError("an adapter slot checked free was taken")
        slot, needs_load = placed
        if needs_load:
            self._adapter_loads.append((slot, adapter))
        for sample in samples:
            sample.adapter_slot = slot

    def running_adapters(self) -> list[str]:
        """Names of the adapters (LoRA and sparse) running requests use (vLLM's running_lora_adapters)."""
        return self.adapter_slots.running_names() if self.adapter_slots is not None else []

    def waiting_adapters(self) -> list[str]:
        """Names of the adapters waiting requests ask for (vLLM's waiting_lora_adapters)."""
        waiting = (r for r in self.requests.values() if r.status is RequestStatus.WAITING and r.parent_id is None)
        return sorted({adapter.name for r in waiting if (adapter := _adapter(r)) is not None})

    def _is_long(self, num_prefill_tokens: int) -> bool:
        return 0 < self.long_prefill_token_threshold < num_prefill_tokens

    def _hit_depth(self, request: Request, plan: _PrefixPlan | None) -> int:
        """Prompt tokens a waiting request would load from a snapshot or its stored state if admitted now (read
        only): what it does not prefill does not make it a long prompt."""
        if request.resume is not None:
            return request.resume.num_fed
        if plan is None or not self.long_prefill_token_threshold:
            return 0
        return self.cache.hit_depth(plan.key, request.prompt_token_ids, request.num_prompt_tokens - 1)

    def recover(self, output: SchedulerOutput) -> list[Request]:
        """The runner raised while executing `output` (instead of update()). Drops the snapshots the step
        may have half written and quarantines the step's requests, whose states may be half updated (a failed
        quarantine group is split in two; see the module docstring). Returns the requests found to be the
        cause, finished with FINISHED_ERROR: a failed group of one, or requests at MAX_FAILED_STEPS."""
        if self.cache is not None:
            self._drop_step_snapshots(output)
        failed: list[Request] = []
        if output.is_quarantine:
            group = self._quarantine.popleft()
            if len(group) == 1:
                failed = group
                group = []
            else:
                half = len(group) // 2
                self._quarantine.extendleft([group[half:], group[:half]])  # bisect: the first half runs next
        else:
            group = [self._step[s.request_id] for s in output.sequences]
            group = [r for r in group if not r.status.is_finished]  # one each
            for request in group:
                request.num_failed_steps += 1
                if request.num_failed_steps >= MAX_FAILED_STEPS:
                    failed.append(request)  # in every failing batch, never caught alone: give up on it too
            group = [r for r in group if all(r is not f for f in failed)]
            if group:
                self._quarantine.append(group)
        for request in failed:
            self.finish(request, RequestStatus.FINISHED_ERROR)
        for request in group:
            request.num_computed_tokens = 0
            self._pending_resets.append(request.state_rows)
            if request.lane_rows is not None:
                self._pending_resets.append(request.lane_rows)
            self._samples_owed[request.request_id] = QUARANTINE_SAMPLES
        return failed

    def _leave_quarantine(self, request: Request) -> None:
        for group in self._quarantine:
            group[:] = [r for r in group if r is not request]
        while self._quarantine and not self._quarantine[0]:
            self._quarantine.popleft()

    def _drop_step_snapshots(self, output: SchedulerOutput) -> None:
        """Forget every snapshot row the failed step was to write (end states, chunk ends) and the step's pins."""
        for node in self._step_pins:
            node.pins -= 1
        self._step_pins = []
        for node in self._step_saves:
            node.claimed_by = None
            self._release_followers(node, pin=False)  # they plan their admission again
        self._step_saves = []
        self.cache.discard_rows({row for _, row in output.end_saves} | {row for _, row in output.saves})

    def update(self, output: SchedulerOutput, result: StepResult) -> list[RequestUpdate]:
        """Fold the step's results in: advance states, append tokens, check stops, free slots."""
        step = self._step
        for seq in output.sequences:  # routes the routers decided: frozen from now on
            route = result.routes.get(seq.request_id)
            request = step[seq.request_id]
            if route is not None and request.auto_route_bias is not None:
                request.layer_route, request.auto_route_bias = route, None
            if route is not None and request.layer_rows is not None and request.lane_rows is not None:
                # It held two rows in every layer until now: the rows its route does not use go back (an abort
                # while the step ran gave back all of them already).
                first, unused_first = _split(request.layer_rows, [count >= 1 for count in route])
                second, unused_second = _split(request.lane_rows, [count == 2 for count in route])
                self.allocator.release(unused_first, unused_second)
                request.layer_rows, request.lane_rows = first, second if any(second) else None
            if request.layer_route is not None:  # per token fed: layers skipped and second passes run
                self.num_layer_passes_skipped += request.layer_route.count(0) * len(seq.token_ids)
                self.num_layer_passes_repeated += request.layer_route.count(2) * len(seq.token_ids)
        if output.is_quarantine:
            for row, _index in output.samples:
                if row.request_id in self._samples_owed:  # forked children are not suspects
                    self._samples_owed[row.request_id] -= 1
            group = self._quarantine[0] if self._quarantine else []
            if all(not self._samples_owed.get(r.request_id) for r in group):
                # Rebuilt, and one more step ran: the group rejoins the others.
                for request in group:
                    self._samples_owed.pop(request.request_id, None)
                self._quarantine.popleft()
        if self.cache is not None:
            self._land_snapshots()
        for seq in output.sequences:
            request = step[seq.request_id]
            request.num_computed_tokens += len(seq.token_ids)
            plan = self._plans.get(seq.request_id)
            if plan is not None and plan.path is not None and not request.is_prefilling:
                self._release_path(plan)  # the prompt is in the state: its path no longer needs holding
        sampled = [step[row.request_id] for row, _index in output.samples]
        for request in sampled:
            if request.parent_id is not None and request.status is RequestStatus.WAITING:
                # A child whose slot now holds its parent's prefilled prompt. All children start
                # running before any stop check, so a parent that ends at once does not take them along.
                request.status = RequestStatus.RUNNING
                request.num_computed_tokens = request.num_prompt_tokens
                self.running.append(request)
        updates: list[RequestUpdate] = []
        for request in sampled:
            if request.status.is_finished:  # aborted while the step ran
                continue
            token_id = result.sampled_token_ids[request.request_id]
            request.output_token_ids.append(token_id)
            logprob = result.logprobs.get(request.request_id)
            self._check_stop(request, token_id)
            updates.append(
                RequestUpdate(request, [token_id], [logprob] if logprob is not None else [], request.status.is_finished)
            )
        return updates

    def _check_stop(self, request: Request, token_id: int) -> None:
        params = request.sampling_params
        num_output = len(request.output_token_ids)
        if num_output >= params.min_tokens:
            if token_id in self.eos_token_ids and not params.ignore_eos:
                self.finish(request, RequestStatus.FINISHED_STOPPED)
                return
            if token_id in params.stop_token_ids:
                self.finish(request, RequestStatus.FINISHED_STOPPED, stop_reason=token_id)
                return
        if num_output >= params.max_tokens:
            self.finish(request, RequestStatus.FINISHED_LENGTH)

    def _sequence(self, request: Request, num_tokens: int) -> ScheduledSequence:
        token_ids = request.token_ids_to_compute(num_tokens)
        feeds_all = num_tokens >= request.num_pending_tokens  # the prompt's end, a decode, a rebuilt state
        is_sparse = request.sparse is not None
        slot = request.slot_id
        if request.layer_rows is not None:
            # A routed request's rows given out as one id in every layer it runs (the usual case: the allocator
            # packs a route into one row id when it can) go as its slot too, so the layers every sequence of a
            # step runs take the plain path; others keep 0 and run on their per-layer rows.
            ids = {row for row in request.layer_rows if row}
            slot = ids.pop() if len(ids) == 1 else 0
        return ScheduledSequence(
            request.request_id,
            slot,
            token_ids,
            request.num_computed_tokens,
            feeds_all,
            -1 if is_sparse else request.adapter_slot,
            request.adapter_slot if is_sparse else -1,
            request.layer_route,
            request.layer_rows,
            request.lane_rows,
            request.auto_route_bias,
        )

    def _num_reserved(self) -> int:
        """Slots held by children that have not forked yet (they count against max_num_seqs)."""
        return sum(1 for r in self.running for c in r.children if c.status is RequestStatus.WAITING)

    # -- prefix-state cache ------------------------------------------------------------------------

    def _chunk_len(self, request: Request, budget: int) -> int:
        """Tokens to feed this step: what the budget allows, cut at the next claimed branch point."""
        num_tokens = min(request.num_pending_tokens, budget)
        plan = self._plans.get(request.request_id)
        if plan is not None and plan.claims:
            next_point = min(plan.claims)  # claims lie beyond num_computed_tokens: landed ones are removed
            num_tokens = min(num_tokens, next_point - request.num_computed_tokens)
        return num_tokens

    def _plan_admission(self, request: Request, plan: _PrefixPlan) -> tuple[RadixNode | None, RadixNode | None]:
        """At admission: (snapshot to load or None, pending snapshot to wait for or None). Claims the
        branch points beyond the hit that nobody else will save."""
        cache, prompt = self.cache, request.prompt_token_ids
        if plan.path is None and not self.group_prefixes:
            plan.path = cache.insert_path(plan.key, prompt[:-1])
        info = cache.path_info(plan.key, prompt, len(prompt) - 1, request.request_id)
        if self.group_prefixes and info.pending is not None:
            if info.pending.depth - info.hit_depth >= self.min_snapshot_tokens:
                return None, info.pending
        if plan.pinned is not None:
            plan.pinned.pins -= 1
            plan.pinned = None
        stats = self.prefix_stats
        stats.num_queries += 1
        stats.num_query_tokens += len(prompt)
        hit = info.hit
        if hit is not None:
            cache.touch(hit)
            hit.pins += 1  # until update(): a later admission this step must not evict it
            self._step_pins.append(hit)
            stats.num_hits += 1
            stats.num_hit_tokens += hit.depth
        last = info.hit_depth
        for node in info.branches:
            if node.claimed_by is None and node.depth - last >= self.min_snapshot_tokens:
                node.claimed_by = request.request_id
                plan.claims[node.depth] = node
                last = node.depth
        return hit, None

    def _plan_saves(self, sequences: list[ScheduledSequence]) -> list[tuple[Rows, int]]:
        """Snapshot rows to write after this step's forward: claimed branch points reached by this chunk
        (always, evicting if need be) and other chunk or prompt ends (when a row is free or worth less)."""
        cache = self.cache
        saves: list[tuple[Rows, int]] = []
        for seq in sequences:
            request = self._step[seq.request_id]
            plan = self._plans.get(request.request_id)
            end = seq.start_position + len(seq.token_ids)
            # Snapshots are of prompt prefixes only (a rebuilt state's chunk may run into the output).
            if plan is None or end > request.num_prompt_tokens:
                continue
            tokens = request.prompt_token_ids[:end]
            node = plan.claims.pop(end, None)
            if node is not None:
                row = cache.allocate_row()
                saved = cache.save(plan.key, tokens, row, is_ready=False) if row is not None else None
                if saved is None:
                    self._drop_claim(node)
                    continue
            else:
                gain = end - self._deepest_state_on_path(plan.key, tokens)
                if gain < self.min_save_tokens:
                    continue
                row = cache.allocate_row(min_value=gain / cache.state_bytes)
                if row is None:
                    continue
                saved = cache.save(plan.key, tokens, row, is_ready=False)
                if saved is None:
                    continue
            self._step_saves.append(saved)
            saves.append((request.state_rows, saved.row))
        return saves

    def _deepest_state_on_path(self, key: PrefixKey, tokens: list[int]) -> int:
        """Depth of the deepest snapshot (written or on its way) on the path of tokens, 0 if none."""
        depth = 0
        for node in self.cache.walk(key, tokens, len(tokens)):
            if node.row is not None or node.is_pending:
                depth = node.depth
        return depth

    def _land_snapshots(self) -> None:
        """After the runner wrote this step's saves: they become loadable, their followers queue up first."""
        for node in self._step_pins:
            node.pins -= 1
        self._step_pins = []
        for node in self._step_saves:
            node.is_ready = True
            node.claimed_by = None
            self._release_followers(node, pin=True)
        self._step_saves = []

    def _save_end_state(self, request: Request) -> None:
        """Keep a finishing request's state as a snapshot (multi-turn chat resumes from it). The state
        holds the tokens fed so far: for a finished sample, prompt + output[:-1] (the last sampled token
        was never fed)."""
        if self.cache is None or request.cache_key is None:
            return
        tokens = (request.prompt_token_ids + request.output_token_ids)[: request.num_computed_tokens]
        gain = len(tokens) - self._deepest_state_on_path(request.cache_key, tokens)
        if gain < self.min_save_tokens:
            return
        row = self.cache.allocate_row(min_value=gain / self.cache.state_bytes)
        if row is None:
            return
        # Ready at once: the copy runs first thing in the next step, before any load can read the row
        # and before the freed slot is reset for its next owner.
        if self.cache.save(request.cache_key, tokens, row, is_ready=True) is not None:
            # The row may have been evicted from an end state saved since the last step: last one wins.
            self._end_saves = [pair for pair in self._end_saves if pair[1] != row]
            self._end_saves.append((request.state_rows, row))

    def _unqueue(self, request: Request) -> None:
        """Take a waiting request out of whichever queue holds it (ready, sorted waiting, or blocked)."""
        if self._ready and self._ready[0] is request:
            self._ready.popleft()
            return
        plan = self._plans.get(request.request_id)
        if plan is not None and plan.blocked_on is not None:
            plan.blocked_on.followers.remove(request)
            plan.blocked_on = None
            self._num_blocked -= 1
            return
        if request in self._ready:
            self._ready.remove(request)
            return
        if self.waiting and self.waiting[0] is request:
            del self.waiting[0]
            return
        if plan is not None and self.group_prefixes:
            index = bisect.bisect_left(self.waiting, plan.priority, key=lambda r: self._plans[r.request_id].priority)
            if index < len(self.waiting) and self.waiting[index] is request:
                del self.waiting[index]
                return
        if request in self.waiting:
            self.waiting.remove(request)

    def _block(self, request: Request, plan: _PrefixPlan, node: RadixNode) -> None:
        if plan.pinned is not None:
            plan.pinned.pins -= 1
            plan.pinned = None
        node.followers.append(request)
        plan.blocked_on = node
        self._num_blocked += 1

    def _release_followers(self, node: RadixNode, pin: bool) -> None:
        """The snapshot landed (pin: it stays until each follower loaded it) or will not come (no pin)."""
        for follower in node.followers:
            plan = self._plans[follower.request_id]
            plan.blocked_on = None
            if pin:
                node.pins += 1
                plan.pinned = node
            self._ready.append(follower)
        self._num_blocked -= len(node.followers)
        node.followers = []

    def _drop_claim(self, node: RadixNode) -> None:
        node.claimed_by = None
        self._release_followers(node, pin=False)

    def _release_path(self, plan: _PrefixPlan) -> None:
        for node in plan.claims.values():
            self._drop_claim(node)
        plan.claims.clear()
        self.cache.release_path(plan.path)
        plan.path = None

    def _drop_plan(self, request: Request, plan: _PrefixPlan) -> None:
        """A request ends: its claims, pins and path go."""
        if plan.pinned is not None:
            plan.pinned.pins -= 1
            plan.pinned = None
        if plan.path is not None:
            self._release_path(plan)

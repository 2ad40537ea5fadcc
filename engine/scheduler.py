"""Continuous batching under a token budget over a fixed pool of state slots.

One engine step is schedule() -> runner.execute() -> update(). Only the scheduler changes a
request's status or allocates and frees slots; everything it hands the runner is plain data.
A recurrent request never grows, so there is no preemption: admission is "is there a free slot".
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from linrec.engine.request import Request, RequestStatus
from linrec.engine.state_pool import SlotAllocator


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 429)."""


@dataclass
class ScheduledSequence:
    request: Request  # read-only for the runner (token history and sampling params)
    slot_id: int  # state row this sequence reads and writes
    token_ids: list[int]  # tokens fed this step: a prefill chunk or the one pending decode token
    start_position: int  # tokens already folded into the state before this step
    needs_sample: bool  # the chunk ends the prompt, or it is a decode: sample the next token


@dataclass
class SchedulerOutput:
    sequences: list[ScheduledSequence]  # decodes first, then prefill chunks; their order is the batch order
    slots_to_reset: list[int]  # slots handed to new requests this step: zeroed before the forward
    # After the forward, copy the state in the first slot into each of the others (n > 1 children
    # forking from their parent's prefilled prompt).
    forks: list[tuple[int, list[int]]]
    # Rows to sample: (request, index into `sequences` whose last-token logits it samples from).
    # Forking children sample from their parent's row, each with its own generator.
    samples: list[tuple[Request, int]]
    finished_request_ids: list[str]  # finished since the last step (the runner drops their generators)

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


@dataclass
class RequestUpdate:
    """One request's progress in one step, for the output processor."""

    request: Request
    new_token_ids: list[int]
    new_logprobs: list[object]
    finished: bool


class Scheduler:
    def __init__(
        self,
        num_slots: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_waiting_requests: int,
        eos_token_ids: tuple[int, ...] = (),
    ):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"expected max_num_batched_tokens >= max_num_seqs so every running request can decode each step, "
                f"got {max_num_batched_tokens} < {max_num_seqs}"
            )
        self.allocator = SlotAllocator(num_slots)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting_requests = max_waiting_requests
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # holds slots; in admission order
        self.requests: dict[str, Request] = {}  # every unfinished request, children included
        self._finished_since_step: list[str] = []

    # -- requests in and out -----------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a prompt; an n > 1 prompt must arrive as one parent with its children attached."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if len(self.waiting) >= self.max_waiting_requests:
            raise QueueFullError(f"waiting queue is full ({self.max_waiting_requests} requests)")
        if 1 + len(request.children) > min(self.max_num_seqs, self.allocator.num_slots):
            raise ValueError(
                f"n={1 + len(request.children)} samples need that many state slots at once, but at most "
                f"{min(self.max_num_seqs, self.allocator.num_slots)} requests can run together"
            )
        self.waiting.append(request)
        self.requests[request.request_id] = request
        for child in request.children:
            self.requests[child.request_id] = child

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
        if request.status is RequestStatus.WAITING:
            if request in self.waiting:
                self.waiting.remove(request)
        elif request in self.running:
            self.running.remove(request)
        if request.slot_id:
            self.allocator.free(request.slot_id)
            request.slot_id = 0
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
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- one step ----------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        sequences: list[ScheduledSequence] = []
        slots_to_reset: list[int] = []
        # Every decoding request gets its one token first: decode latency never waits on prefills.
        for request in self.running:
            if not request.is_prefilling:
                sequences.append(self._sequence(request, 1))
                budget -= 1
        # Then the prompts already started, oldest first, chunked to what the budget leaves.
        for request in self.running:
            if budget <= 0:
                break
            if request.is_prefilling:
                num_tokens = min(request.num_prompt_tokens - request.num_computed_tokens, budget)
                sequences.append(self._sequence(request, num_tokens))
                budget -= num_tokens
        # Then admit waiting prompts while there are slots (n of them for an n-sample prompt).
        while self.waiting and budget > 0:
            request = self.waiting[0]
            num_samples = 1 + len(request.children)
            if (
                self.allocator.num_free < num_samples
                or len(self.running) + self._num_reserved() + num_samples > self.max_num_seqs
            ):
                break
            self.waiting.popleft()
            request.slot_id = self.allocator.allocate()
            slots_to_reset.append(request.slot_id)
            for child in request.children:
                child.slot_id = self.allocator.allocate()  # reserved; filled by the fork, not zeroed
            request.status = RequestStatus.RUNNING
            request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            num_tokens = min(request.num_prompt_tokens, budget)
            sequences.append(self._sequence(request, num_tokens))
            budget -= num_tokens

        forks: list[tuple[int, list[int]]] = []
        samples: list[tuple[Request, int]] = []
        for index, seq in enumerate(sequences):
            if not seq.needs_sample:
                continue
            samples.append((seq.request, index))
            children = [c for c in seq.request.children if c.status is RequestStatus.WAITING]
            if children and seq.request.num_computed_tokens + len(seq.token_ids) == seq.request.num_prompt_tokens:
                forks.append((seq.slot_id, [c.slot_id for c in children]))
                samples.extend((child, index) for child in children)
        finished, self._finished_since_step = self._finished_since_step, []
        return SchedulerOutput(sequences, slots_to_reset, forks, samples, finished)

    def update(self, output: SchedulerOutput, result: StepResult) -> list[RequestUpdate]:
        """Fold the step's results in: advance states, append tokens, check stops, free slots."""
        for seq in output.sequences:
            seq.request.num_computed_tokens += len(seq.token_ids)
        for request, _index in output.samples:
            if request.parent_id is not None and request.status is RequestStatus.WAITING:
                # A child whose slot now holds its parent's prefilled prompt. All children start
                # running before any stop check, so a parent that ends at once does not take them along.
                request.status = RequestStatus.RUNNING
                request.num_computed_tokens = request.num_prompt_tokens
                self.running.append(request)
        updates: list[RequestUpdate] = []
        for request, _index in output.samples:
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

    @staticmethod
    def _sequence(request: Request, num_tokens: int) -> ScheduledSequence:
        token_ids = request.token_ids_to_compute(num_tokens)
        ends_prompt = request.num_computed_tokens + num_tokens >= request.num_prompt_tokens
        return ScheduledSequence(request, request.slot_id, token_ids, request.num_computed_tokens, ends_prompt)

    def _num_reserved(self) -> int:
        """Slots held by children that have not forked yet (they count against max_num_seqs)."""
        return sum(1 for r in self.running for c in r.children if c.status is RequestStatus.WAITING)

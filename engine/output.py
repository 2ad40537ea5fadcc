"""Turns per-step token updates into text: incremental detokenization and stop strings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from linrec.engine.detokenizer import IncrementalDetokenizer
from linrec.engine.request import Logprob, Request
from linrec.engine.scheduler import RequestUpdate
from linrec.engine.stop_strings import StopStringMatcher

logger = logging.getLogger(__name__)


@dataclass
class SampleDelta:
    """What one sample of one prompt gained in one step."""

    request_id: str  # the prompt's id (the parent's), shared by its n samples
    index: int  # which sample
    text: str  # new text safe to show (held back while it may still become a stop string)
    token_ids: list[int]
    logprobs: list[Logprob]
    finish_reason: str | None  # set on the sample's last delta
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None  # time.monotonic() when the prompt got its slot (for metrics)
    layer_route: tuple[int, ...] | None = None  # the route the sample runs (given or decided); None: every layer
    # On the sample's last delta: the whole prompt the engine ran (a continuation's stored conversation
    # included), and how many of its tokens were not prefilled (loaded from a stored state or a prefix snapshot).
    num_prompt_tokens: int | None = None
    num_cached_tokens: int | None = None


@dataclass
class _SampleState:
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._samples: dict[str, _SampleState] = {}  # engine request id (parent or child) -> state

    def add(self, request: Request) -> None:
        # One stop-string automaton per distinct tuple of stop strings, shared read-only by the samples'
        # detokenizers (each keeps its own cursor): the n samples of a prompt pay for one build.
        stop_matchers: dict[tuple[str, ...], StopStringMatcher] = {}
        for sample in (request, *request.children):
            params = sample.sampling_params
            stop_matcher = None
            if params.stop:
                stop_matcher = stop_matchers.get(params.stop)
                if stop_matcher is None:
                    stop_matcher = stop_matchers[params.stop] = StopStringMatcher(params.stop)
            self._samples[sample.request_id] = _SampleState(
                IncrementalDetokenizer(
                    self.tokenizer,
                    sample.prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop_matcher=stop_matcher,
                )
            )

    def process(
        self, updates: list[RequestUpdate]
    ) -> tuple[list[SampleDelta], list[tuple[Request, str]], list[Request]]:
        """Returns the deltas, the requests a stop string ended (the caller tells the scheduler), and the
        requests whose text could not be made (a tokenizer error on their tokens: they alone fail)."""
        deltas: list[SampleDelta] = []
        stopped: list[tuple[Request, str]] = []
        failed: list[Request] = []
        for update in updates:
            request = update.request
            state = self._samples.get(request.request_id)
            if state is None:
                continue
            try:
                delta, stop_string = self._delta(update, state)
            except Exception:
                logger.exception("linrec: detokenizing request %s failed; it alone ends", request.request_id)
                del self._samples[request.request_id]
                failed.append(request)
                continue
            deltas.append(delta)
            if stop_string is not None:
                stopped.append((request, stop_string))
            if delta.finish_reason is not None:
                del self._samples[request.request_id]
        return deltas, stopped, failed

    @staticmethod
    def _delta(update: RequestUpdate, state: _SampleState) -> tuple[SampleDelta, str | None]:
        """One update's delta, and the stop string that ended a request the scheduler still runs (or None)."""
        request, detokenizer = update.request, state.detokenizer
        text = ""
        for token_id in update.new_token_ids:
            text += detokenizer.append(token_id)
            if detokenizer.stop_reason is not None:
                break
        finish_reason, stop_reason = request.finish_reason, request.stop_reason
        if detokenizer.stop_reason is not None:
            finish_reason, stop_reason = "stop", detokenizer.stop_reason
        elif finish_reason is not None:
            text += detokenizer.flush()
        delta = SampleDelta(
            request.parent_id or request.request_id,
            request.sample_index,
            text,
            list(update.new_token_ids),
            list(update.new_logprobs),
            finish_reason,
            stop_reason,
            request.first_scheduled_time if request.parent_id is None else None,
            request.layer_route,
        )
        if finish_reason is not None:
            delta.num_prompt_tokens, delta.num_cached_tokens = request.num_prompt_tokens, request.num_cached_tokens
        stop_string = detokenizer.stop_reason if detokenizer.stop_reason is not None and not update.finished else None
        return delta, stop_string

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._samples.pop(request_id, None)

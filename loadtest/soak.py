"""The soak: minutes of mixed, hostile traffic against one server, then three checks.

    linrec bench serve --soak --run-time 10m --users 8 --out soak.json

--users clients (asyncio + httpx, closed loop) send a seeded mix: completions and chat, streamed and
not, sometimes n > 1, stop strings, valid stop_token_ids with min_tokens, prompts sharing long
prefixes (the prefix cache), short and longer max_tokens; a fraction of requests is cut off by the
client on purpose (streams closed after a few events, non-streaming requests whose connection is
dropped by a short read timeout), and a fraction is bad (malformed JSON, wrong types, out-of-range
values, an unknown model, out-of-vocabulary token ids, empty messages, an over-long prompt). Then:

- nothing lost: every request ended in a complete answer, or in a 4xx in OpenAI's error shape (a bad
  request must get one; a valid one only a 429), or in a disconnect the soak made itself. A 5xx, a
  connection error, no answer within --request-timeout, a malformed stream or one without
  `data: [DONE]` is a failure.
- slots back to zero: within --settle-timeout after the traffic stops, /metrics reports no state
  slot in use and no request running or waiting.
- RSS flat: the server's resident memory, sampled every --rss-interval, grew by at most
  --max-rss-growth from the first sample after the warm-up (the first 20% of the run) to the last.

The exit code is 0 when all three pass, 1 when any fails, 2 when the soak could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
import json
import os
import random
import re
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from linrec.loadtest.run import LoadTestError, machine, started_server
from linrec.loadtest.summary import KIND_ORDER, percentile

# The gauges server/metrics.py exports (its PREFIX is "linrec:"); read by name so that the soak,
# which may drive a remote server, never imports the server package (torch).
SLOT_GAUGES = ("linrec:state_slots_used", "linrec:num_requests_running", "linrec:num_requests_waiting")
RSS_METRIC = "process_resident_memory_bytes"  # prometheus_client's process collector, where registered
OUT_OF_VOCAB_ID = 999_999_999  # above any real vocabulary (the largest are ~256k) and still an int32
BAD_KINDS = (
    "malformed-json",
    "wrong-type",
    "out-of-range",
    "unknown-model",
    "oov-prompt",
    "oov-stop-token-ids",
    "empty-messages",
    "over-long-prompt",
)
# A server the soak starts gets a short context limit (the state does not grow with it), so that an
# over-long prompt is cheap to send. Prompts the mix means as valid stay well below it.
SOAK_MAX_MODEL_LEN = 2048
DEFAULT_RUN_TIME = "10m"  # --run-time with --soak: long enough for a slow leak to show over the warm-up
WARMUP_FRACTION = 0.2  # RSS growth is measured from the first sample after this part of the run
NUM_SHARED_PREFIXES = 4
SHARED_PREFIX_CHARS = 800
MAX_FAILURES_KEPT = 20
STOP_STRINGS = ("e", "the", "\n", ".", " a")
WORDS = (
    "state slot recurrent linear attention token prompt prefix cache window decode prefill chunk batch "
    "request server engine stream answer model layer gate memory sample kernel"
).split()
QUESTIONS = (
    "Write a short poem about the sea.",
    "Explain recurrent state in one sentence.",
    "List three prime numbers:",
    "Once upon a time",
    "The quick brown fox",
)


@dataclass(frozen=True)
class PlannedRequest:
    kind: str  # "completions", "chat (stream)", ... or "bad <name>" (one of BAD_KINDS)
    path: str  # "/v1/completions" or "/v1/chat/completions"
    body: bytes  # sent as is: a bad request's body need not be JSON
    is_stream: bool
    num_choices: int = 1  # choices a complete answer carries: n (one prompt per request)
    disconnect_after_events: int | None = None  # a stream the client closes after this many events
    disconnect_after_s: float | None = None  # a non-streaming request whose connection drops after this long
    features: tuple[str, ...] = ()  # what else the request exercises ("n>1", "stop", "shared prefix", ...)

    @property
    def is_bad(self) -> bool:
        return self.kind.startswith("bad ")

    def describe(self, max_chars: int = 240) -> str:
        """The request in one line, long strings and lists elided (a failure's report quotes it)."""
        try:
            body = json.dumps(_elide(json.loads(self.body)), ensure_ascii=False)
        except ValueError:
            body = repr(self.body[:80])
        text = f"POST {self.path} {body}"
        return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def _elide(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 48:
        return f"<{len(value)} chars>"
    if isinstance(value, list):
        return [_elide(v) for v in value] if len(value) <= 8 else f"<{len(value)} items>"
    if isinstance(value, dict):
        return {k: _elide(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok" (a complete answer), "4xx" (an OpenAI-shaped refusal), "disconnected" (by us), "failed"
    reason: str = ""  # a failure's cause, or the refusal's message

    @property
    def is_failure(self) -> bool:
        return self.status == "failed"


OUTCOMES = ("ok", "4xx", "disconnected", "failed")


# -- outcome classification (pure: the unit tests feed it fake responses) ----------------------------


def _error_message(body: bytes) -> str | None:
    """The message of OpenAI's error shape {"error": {"message", "type", "param", "code"}}; None if not."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= error.keys():
        return None
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return None
    return error["message"]


def classify_refusal(plan: PlannedRequest, status_code: int, body: bytes) -> Outcome:
    """Any answer but a 200. A 4xx must be in OpenAI's error shape; a valid request may only be told
    to retry (429): the mix sends nothing else a server may refuse, so a 400 on it is a bug somewhere."""
    message = _error_message(body)
    if 400 <= status_code < 500:
        if message is None:
            return Outcome("failed", f"HTTP {status_code} not in OpenAI's error shape: {body[:120]!r}")
        if plan.is_bad or status_code == 429:
            return Outcome("4xx", f"HTTP {status_code}: {message}")
        return Outcome("failed", f"a valid request was refused: HTTP {status_code}: {message}")
    return Outcome("failed", f"HTTP {status_code}: {repr(body[:120]) if message is None else message}")


def _check_choices(plan: PlannedRequest, finish_reasons: dict[int, str | None]) -> str | None:
    expected = set(range(plan.num_choices))
    if set(finish_reasons) != expected:
        return f"expected choices {sorted(expected)}, got {sorted(finish_reasons)}"
    for index, reason in sorted(finish_reasons.items()):
        if reason not in ("stop", "length"):
            return f"expected choice {index} to finish with stop or length, got {reason!r}"
    return None


def classify_answer(plan: PlannedRequest, status_code: int, body: bytes) -> Outcome:
    """A non-streaming request's whole answer."""
    if status_code != 200:
        return classify_refusal(plan, status_code, body)
    if plan.is_bad:
        return Outcome("failed", f"expected a 4xx for {plan.kind}, got 200")
    try:
        answer = json.loads(body)
        choices = answer["choices"]
        finish_reasons = {choice["index"]: choice["finish_reason"] for choice in choices}
        if "chat" in plan.kind:
            texts = [choice["message"]["content"] for choice in choices]
        else:
            texts = [choice["text"] for choice in choices]
    except (ValueError, KeyError, TypeError) as exc:
        return Outcome("failed", f"expected an answer with choices, got {type(exc).__name__} on {body[:120]!r}")
    if not all(isinstance(text, str) for text in texts):
        return Outcome("failed", "expected every choice's text to be a string")
    problem = _check_choices(plan, finish_reasons)
    return Outcome("failed", problem) if problem else Outcome("ok")


class StreamCheck:
    """Checks a stream's lines as they come: every `data:` event parses (or is the final [DONE]),
    none is an error, and by [DONE] every choice has finished."""

    def __init__(self, plan: PlannedRequest):
        self.plan = plan
        self.num_events = 0
        self.is_done = False
        self.finish_reasons: dict[int, str | None] = {}

    def feed(self, line: str) -> str | None:
        """A failure's reason, or None while the stream looks right."""
        if not line or line.startswith(":"):  # event separators and SSE comments
            return None
        if not line.startswith("data:"):
            return f"expected only `data:` lines in the stream, got {line[:80]!r}"
        if self.is_done:
            return f"expected nothing after data: [DONE], got {line[:80]!r}"
        self.num_events += 1
        data = line[5:].strip()
        if data == "[DONE]":
            self.is_done = True
            return None
        try:
            event = json.loads(data)
        except ValueError:
            return f"expected a JSON event, got {data[:80]!r}"
        if not isinstance(event, dict):
            return f"expected a JSON object event, got {data[:80]!r}"
        if "error" in event:
            message = event["error"].get("message") if isinstance(event["error"], dict) else event["error"]
            return f"error event in the stream: {message}"
        try:
            for choice in event["choices"]:
                index = choice["index"]
                if choice.get("finish_reason") is not None:
                    self.finish_reasons[index] = choice["finish_reason"]
                else:
                    self.finish_reasons.setdefault(index, None)
        except (KeyError, TypeError) as exc:
            return f"expected an event with choices, got {type(exc).__name__} on {data[:80]!r}"
        return None

    def finish(self) -> Outcome:
        """The outcome of a stream the server ended."""
        if not self.is_done:
            return Outcome("failed", "the stream ended before data: [DONE]")
        if self.plan.is_bad:
            return Outcome("failed", f"expected a 4xx for {self.plan.kind}, got a 200 stream")
        problem = _check_choices(self.plan, self.finish_reasons)
        return Outcome("failed", problem) if problem else Outcome("ok")


def classify_stream(plan: PlannedRequest, status_code: int, body: bytes) -> Outcome:
    """A stream read to its end, all at once (what `send` does line by line)."""
    if status_code != 200:
        return classify_refusal(plan, status_code, body)
    check = StreamCheck(plan)
    for line in body.decode(errors="replace").splitlines():
        problem = check.feed(line)
        if problem:
            return Outcome("failed", problem)
    return check.finish()


# -- sending -----------------------------------------------------------------------------------------


async def send(client: httpx.AsyncClient, url: str, plan: PlannedRequest, request_timeout: float) -> Outcome:
    """Send one planned request and classify how it ended; never raises for what the server does."""
    try:
        return await asyncio.wait_for(_send(client, url, plan, request_timeout), request_timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return Outcome("failed", f"no complete answer within {request_timeout:g}s")
    except httpx.TransportError as exc:  # refused, reset, closed mid-body: the server lost the request
        return Outcome("failed", f"connection error: {type(exc).__name__}: {exc}")


async def _send(client: httpx.AsyncClient, url: str, plan: PlannedRequest, request_timeout: float) -> Outcome:
    headers = {"Content-Type": "application/json"}
    if not plan.is_stream:
        # A short read timeout drops the connection while the server still computes the answer.
        timeout = httpx.Timeout(request_timeout, read=plan.disconnect_after_s or request_timeout)
        try:
            response = await client.post(url + plan.path, content=plan.body, headers=headers, timeout=timeout)
        except httpx.ReadTimeout:
            if plan.disconnect_after_s is None:
                raise
            return Outcome("disconnected")
        return classify_answer(plan, response.status_code, response.content)
    async with client.stream("POST", url + plan.path, content=plan.body, headers=headers) as response:
        if response.status_code != 200:
            return classify_refusal(plan, response.status_code, await response.aread())
        check = StreamCheck(plan)
        async for line in response.aiter_lines():  # read past [DONE]: nothing may follow it
            problem = check.feed(line)
            if problem:
                return Outcome("failed", problem)
            cut_here = plan.disconnect_after_events is not None and check.num_events >= plan.disconnect_after_events
            if cut_here and not check.is_done:
                return Outcome("disconnected")  # leaving the block closes the half-read connection
        return check.finish()


# -- the traffic mix ----------------------------------------------------------------------------------


def shared_prefixes(seed: int, max_chars: int) -> list[str]:
    """Long prompt prefixes that every user draws from (the same seed gives the same prefixes)."""
    rng = random.Random(f"{seed}:prefixes")
    prefixes = []
    for i in range(NUM_SHARED_PREFIXES):
        words: list[str] = [f"Context {i}:"]
        while sum(len(w) + 1 for w in words) < max_chars:
            words.append(rng.choice(WORDS))
        prefixes.append(" ".join(words)[:max_chars] + "\n")
    return prefixes


class TrafficMix:
    """One user's seeded stream of planned requests."""

    def __init__(
        self,
        rng: random.Random,
        model_name: str,
        max_model_len: int | None,
        max_tokens: int,
        disconnect_fraction: float,
        bad_fraction: float,
        bad_kinds: tuple[str, ...],
        prefixes: list[str],
    ):
        self.rng = rng
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.max_tokens = max_tokens
        self.disconnect_fraction = disconnect_fraction
        self.bad_fraction = bad_fraction
        self.bad_kinds = bad_kinds
        self.prefixes = prefixes

    def next(self) -> PlannedRequest:
        if self.bad_kinds and self.rng.random() < self.bad_fraction:
            return self._bad(self.rng.choice(self.bad_kinds))
        return self._good()

    def _good(self) -> PlannedRequest:
        rng = self.rng
        is_chat, is_stream = rng.random() < 0.5, rng.random() < 0.5
        is_disconnect = rng.random() < self.disconnect_fraction
        features: list[str] = []
        body: dict[str, Any] = {"model": self.model_name}
        if is_disconnect or rng.random() < 0.5:
            # A request cut off on purpose runs long enough that the cut lands before its end.
            body["max_tokens"] = rng.randint(self.max_tokens, 4 * self.max_tokens)
            features.append("longer max_tokens")
        else:
            body["max_tokens"] = rng.randint(1, 8)
        if is_disconnect or rng.random() < 0.5:
            body["ignore_eos"] = True
        question = f"{rng.choice(QUESTIONS)} ({rng.randrange(10**6)})"
        prefix = rng.choice(self.prefixes) if self.prefixes and rng.random() < 0.3 else None
        if prefix:
            features.append("shared prefix")
        if is_chat:
            messages = [{"role": "system", "content": prefix}] if prefix else []
            body["messages"] = [*messages, {"role": "user", "content": question}]
        elif not prefix and rng.random() < 0.1:
            body["prompt"] = [rng.randrange(32, 127) for _ in range(rng.randint(1, 24))]  # ids in any vocabulary
            features.append("token ids")
        else:
            body["prompt"] = (prefix or "") + question
        body["temperature"] = rng.choice((0.0, 0.7, 1.0, 1.5))
        if rng.random() < 0.2:
            body["n"] = rng.randint(2, 4)
            features.append("n>1")
        if rng.random() < 0.2:
            body["stop"] = rng.sample(STOP_STRINGS, rng.randint(1, 2))
            features.append("stop")
        if rng.random() < 0.1:
            body["stop_token_ids"] = [rng.randrange(32, 127)]
            body["min_tokens"] = rng.randint(0, body["max_tokens"])
            features.append("stop_token_ids+min_tokens")
        if rng.random() < 0.2:
            body["seed"] = rng.randrange(2**31)
        if rng.random() < 0.2:
            body["top_p"], body["top_k"] = 0.9, 20
        if is_stream:
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        kind = ("chat" if is_chat else "completions") + (" (stream)" if is_stream else "")
        disconnect_after_events = rng.randint(1, 6) if is_disconnect and is_stream else None
        disconnect_after_s = rng.uniform(0.01, 0.3) if is_disconnect and not is_stream else None
        return PlannedRequest(
            kind=kind,
            path="/v1/chat/completions" if is_chat else "/v1/completions",
            body=json.dumps(body).encode(),
            is_stream=is_stream,
            num_choices=body.get("n", 1),
            disconnect_after_events=disconnect_after_events,
            disconnect_after_s=disconnect_after_s,
            features=tuple(features),
        )

    def _bad(self, name: str) -> PlannedRequest:
        rng = self.rng
        is_chat = rng.random() < 0.5
        is_stream = rng.random() < 0.5
        body: dict[str, Any] = {"model": self.model_name, "max_tokens": rng.randint(1, 8)}
        if is_chat:
            body["messages"] = [{"role": "user", "content": rng.choice(QUESTIONS)}]
        else:
            body["prompt"] = rng.choice(QUESTIONS)
        if is_stream:
            body["stream"] = True
        if name == "malformed-json":
            raw = json.dumps(body)
            cut = rng.choice((raw[: rng.randint(1, len(raw) - 1)], raw.replace('"', "'"), raw + "}", "{" + raw))
            return self._planned(name, is_chat, cut.encode(), is_stream)
        if name == "wrong-type":
            key, value = rng.choice(
                (("max_tokens", "many"), ("temperature", "hot"), ("n", [2]), ("stop", 5), ("stream_options", 1))
            )
            body[key] = value
            if is_chat and rng.random() < 0.3:
                body["messages"] = "hello"
            elif not is_chat and rng.random() < 0.3:
                body["prompt"] = {"text": "hello"}
        elif name == "out-of-range":
            key, value = rng.choice(
                (
                    ("temperature", 5),
                    ("n", 0),
                    ("max_tokens", 0),
                    ("max_tokens", -1),
                    ("top_p", 1.5),
                    ("presence_penalty", 3),
                    ("min_p", 2),
                    ("n", 10**6),
                )
            )
            body[key] = value
        elif name == "unknown-model":
            body["model"] = f"no-such-model-{rng.randrange(1000)}"
        elif name == "oov-prompt":
            ids = [rng.randrange(32, 127) for _ in range(rng.randint(0, 6))]
            ids.insert(rng.randint(0, len(ids)), rng.choice((OUT_OF_VOCAB_ID, -1)))
            body.pop("messages", None)
            body["prompt"], is_chat = ids, False
        elif name == "oov-stop-token-ids":
            body["stop_token_ids"] = [OUT_OF_VOCAB_ID]
            body["min_tokens"] = rng.randint(1, body["max_tokens"])
        elif name == "empty-messages":
            body.pop("prompt", None)
            body["messages"], is_chat = [], True
        elif name == "over-long-prompt":
            if self.max_model_len is None:
                raise ValueError("expected a max_model_len for an over-long prompt, got None")
            body.pop("messages", None)
            body["prompt"] = [rng.randrange(32, 127) for _ in range(self.max_model_len + rng.randint(0, 64))]
            is_chat = False
        else:
            raise ValueError(f"expected a bad kind in {BAD_KINDS}, got {name!r}")
        return self._planned(name, is_chat, json.dumps(body).encode(), is_stream)

    @staticmethod
    def _planned(name: str, is_chat: bool, body: bytes, is_stream: bool) -> PlannedRequest:
        path = "/v1/chat/completions" if is_chat else "/v1/completions"
        return PlannedRequest(kind=f"bad {name}", path=path, body=body, is_stream=is_stream)


# -- the run ------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Every request's outcome, aggregated (a 10-minute soak sends too many to keep one by one)."""

    started_at: float
    counts: Counter = field(default_factory=Counter)  # (kind, outcome status) -> requests
    features: Counter = field(default_factory=Counter)  # feature -> requests sent with it
    failure_reasons: Counter = field(default_factory=Counter)  # "kind: reason" -> requests
    # "kind: reason" -> its first request. Kept apart from `failures` because when one request kills the
    # engine, the requests in flight fail first and the culprit may come after the first twenty.
    first_by_reason: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)  # the first MAX_FAILURES_KEPT
    latencies: dict[str, list[float]] = field(default_factory=dict)  # kind -> seconds, complete answers only
    num_disconnects_planned: int = 0

    def record(self, plan: PlannedRequest, outcome: Outcome, sent_at: float, latency: float) -> None:
        self.counts[plan.kind, outcome.status] += 1
        self.features.update(plan.features)
        if plan.disconnect_after_events is not None or plan.disconnect_after_s is not None:
            self.num_disconnects_planned += 1
        if outcome.status == "ok":
            self.latencies.setdefault(plan.kind, []).append(latency)
        if outcome.is_failure:
            key = f"{plan.kind}: {outcome.reason}"
            self.failure_reasons[key] += 1
            failure = {
                "sent_s": round(sent_at - self.started_at, 3),
                "kind": plan.kind,
                "request": plan.describe(),
                "reason": outcome.reason,
            }
            self.first_by_reason.setdefault(key, failure)
            if len(self.failures) < MAX_FAILURES_KEPT:
                self.failures.append(failure)


def parse_duration(text: str) -> float:
    """Seconds from locust-style durations: 90, 45s, 10m, 1h30m."""
    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or match is None or not any(match.groups()):
        raise LoadTestError(f"expected --run-time like 90, 45s, 10m or 1h30m, got {text!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def parse_rss_growth(text: str) -> tuple[float, bool]:
    """(limit, is_percent): `64` or `64MiB` is MiB, `10%` is a percentage of the start RSS."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%|MiB)?\s*", text)
    if match is None:
        raise LoadTestError(f"expected --max-rss-growth as MiB (64, 64MiB) or a percentage (10%), got {text!r}")
    return float(match.group(1)), match.group(2) == "%"


def _sum_samples(families: dict[str, Any], name: str) -> float | None:
    family = families.get(name)
    return None if family is None else sum(sample.value for sample in family.samples)


async def read_metrics(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    response = await client.get(url + "/metrics", timeout=10)
    response.raise_for_status()
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def _proc_rss(pid: int) -> int | None:
    """Resident bytes of a local process, from /proc (Linux); None where there is no /proc."""
    try:
        resident_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class RssReader:
    """The server's RSS: its /metrics gauge where exported, else /proc of the process this soak started."""

    def __init__(self, client: httpx.AsyncClient, url: str, pid: int | None):
        self.client, self.url, self.pid = client, url, pid
        self.source: str | None = None

    async def choose_source(self) -> None:
        families = await read_metrics(self.client, self.url)
        if _sum_samples(families, RSS_METRIC) is not None:
            self.source = f"/metrics {RSS_METRIC}"
        elif self.pid is not None and _proc_rss(self.pid) is not None:
            self.source = f"/proc/{self.pid}/statm (the server's /metrics has no {RSS_METRIC})"

    async def read(self) -> float | None:
        if self.source is None:
            return None
        if self.source.startswith("/metrics"):
            return _sum_samples(await read_metrics(self.client, self.url), RSS_METRIC)
        return _proc_rss(self.pid) if self.pid is not None else None


async def _sample_rss(reader: RssReader, samples: list[tuple[float, float]], started_at: float, interval: float):
    while True:
        try:
            rss = await reader.read()
        except (httpx.HTTPError, ValueError):  # a busy or dying server: the gap shows in the samples
            rss = None
        if rss is not None:
            samples.append((round(time.monotonic() - started_at, 2), rss))
        await asyncio.sleep(interval)


async def _wait_for_slots(client: httpx.AsyncClient, url: str, settle_timeout: float) -> dict[str, Any]:
    """Poll /metrics until the slot gauges read zero, or settle_timeout passes."""
    started = time.monotonic()
    values: dict[str, float | None] = {}
    problem = None
    while True:
        try:
            families = await read_metrics(client, url)
            values = {name: _sum_samples(families, name) for name in SLOT_GAUGES}
            problem = None
        except (httpx.HTTPError, ValueError) as exc:
            problem = f"could not read /metrics: {type(exc).__name__}: {exc}"
        if problem is None and all(v is not None for v in values.values()) and not any(values.values()):
            return {"settled": True, "settle_s": round(time.monotonic() - started, 2), **values}
        if time.monotonic() - started > settle_timeout:
            missing = [name for name, v in values.items() if v is None]
            if missing and problem is None:
                problem = f"the server's /metrics has no {', '.join(missing)}"
            return {"settled": False, "settle_s": round(time.monotonic() - started, 2), "problem": problem, **values}
        await asyncio.sleep(0.25)


async def _model_card(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    try:
        response = await client.get(url + "/v1/models", timeout=30)
    except httpx.TransportError as exc:
        raise LoadTestError(f"expected a server at {url}, got {type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise LoadTestError(f"expected 200 from {url}/v1/models, got {response.status_code}: {response.text[:200]}")
    return response.json()["data"][0]


@dataclass(frozen=True)
class SoakConfig:
    users: int
    run_time_s: float
    seed: int
    max_tokens: int
    disconnect_fraction: float
    bad_fraction: float
    bad_kinds: tuple[str, ...]
    request_timeout_s: float
    settle_timeout_s: float
    rss_interval_s: float
    max_rss_growth: str
    api_key: str | None = None


async def soak(config: SoakConfig, url: str, pid: int | None = None) -> dict[str, Any]:
    """Drive the server at url with config's mix; the summary (without machine, date and command)."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.users + 4, max_keepalive_connections=config.users + 4)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=config.request_timeout_s) as client:
        card = await _model_card(client, url)
        model_name, max_model_len = card["id"], card.get("max_model_len")
        bad_kinds = config.bad_kinds
        not_sent = {}
        if max_model_len is None and "over-long-prompt" in bad_kinds:
            bad_kinds = tuple(k for k in bad_kinds if k != "over-long-prompt")
            not_sent["bad over-long-prompt"] = "the server reports no max_model_len"
        prefix_chars = SHARED_PREFIX_CHARS
        if max_model_len is not None:  # a shared-prefix prompt (bytes >= tokens) stays well inside the context
            prefix_chars = min(prefix_chars, max_model_len - 4 * config.max_tokens - 256)
        prefixes = shared_prefixes(config.seed, prefix_chars) if prefix_chars >= 64 else []

        rss = RssReader(client, url, pid)
        try:
            await rss.choose_source()
        except (httpx.HTTPError, ValueError) as exc:
            raise LoadTestError(
                f"expected Prometheus text from {url}/metrics, got {type(exc).__name__}: {exc}"
            ) from None
        started_at = time.monotonic()
        deadline = started_at + config.run_time_s
        tally = Tally(started_at)
        rss_samples: list[tuple[float, float]] = []
        sampler = asyncio.ensure_future(_sample_rss(rss, rss_samples, started_at, config.rss_interval_s))

        async def user(index: int) -> None:
            mix = TrafficMix(
                random.Random(f"{config.seed}:{index}"),
                model_name,
                max_model_len,
                config.max_tokens,
                config.disconnect_fraction,
                config.bad_fraction,
                bad_kinds,
                prefixes,
            )
            while time.monotonic() < deadline:
                plan = mix.next()
                sent_at = time.monotonic()
                outcome = await send(client, url, plan, config.request_timeout_s)
                tally.record(plan, outcome, sent_at, time.monotonic() - sent_at)

        await asyncio.gather(*(user(i) for i in range(config.users)))
        traffic_s = time.monotonic() - started_at
        slots = await _wait_for_slots(client, url, config.settle_timeout_s)
        sampler.cancel()
        final_rss = await rss.read() if rss.source else None
        if final_rss is not None:
            rss_samples.append((round(time.monotonic() - started_at, 2), final_rss))
    return _summary(config, tally, traffic_s, slots, rss.source, rss_samples, model_name, max_model_len, not_sent)


def _rss_summary(config: SoakConfig, source: str | None, samples: list[tuple[float, float]]) -> dict[str, Any]:
    limit, is_percent = parse_rss_growth(config.max_rss_growth)
    out: dict[str, Any] = {"source": source, "samples": [[t, int(b)] for t, b in samples]}
    if not samples:
        why = "no RSS source" if source is None else "no sample came back"
        return {**out, "passed": False, "problem": f"the server's RSS was not measured ({why})"}
    warmup_s = WARMUP_FRACTION * config.run_time_s
    start_t, start = next(((t, b) for t, b in samples if t >= warmup_s), samples[0])
    end_t, end = samples[-1]
    limit_bytes = start * limit / 100 if is_percent else limit * 2**20
    growth = end - start
    return {
        **out,
        "start_s": start_t,
        "start_bytes": int(start),
        "end_s": end_t,
        "end_bytes": int(end),
        "peak_bytes": int(max(b for _, b in samples)),
        "growth_bytes": int(growth),
        "growth_percent": round(100 * growth / start, 2) if start else None,
        "max_growth_bytes": int(limit_bytes),
        "passed": growth <= limit_bytes,
    }


def _summary(
    config: SoakConfig,
    tally: Tally,
    traffic_s: float,
    slots: dict[str, Any],
    rss_source: str | None,
    rss_samples: list[tuple[float, float]],
    model_name: str,
    max_model_len: int | None,
    not_sent: dict[str, str],
) -> dict[str, Any]:
    kinds = sorted({kind for kind, _ in tally.counts}, key=_kind_order)
    by_kind = {}
    for kind in kinds:
        counts = {status: tally.counts[kind, status] for status in OUTCOMES}
        latencies = tally.latencies.get(kind, [])
        by_kind[kind] = {
            "sent": sum(counts.values()),
            **counts,
            "latency_s": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99)},
        }
    num_failures = sum(k["failed"] for k in by_kind.values())
    rss = _rss_summary(config, rss_source, rss_samples)
    checks = {
        "nothing_lost": num_failures == 0,
        "slots_back_to_zero": slots["settled"],
        "rss_flat": rss["passed"],
    }
    return {
        "config": {
            "users": config.users,
            "run_time_s": config.run_time_s,
            "seed": config.seed,
            "max_tokens": config.max_tokens,
            "disconnect_fraction": config.disconnect_fraction,
            "bad_fraction": config.bad_fraction,
            "bad_kinds": list(config.bad_kinds),
            "request_timeout_s": config.request_timeout_s,
            "settle_timeout_s": config.settle_timeout_s,
            "rss_interval_s": config.rss_interval_s,
            "max_rss_growth": config.max_rss_growth,
            "model_name": model_name,
            "max_model_len": max_model_len,
        },
        "duration_s": round(traffic_s, 2),
        "num_requests": sum(k["sent"] for k in by_kind.values()),
        "num_failures": num_failures,
        "num_disconnects": sum(k["disconnected"] for k in by_kind.values()),
        "num_disconnects_planned": tally.num_disconnects_planned,  # the rest were answered before the cut
        "by_kind": by_kind,
        "features": dict(tally.features.most_common()),
        "not_sent": not_sent,
        "failures": tally.failures,
        "failure_reasons": {
            key: {"count": count, "first": tally.first_by_reason[key]}
            for key, count in tally.failure_reasons.most_common(MAX_FAILURES_KEPT)
        },
        "slots": slots,
        "rss": rss,
        "checks": checks,
        "passed": all(checks.values()),
    }


def _kind_order(kind: str) -> tuple[int, str]:
    if kind in KIND_ORDER:
        return KIND_ORDER.index(kind), ""
    return len(KIND_ORDER) + (BAD_KINDS.index(kind[4:]) if kind[4:] in BAD_KINDS else len(BAD_KINDS)), kind


def _mib(num_bytes: float | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:.1f} MiB"


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def format_soak_table(summary: dict[str, Any]) -> str:
    config = summary["config"]
    header = ("kind", "sent", "ok", "4xx", "disconnected", "failed", "lat p50", "lat p99")
    table = [header]
    totals = Counter()
    for kind, s in summary["by_kind"].items():
        totals.update({key: s[key] for key in ("sent", *OUTCOMES)})
        p50, p99 = s["latency_s"]["p50"], s["latency_s"]["p99"]
        ms = ["-" if v is None else f"{v * 1000:.0f}" for v in (p50, p99)]
        table.append((kind, *(str(s[key]) for key in ("sent", *OUTCOMES)), *ms))
    table.append(("all", *(str(totals[key]) for key in ("sent", *OUTCOMES)), "", ""))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(-1, "-" * len(lines[0]))
    out = [
        f"soak: {config['users']} users sending for {config['run_time_s']:g}s (the last answer came at "
        f"{summary['duration_s']:.1f}s), seed {config['seed']}, "
        f"model {config['model_name']}, {summary['num_requests']} requests (latencies of complete answers, ms)",
        *lines,
    ]
    if summary["features"]:
        out.append("features: " + ", ".join(f"{name} {count}" for name, count in summary["features"].items()))
    out.append(
        f"disconnects: {summary['num_disconnects']} made on purpose "
        f"(of {summary['num_disconnects_planned']} planned; the rest were answered first)"
    )
    for kind, why in summary["not_sent"].items():
        out.append(f"not sent: {kind} ({why})")
    checks = summary["checks"]
    out.append(f"nothing lost: {summary['num_failures']} failures  {_verdict(checks['nothing_lost'])}")
    slots = summary["slots"]
    gauges = ", ".join(
        f"{name.split(':')[-1]} {value:g}" for name in SLOT_GAUGES if (value := slots.get(name)) is not None
    )
    settled = f"settled in {slots['settle_s']}s" if slots["settled"] else f"not settled after {slots['settle_s']}s"
    problem = f" ({slots['problem']})" if slots.get("problem") else ""
    out.append(
        f"slots after the traffic: {gauges or '-'}, {settled}{problem}  {_verdict(checks['slots_back_to_zero'])}"
    )
    rss = summary["rss"]
    if "start_bytes" in rss:
        out.append(
            f"RSS: start {_mib(rss['start_bytes'])} (at {rss['start_s']}s), end {_mib(rss['end_bytes'])}, "
            f"growth {rss['growth_bytes'] / 2**20:+.1f} MiB ({rss['growth_percent']:+.2f}%), "
            f"limit {_mib(rss['max_growth_bytes'])}, peak {_mib(rss['peak_bytes'])}, "
            f"{len(rss['samples'])} samples  {_verdict(checks['rss_flat'])}"
        )
    else:
        out.append(f"RSS: {rss['problem']}  {_verdict(checks['rss_flat'])}")
    for reason, seen in summary["failure_reasons"].items():
        out.append(f"failure x{seen['count']}: {reason}")
        out.append(f"    first sent at {seen['first']['sent_s']}s: {seen['first']['request']}")
    out.append(f"soak {_verdict(summary['passed'])}")
    return "\n".join(out)


def _server_args(args: argparse.Namespace) -> argparse.Namespace:
    """args for started_server, with a context limit unless the caller set one (see SOAK_MAX_MODEL_LEN)."""
    server = copy.copy(args)
    if not any(arg.startswith("--max-model-len") for arg in args.server_args):
        server.server_args = [*args.server_args, f"--max-model-len={SOAK_MAX_MODEL_LEN}"]
    return server


def soak_config(args: argparse.Namespace) -> SoakConfig:
    if args.users < 1:
        raise LoadTestError(f"expected --users >= 1, got {args.users}")
    if args.max_tokens < 1:
        raise LoadTestError(f"expected --max-tokens >= 1, got {args.max_tokens}")
    for name in ("disconnect_fraction", "bad_fraction"):
        value = getattr(args, name)
        if not 0 <= value <= 1:
            raise LoadTestError(f"expected --{name.replace('_', '-')} in [0, 1], got {value}")
    for name in ("request_timeout", "settle_timeout", "rss_interval"):
        value = getattr(args, name)
        if not value > 0:
            raise LoadTestError(f"expected --{name.replace('_', '-')} > 0, got {value}")
    skipped = [name.strip() for name in (args.skip_bad or "").split(",") if name.strip()]
    unknown = [name for name in skipped if name not in BAD_KINDS]
    if unknown:
        raise LoadTestError(f"expected --skip-bad names from {', '.join(BAD_KINDS)}, got {', '.join(unknown)}")
    parse_rss_growth(args.max_rss_growth)
    run_time_s = parse_duration(args.run_time or DEFAULT_RUN_TIME)
    if run_time_s <= 0:
        raise LoadTestError(f"expected a --run-time above 0, got {args.run_time!r}")
    return SoakConfig(
        users=args.users,
        run_time_s=run_time_s,
        seed=args.seed,
        max_tokens=args.max_tokens,
        disconnect_fraction=args.disconnect_fraction,
        bad_fraction=args.bad_fraction,
        bad_kinds=tuple(name for name in BAD_KINDS if name not in skipped),
        request_timeout_s=args.request_timeout,
        settle_timeout_s=args.settle_timeout,
        rss_interval_s=args.rss_interval,
        max_rss_growth=args.max_rss_growth,
        api_key=args.api_key,
    )


def _log_tail(path: Path, num_lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:]) if path.exists() else ""


def run_soak(args: argparse.Namespace) -> int:
    """`linrec bench serve --soak`: 0 when every check passes, 1 when one fails (LoadTestError: could not run)."""
    config = soak_config(args)
    server_log_tail = ""
    with tempfile.TemporaryDirectory(prefix="linrec-soak-") as tmp:
        if args.url:
            url, server_command = args.url.rstrip("/").removesuffix("/v1"), None
            summary = asyncio.run(soak(config, url))
        else:
            with started_server(_server_args(args), Path(tmp)) as (url, server_command, pid):
                summary = asyncio.run(soak(config, url, pid))
            if not summary["passed"]:  # an engine's traceback says more than a 500's message
                server_log_tail = _log_tail(Path(tmp) / "server.log")
    summary["config"].update(
        url=url,
        server_command=server_command,
        command=shlex.join(sys.argv),
        machine=machine(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    if server_log_tail:
        summary["server_log_tail"] = server_log_tail
    print(format_soak_table(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"summary written to {args.out}")
    return 0 if summary["passed"] else 1

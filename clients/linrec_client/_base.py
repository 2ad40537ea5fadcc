"""What Client and AsyncClient share: configuration, request bodies, and the retry decision.

The two clients differ only in how they send, sleep and stream; everything here is plain data.
"""

from __future__ import annotations

import email.utils
import os
import random
import sys
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, TypedDict

import httpx

from linrec_client.errors import LinrecAPIError

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - pydantic depends on typing_extensions, so it is always there
    from typing_extensions import Unpack

__all__ = ["Unpack"]

VERSION = "0.1.0"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Generation can take minutes; connecting should not.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)
RETRY_STATUSES = frozenset({429, 503})  # queue full; draining or not ready
# Failures before or while talking to a server that may come back; timeouts are not retried (the
# caller's time is spent), nor is anything once a stream has begun.
RETRY_TRANSPORT_ERRORS = (httpx.NetworkError, httpx.ConnectTimeout, httpx.RemoteProtocolError)

Prompt = str | list[str] | list[int] | list[list[int]]
# A Responses API input: a user message's text, or messages ({"role", "content"}; content a string or a list of
# {"type": "input_text", "text"} parts).
ResponseInput = str | list[dict[str, Any]]


def quote_id(value: str) -> str:
    """An id as one URL path segment."""
    return urllib.parse.quote(value, safe="")


def salt_query(cache_salt: str | None) -> dict[str, str] | None:
    return {"cache_salt": cache_salt} if cache_salt is not None else None


class SamplingParams(TypedDict, total=False):
    """Fields both generation routes take; None or absent means the server's default."""

    n: int
    temperature: float
    top_p: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: dict[str, float]  # token id (as a string) -> bias in [-100, 100]
    seed: int
    stop: str | list[str]
    user: str
    # linrec's extras (vLLM's names)
    top_k: int
    min_p: float
    repetition_penalty: float
    min_tokens: int
    ignore_eos: bool
    stop_token_ids: list[int]
    skip_special_tokens: bool
    cache_salt: str
    # linrec's own: one count per layer (0 skip, 1 execute, 2 repeat) or "auto" (the server's routers decide)
    layer_route: str | list[int]
    layer_route_skip_bias: float  # with "auto": added to every router's skip logit
    extra_body: dict[str, Any]  # merged into the JSON body as is, for fields this client does not name


class CompletionParams(SamplingParams, total=False):
    max_tokens: int
    logprobs: int  # top alternatives per token, 0..20
    echo: bool


class ChatParams(SamplingParams, total=False):
    max_tokens: int
    max_completion_tokens: int
    logprobs: bool
    top_logprobs: int
    add_generation_prompt: bool


class ResponseParams(SamplingParams, total=False):
    """POST /v1/responses' fields besides input and model (docs/responses.md)."""

    instructions: str  # a system message in front of this turn's input (not carried over to later turns)
    previous_response_id: str  # continue a stored response: only this turn's tokens are prefilled
    store: bool  # keep the response and its state (default true); false: nothing to retrieve or continue
    max_output_tokens: int
    metadata: dict[str, str]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for 429, 503 and connection errors; a server's Retry-After wins."""

    max_retries: int = 2  # retries after the first attempt
    initial_backoff: float = 0.5  # seconds before the first retry (doubled for each later one)
    max_backoff: float = 8.0
    max_retry_after: float = 60.0  # a longer Retry-After is not waited for; the backoff applies instead

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"expected max_retries >= 0, got {self.max_retries}")
        if not 0 <= self.initial_backoff <= self.max_backoff:
            raise ValueError(
                f"expected 0 <= initial_backoff <= max_backoff, got {self.initial_backoff} and {self.max_backoff}"
            )

    def delay(self, attempt: int, headers: httpx.Headers | None = None) -> float:
        """Seconds to wait before retry number `attempt + 1` (attempt counts from 0).

        Jitter spreads clients that were refused together: up to 25% below the backoff, or up to
        25% above a Retry-After (which is a minimum).
        """
        retry_after = parse_retry_after(headers)
        if retry_after is not None and retry_after <= self.max_retry_after:
            return retry_after * (1.0 + 0.25 * random.random())
        backoff = min(self.max_backoff, self.initial_backoff * 2.0**attempt)
        return backoff * (1.0 - 0.25 * random.random())


def parse_retry_after(headers: httpx.Headers | None) -> float | None:
    """Retry-After as seconds (a number, or an HTTP date); None when absent or unreadable."""
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds)


def should_retry(attempt: int, policy: RetryPolicy, error: BaseException) -> bool:
    if attempt >= policy.max_retries:
        return False
    if isinstance(error, LinrecAPIError):
        return error.status_code in RETRY_STATUSES
    return isinstance(error, RETRY_TRANSPORT_ERRORS)


class BaseClient:
    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        model: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int | None,
        retry: RetryPolicy | None,
        headers: dict[str, str] | None,
    ):
        # The one place this package reads the environment.
        base_url = base_url or os.environ.get("LINREC_BASE_URL") or DEFAULT_BASE_URL
        # The server's routes sit at the root and under /v1; accept either form of the URL.
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key if api_key is not None else os.environ.get("LINREC_API_KEY") or None
        self.model = model  # sent when a call names none; linrec serves one model, so None is fine
        self.timeout = timeout if timeout is not None else DEFAULT_TIMEOUT
        if retry is not None and max_retries is not None:
            raise ValueError("expected max_retries or retry, got both")
        self.retry = retry if retry is not None else RetryPolicy(max_retries=2 if max_retries is None else max_retries)
        self.headers = {"User-Agent": f"linrec-client/{VERSION}", "Accept": "application/json", **(headers or {})}
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"

    def _generation_body(self, key: str, value: Any, model: str | None, stream: bool, include_usage: bool, params):
        params = dict(params)
        extra = params.pop("extra_body", None) or {}
        body: dict[str, Any] = {key: value, **{k: v for k, v in params.items() if v is not None}}
        model = model if model is not None else self.model
        if model is not None:
            body["model"] = model
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": include_usage}
        body.update(extra)
        return body

    def _responses_body(self, input: ResponseInput, model: str | None, stream: bool, params) -> dict[str, Any]:
        params = dict(params)
        extra = params.pop("extra_body", None) or {}
        body: dict[str, Any] = {"input": input, **{k: v for k, v in params.items() if v is not None}}
        model = model if model is not None else self.model
        if model is not None:
            body["model"] = model
        if stream:
            body["stream"] = True
        body.update(extra)
        return body

    def _tokenize_body(
        self,
        prompt: str | None,
        messages: list[dict[str, Any]] | None,
        add_special_tokens: bool,
        add_generation_prompt: bool,
    ) -> dict[str, Any]:
        if (prompt is None) == (messages is None):
            raise ValueError("expected exactly one of prompt or messages")
        body: dict[str, Any] = {
            "add_special_tokens": add_special_tokens,
            "add_generation_prompt": add_generation_prompt,
        }
        body.update({"prompt": prompt} if prompt is not None else {"messages": messages})
        if self.model is not None:
            body["model"] = self.model
        return body

"""Locust users for an OpenAI-compatible server: completions and chat, streamed and not.

Each user sends requests back to back (closed loop), cycling through the four kinds from its own
starting point, so any run sees an equal mix. Every request is reported to locust under its kind
("completions", "chat (stream)", ...; response length = output tokens), and every stream once more
as a "TTFT" event timed from sending the request to the first chunk that carries output. With
--records, each request is also written as one JSON line when the test stops (loadtest.run reads
them for its summary).

Standalone (against any OpenAI-compatible server):
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 8 -t 30s

This file is passed to locust by path and never imported by linrec: locust monkey-patches the
standard library with gevent on import.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from typing import Any

import requests
from locust import User, constant, events, task

KINDS = (("completions", False), ("chat", False), ("completions", True), ("chat", True))
PROMPTS = (
    "The quick brown fox",
    "Write a short poem about the sea.",
    "Explain recurrent state in one sentence.",
    "List three prime numbers:",
    "Once upon a time",
)
_records: list[dict[str, Any]] = []
_user_ids = itertools.count()


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser.add_argument_group("linrec load test")
    group.add_argument("--model-name", default="", help="the `model` sent (default: the server's first model)")
    group.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    group.add_argument(
        "--allow-eos", action="store_true", help="let requests stop at EOS (default: ignore_eos, exact lengths)"
    )
    group.add_argument("--api-key", default="", help="sent as `Authorization: Bearer KEY`")
    group.add_argument("--records", default="", help="write one JSON line per request to this file at the end")


@events.test_stop.add_listener
def _write_records(environment, **_: Any) -> None:
    path = environment.parsed_options.records
    if path:
        with open(path, "w") as f:
            for record in _records:
                f.write(json.dumps(record) + "\n")


class RequestFailed(Exception):
    pass


class OpenAIUser(User):
    """Timing and failure reporting are done here (not by locust's HttpUser) so that a streamed
    request's time runs to its last byte and its first output is seen."""

    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.session = requests.Session()
        if options.api_key:
            self.session.headers["Authorization"] = f"Bearer {options.api_key}"
        self.max_tokens = options.max_tokens
        self.ignore_eos = not options.allow_eos
        self.model = options.model_name or self._first_model()
        user_id = next(_user_ids)
        self.kinds = itertools.islice(itertools.cycle(KINDS), user_id % len(KINDS), None)
        self.rng = random.Random(user_id)

    def on_stop(self) -> None:
        self.session.close()

    def _first_model(self) -> str:
        response = self.session.get(f"{self.host}/v1/models", timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]["id"]

    @task
    def generate(self) -> None:
        kind, stream = next(self.kinds)
        prompt = f"{self.rng.choice(PROMPTS)} ({self.rng.randrange(10**6)})"
        body: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0.8}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = prompt
            path = "/v1/completions"
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        name = f"{kind} (stream)" if stream else kind
        start_wall, start = time.time(), time.perf_counter()
        ttft: float | None = None
        output_tokens = 0
        error: str | None = None
        try:
            if stream:
                ttft, output_tokens = self._stream(path, body, kind, start)
            else:
                output_tokens = self._whole(path, body)
        except (RequestFailed, requests.RequestException, ValueError, KeyError) as exc:
            error = str(exc) if isinstance(exc, RequestFailed) else f"{type(exc).__name__}: {exc}"
        latency = time.perf_counter() - start
        fire = self.environment.events.request.fire
        fire(
            request_type="POST",
            name=name,
            response_time=latency * 1000,
            response_length=output_tokens,
            exception=RequestFailed(error) if error else None,
            context={},
        )
        if ttft is not None and error is None:
            fire(
                request_type="TTFT", name=name, response_time=ttft * 1000, response_length=0, exception=None, context={}
            )
        _records.append(
            {
                "kind": name,
                "start": start_wall,
                "latency": latency,
                "ttft": ttft if error is None else None,
                "output_tokens": output_tokens if error is None else 0,
                "error": error,
            }
        )

    def _whole(self, path: str, body: dict[str, Any]) -> int:
        response = self.session.post(f"{self.host}{path}", json=body, timeout=600)
        if response.status_code != 200:
            raise RequestFailed(_error_message(response))
        return int(response.json()["usage"]["completion_tokens"])

    def _stream(self, path: str, body: dict[str, Any], kind: str, start: float) -> tuple[float | None, int]:
        ttft: float | None = None
        usage_tokens: int | None = None
        with self.session.post(f"{self.host}{path}", json=body, timeout=600, stream=True) as response:
            if response.status_code != 200:
                raise RequestFailed(_error_message(response))
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    if usage_tokens is None:
                        raise RequestFailed("the stream sent no usage (stream_options.include_usage)")
                    return ttft, usage_tokens
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RequestFailed(f"error in the stream: {chunk['error'].get('message')}")
                if chunk.get("usage"):
                    usage_tokens = int(chunk["usage"]["completion_tokens"])
                if ttft is None and any(_has_output(choice, kind) for choice in chunk.get("choices", ())):
                    ttft = time.perf_counter() - start
        raise RequestFailed("the stream ended before [DONE]")


def _has_output(choice: dict[str, Any], kind: str) -> bool:
    """True for a chunk with generated text, or a finish (a token may decode to no text yet)."""
    text = choice.get("delta", {}).get("content") if kind == "chat" else choice.get("text")
    return bool(text) or choice.get("finish_reason") is not None


def _error_message(response: requests.Response) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    return f"HTTP {response.status_code}: {message}"

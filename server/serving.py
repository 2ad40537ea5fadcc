"""Handlers: translate OpenAI requests into engine prompts and SamplingParams, and deltas back into
OpenAI responses (whole or as server-sent events).

A prompt list becomes one engine request per prompt; choice index = prompt index * n + sample index.
A client that goes away (closed stream, or a non-streaming request whose connection drops) cancels
its engine requests, which frees their slots before the next engine step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from linrec.engine.async_llm import AsyncLLM, EngineError
from linrec.engine.output import SampleDelta
from linrec.engine.request import Logprob
from linrec.engine.sampling_params import SamplingParams
from linrec.engine.scheduler import QueueFullError
from linrec.server import protocol as p
from linrec.server.metrics import Metrics, RequestTimer

T = TypeVar("T")
DEFAULT_CHAT_MAX_TOKENS = 512  # chat without max_tokens and without --max-model-len
LOGPROB_FLOOR = -9999.0  # JSON has no -inf


class APIError(Exception):
    """An error the client caused (or must wait out); rendered as OpenAI's error object."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def response_body(self) -> p.ErrorResponse:
        return p.ErrorResponse(
            error=p.ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        )

    def response(self) -> JSONResponse:
        return JSONResponse(p.dump(self.response_body()), status_code=self.status_code, headers=self.headers)


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready."""


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class OpenAIServing:
    def __init__(self, llm: AsyncLLM, model_name: str, metrics: Metrics):
        self.llm = llm
        self.model_name = model_name
        self.metrics = metrics
        self.tokenizer = llm.tokenizer
        self.max_model_len = llm.engine.max_model_len
        self.vocab_size = llm.engine.vocab_size

    # -- shared pieces ------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                type="NotFoundError",
                param="model",
                code="model_not_found",
            )

    def models(self) -> dict[str, Any]:
        card = p.ModelCard(id=self.model_name, root=self.llm.engine.model_path, max_model_len=self.max_model_len)
        return p.dump(p.ModelList(data=[card]))

    def _sampling_params(self, req: p._SamplingRequest, max_tokens: int, logprobs: int | None) -> SamplingParams:
        bias: dict[int, float] | None = None
        if req.logit_bias:
            bias = {}
            for key, value in req.logit_bias.items():
                try:
                    token_id = int(key)
                except ValueError:
                    raise APIError(
                        400, f"expected logit_bias keys as token ids, got {key!r}", param="logit_bias"
                    ) from None
                if not 0 <= token_id < self.vocab_size:
                    raise APIError(
                        400,
                        f"expected logit_bias token ids in [0, {self.vocab_size}), got {token_id}",
                        param="logit_bias",
                    )
                bias[token_id] = value
        if max_tokens < 1:
            raise APIError(400, f"expected max_tokens >= 1, got {max_tokens}", param="max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            return SamplingParams(
                n=req.n,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0,
                min_p=req.min_p or 0.0,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                logit_bias=bias,
                seed=req.seed,
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                stop=tuple(stop),
                stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens,
                cache_salt=req.cache_salt,
            )
        except ValueError as exc:
            raise APIError(400, str(exc), param=getattr(exc, "param", None)) from None

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise APIError(400, "expected a non-empty prompt, got 0 tokens", param="prompt")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"expected token ids in [0, {self.vocab_size}), got {bad[0]}", param="prompt")
        if self.max_model_len is not None and len(prompt_ids) >= self.max_model_len:
            raise APIError(
                400,
                f"the prompt has {len(prompt_ids)} tokens; this model's maximum context length is "
                f"{self.max_model_len} tokens (prompt plus at least one generated token)",
                param="prompt",
                code="context_length_exceeded",
            )

    def _default_max_tokens(self, prompt_len: int) -> int:
        if self.max_model_len is not None:
            return max(1, self.max_model_len - prompt_len)
        return DEFAULT_CHAT_MAX_TOKENS

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _generate(
        self, prompts: list[list[int]], params: SamplingParams, base_id: str
    ) -> AsyncIterator[tuple[int, SampleDelta]]:
        """Every prompt's deltas, merged, tagged with the prompt's index; metrics observed on the way."""
        arrival = time.monotonic()
        gens = [
            self._timed(self.llm.generate(ids, params, f"{base_id}-{i}"), RequestTimer(self.metrics, arrival, len(ids)))
            for i, ids in enumerate(prompts)
        ]
        return _merge(gens)

    async def _timed(self, gen: AsyncIterator[SampleDelta], timer: RequestTimer) -> AsyncIterator[SampleDelta]:
        async for delta in gen:
            now = time.monotonic()
            timer.on_delta(now, delta.index, len(delta.token_ids), delta.first_scheduled_time)
            if delta.finish_reason is not None:
                timer.on_sample_finished(delta.finish_reason)
            yield delta
        timer.on_finished(time.monotonic())

    async def _first(self, gen: AsyncIterator[T], raw: Request) -> T:
        """The first item, with engine refusals turned into 4xx/5xx errors."""
        try:
            return await _unless_disconnected(gen.__anext__(), raw)
        except (ValueError, QueueFullError, EngineError, StopAsyncIteration) as exc:
            await gen.aclose()
            raise _engine_error(exc) from None
        except BaseException:
            await gen.aclose()
            raise

    # -- /v1/completions ----------------------------------------------------------------------------

    async def create_completion(self, req: p.CompletionRequest, raw: Request, request_id: str):
        self.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, f"best_of must equal n (got best_of={req.best_of}, n={req.n})", param="best_of")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs needs prompt logprobs, which linrec does not compute", param="echo")
        prompts = self._completion_prompts(req.prompt)
        for ids in prompts:
            self._check_prompt(ids)
        max_tokens = req.max_tokens if req.max_tokens is not None else self._default_max_tokens(max(map(len, prompts)))
        params = self._sampling_params(req, max_tokens, req.logprobs)
        response_id = f"cmpl-{request_id}"
        created = int(time.time())
        echo_texts = [self.tokenizer.decode(ids, skip_special_tokens=True) if req.echo else "" for ids in prompts]
        merged = self._generate(prompts, params, f"cmpl-{uuid.uuid4().hex}")
        first = await self._first(merged, raw)
        num_prompt_tokens = sum(map(len, prompts))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(
                self._completion_stream(
                    merged, first, req, response_id, created, echo_texts, num_prompt_tokens, include_usage
                )
            )

        choices = [_Choice() for _ in range(len(prompts) * req.n)]

        async def collect() -> None:
            item: tuple[int, SampleDelta] | None = first
            while item is not None:
                prompt_index, delta = item
                _fold(choices[prompt_index * req.n + delta.index], delta)
                item = await anext(merged, None)

        try:
            await _unless_disconnected(collect(), raw)
        except EngineError as exc:
            raise _engine_error(exc) from None
        finally:
            await merged.aclose()
        out = []
        for index, choice in enumerate(choices):
            echo = echo_texts[index // req.n]
            out.append(
                p.CompletionChoice(
                    index=index,
                    text=echo + "".join(choice.text),
                    logprobs=self._completion_logprobs(choice.logprobs, len(echo))
                    if req.logprobs is not None
                    else None,
                    finish_reason=choice.finish_reason,
                    stop_reason=choice.stop_reason,
                )
            )
        num_generated = sum(len(c.token_ids) for c in choices)
        usage = p.UsageInfo(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=num_generated,
            total_tokens=num_prompt_tokens + num_generated,
        )
        body = p.CompletionResponse(id=response_id, created=created, model=self.model_name, choices=out, usage=usage)
        return JSONResponse(p.dump(body))

    def _completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt)]
        if not prompt:
            raise APIError(400, "expected a non-empty prompt, got an empty list", param="prompt")
        if all(isinstance(x, str) for x in prompt):
            return [self.tokenizer.encode(x) for x in prompt]
        if all(isinstance(x, int) for x in prompt):
            return [list(prompt)]
        return [list(x) for x in prompt]

    def _completion_logprobs(self, logprobs: list[Logprob], offset: int) -> p.CompletionLogprobs:
        out = p.CompletionLogprobs()
        for lp in logprobs:
            token = self._token_text(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(max(lp.logprob, LOGPROB_FLOOR))
            top: dict[str, float] = {}
            for t, v in lp.top:  # most likely first; tokens that decode alike keep the likelier logprob
                top.setdefault(self._token_text(t), max(v, LOGPROB_FLOOR))
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(token)
        return out

    async def _completion_stream(
        self,
        merged: AsyncIterator[tuple[int, SampleDelta]],
        first: tuple[int, SampleDelta],
        req: p.CompletionRequest,
        response_id: str,
        created: int,
        echo_texts: list[str],
        num_prompt_tokens: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        num_generated = 0
        offsets = [len(echo_texts[i // req.n]) for i in range(len(echo_texts) * req.n)]
        echoed: set[int] = set()
        item: tuple[int, SampleDelta] | None = first
        try:
            while item is not None:
                prompt_index, delta = item
                index = prompt_index * req.n + delta.index
                num_generated += len(delta.token_ids)
                text = delta.text
                if req.echo and index not in echoed:
                    echoed.add(index)
                    text = echo_texts[prompt_index] + text
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self._completion_logprobs(delta.logprobs, offsets[index])
                    offsets[index] += sum(len(t) for t in logprobs.tokens)
                if text or delta.finish_reason is not None or logprobs is not None:
                    choice = p.CompletionChoice(
                        index=index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason,
                    )
                    chunk = p.CompletionResponse(
                        id=response_id, created=created, model=self.model_name, choices=[choice]
                    )
                    yield _event(p.dump(chunk))
                item = await anext(merged, None)
            if include_usage:
                usage = p.UsageInfo(
                    prompt_tokens=num_prompt_tokens,
                    completion_tokens=num_generated,
                    total_tokens=num_prompt_tokens + num_generated,
                )
                chunk = p.CompletionResponse(
                    id=response_id, created=created, model=self.model_name, choices=[], usage=usage
                )
                yield _event(p.dump(chunk))
        except EngineError as exc:
            yield _event(p.dump(_engine_error(exc).response_body()))
        finally:
            _close_soon(merged)
        yield "data: [DONE]\n\n"

    # -- /v1/chat/completions -----------------------------------------------------------------------

    def chat_prompt(self, messages: list[p.ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        if not messages:
            raise APIError(400, "expected at least one message, got an empty list", param="messages")
        conversation = []
        for message in messages:
            content = message.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.type != "text":
                        raise APIError(400, f"expected text content parts, got {part.type!r}", param="messages")
                    texts.append(part.text or "")
                content = "".join(texts)
            conversation.append({"role": message.role, "content": content or ""})
        if self.tokenizer.chat_template is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        try:
            text = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as exc:  # jinja's TemplateError and raise_exception(): the messages broke the template
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def create_chat_completion(self, req: p.ChatCompletionRequest, raw: Request, request_id: str):
        self.check_model(req.model)
        prompt_ids = self.chat_prompt(req.messages, req.add_generation_prompt)
        self._check_prompt(prompt_ids)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = self._default_max_tokens(len(prompt_ids))
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        params = self._sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        response_id = f"chatcmpl-{request_id}"
        created = int(time.time())
        merged = self._generate([prompt_ids], params, f"chatcmpl-{uuid.uuid4().hex}")
        first = await self._first(merged, raw)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(self._chat_stream(merged, first, req, response_id, created, len(prompt_ids), include_usage))

        choices = [_Choice() for _ in range(req.n)]

        async def collect() -> None:
            item: tuple[int, SampleDelta] | None = first
            while item is not None:
                _fold(choices[item[1].index], item[1])
                item = await anext(merged, None)

        try:
            await _unless_disconnected(collect(), raw)
        except EngineError as exc:
            raise _engine_error(exc) from None
        finally:
            await merged.aclose()
        out = [
            p.ChatChoice(
                index=index,
                message=p.ChatResponseMessage(content="".join(choice.text)),
                logprobs=p.ChatLogprobs(content=self._chat_logprobs(choice.logprobs)) if req.logprobs else None,
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason,
            )
            for index, choice in enumerate(choices)
        ]
        num_generated = sum(len(c.token_ids) for c in choices)
        usage = p.UsageInfo(
            prompt_tokens=len(prompt_ids), completion_tokens=num_generated, total_tokens=len(prompt_ids) + num_generated
        )
        body = p.ChatCompletionResponse(
            id=response_id, created=created, model=self.model_name, choices=out, usage=usage
        )
        return JSONResponse(p.dump(body))

    def _chat_logprobs(self, logprobs: list[Logprob]) -> list[p.TokenLogprob]:
        out = []
        for lp in logprobs:
            token = self._token_text(lp.token_id)
            top = [
                p.TopLogprob(token=(t := self._token_text(i)), logprob=max(v, LOGPROB_FLOOR), bytes=list(t.encode()))
                for i, v in lp.top
            ]
            out.append(
                p.TokenLogprob(
                    token=token, logprob=max(lp.logprob, LOGPROB_FLOOR), bytes=list(token.encode()), top_logprobs=top
                )
            )
        return out

    async def _chat_stream(
        self,
        merged: AsyncIterator[tuple[int, SampleDelta]],
        first: tuple[int, SampleDelta],
        req: p.ChatCompletionRequest,
        response_id: str,
        created: int,
        num_prompt_tokens: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        def chunk(choices: list[p.ChatChunkChoice], usage: p.UsageInfo | None = None) -> str:
            body = p.ChatCompletionChunk(
                id=response_id, created=created, model=self.model_name, choices=choices, usage=usage
            )
            return _event(p.dump(body))

        num_generated = 0
        try:
            for index in range(req.n):
                role = p.DeltaMessage(role="assistant", content="")
                yield chunk([p.ChatChunkChoice(index=index, delta=role)])
            item: tuple[int, SampleDelta] | None = first
            while item is not None:
                delta = item[1]
                num_generated += len(delta.token_ids)
                logprobs = p.ChatLogprobs(content=self._chat_logprobs(delta.logprobs)) if req.logprobs else None
                if delta.text or delta.finish_reason is not None or logprobs is not None:
                    choice = p.ChatChunkChoice(
                        index=delta.index,
                        delta=p.DeltaMessage(content=delta.text),
                        logprobs=logprobs,
                        finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason,
                    )
                    yield chunk([choice])
                item = await anext(merged, None)
            if include_usage:
                usage = p.UsageInfo(
                    prompt_tokens=num_prompt_tokens,
                    completion_tokens=num_generated,
                    total_tokens=num_prompt_tokens + num_generated,
                )
                yield chunk([], usage)
        except EngineError as exc:
            yield _event(p.dump(_engine_error(exc).response_body()))
        finally:
            _close_soon(merged)
        yield "data: [DONE]\n\n"

    # -- /tokenize, /detokenize ---------------------------------------------------------------------

    def tokenize(self, req: p.TokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "expected exactly one of prompt or messages")
        if req.messages is not None:
            ids = self.chat_prompt(req.messages, req.add_generation_prompt)
        else:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    def detokenize(self, req: p.DetokenizeRequest) -> dict[str, Any]:
        self.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"expected token ids in [0, {self.vocab_size}), got {bad[0]}", param="tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}


def _engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, QueueFullError):
        return APIError(429, f"the server is overloaded: {exc}", type="RateLimitError", headers={"Retry-After": "1"})
    if isinstance(exc, EngineError):
        return APIError(500, str(exc), type="InternalServerError")
    if isinstance(exc, StopAsyncIteration):
        return APIError(500, "the engine ended the request without output", type="InternalServerError")
    return APIError(400, str(exc), param=getattr(exc, "param", None))


def _fold(choice: _Choice, delta: SampleDelta) -> None:
    choice.text.append(delta.text)
    choice.token_ids.extend(delta.token_ids)
    choice.logprobs.extend(delta.logprobs)
    if delta.finish_reason is not None:
        choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason


# Characters json.dumps(ensure_ascii=False) leaves raw that some line splitters break lines on (str.splitlines,
# JavaScript's line terminators): escaped, so that every event stays one `data:` line for every SSE client.
_SSE_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False).translate(_SSE_LINE_BREAKS)}\n\n"


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _close_soon(gen: AsyncIterator) -> None:
    """Close a merged stream from a `finally` that may run under cancellation (no await there)."""
    closer = getattr(gen, "cancel_all", None)
    if closer is not None:
        closer()


class _Merged:
    """Several async iterators as one of (source index, item); cancel_all() aborts every source."""

    def __init__(self, gens: list[AsyncIterator[T]]):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._num_open = len(gens)
        self._tasks = [asyncio.ensure_future(self._pump(i, g)) for i, g in enumerate(gens)]

    async def _pump(self, index: int, gen: AsyncIterator) -> None:
        try:
            async for item in gen:
                self._queue.put_nowait((index, item, None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, which raises it
            self._queue.put_nowait((index, None, exc))
        finally:
            self._queue.put_nowait((index, _DONE, None))

    def __aiter__(self):
        return self

    async def __anext__(self):
        while self._num_open:
            index, item, exc = await self._queue.get()
            if exc is not None:
                self.cancel_all()
                raise exc
            if item is _DONE:
                self._num_open -= 1
                continue
            return index, item
        raise StopAsyncIteration

    def cancel_all(self) -> None:
        self._num_open = 0
        for task in self._tasks:
            task.cancel()

    async def aclose(self) -> None:
        self.cancel_all()
        await asyncio.gather(*self._tasks, return_exceptions=True)


_DONE = object()


def _merge(gens: list[AsyncIterator[T]]) -> _Merged:
    return _Merged(gens)


async def _wait_disconnect(raw: Request) -> None:
    # The body is read already: the next ASGI message is the disconnect (or never comes).
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(work: Awaitable[T], raw: Request) -> T:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(raw))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected("client disconnected")
    finally:
        watcher.cancel()
        task.cancel()

"""Handlers: translate OpenAI requests into engine prompts and SamplingParams, and deltas back into
OpenAI responses (whole or as server-sent events).

A prompt list becomes one engine request per prompt; choice index = prompt index * n + sample index.
A client that goes away (closed stream, or a non-streaming request whose connection drops) cancels
its engine requests, which frees their slots before the next engine step.

Tokenizing, chat templates, detokenizing and whole-response rendering run in a small thread pool of their
own, never on the event loop: a megabyte prompt must not stall every other request. That helps because a
fast tokenizer's encode (transformers calls encode_batch) releases the GIL while it works (measured: the
loop ticked every few ms beside a 10 s encode; `Tokenizer.encode` alone holds it throughout). decode holds
the GIL for its whole call, so what is decoded in one call is bounded instead (max_model_len tokens).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
import unicodedata
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from linrec.engine.client import AdapterNotFoundError, EngineClient, EngineError, QueueFullError, StateNotFoundError
from linrec.engine.output import SampleDelta
from linrec.engine.request import Logprob
from linrec.engine.sampling_params import SamplingParams
from linrec.server import protocol as p
from linrec.server.metrics import Metrics, RequestTimer

logger = logging.getLogger(__name__)

T = TypeVar("T")
LOGPROB_FLOOR = -9999.0  # JSON has no -inf
# Threads for tokenizer work. A normal prompt tokenizes in well under a millisecond, so a few threads keep up
# with any engine; the bound is what a burst of huge prompts may take from the engine thread, which shares
# the CPU and, for its Python, the GIL. Four let a big job run while small ones still find a free thread.
NUM_TOKENIZER_THREADS = 4


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
    layer_route: tuple[int, ...] | None = None


class OpenAIServing:
    def __init__(self, llm: EngineClient, model_name: str, metrics: Metrics):
        self.llm = llm  # the engine, only through its client protocol (engine/client.py)
        self.model_name = model_name
        self.metrics = metrics
        self.tokenizer = llm.tokenizer
        info = llm.info
        self.max_model_len: int = info.max_model_len  # always set: the engine resolves its default
        self.num_layers: int = info.num_layers
        self.vocab_size = info.vocab_size
        self.model_path = info.model_path
        self.serves_adapters = info.serves_adapters
        # None where this tokenizer's kind gives no such bound (see max_chars_per_token).
        self.max_chars_per_token = max_chars_per_token(self.tokenizer)
        self._pool = ThreadPoolExecutor(NUM_TOKENIZER_THREADS, thread_name_prefix="linrec-tokenizer")
        # Set by expire_inflight (the drain timed out): why every open and later request ends now.
        self._expired_message: str | None = None
        self._open_streams: weakref.WeakSet[_Merged] = weakref.WeakSet()
        self._offload_waiters: set[asyncio.Future] = set()  # resolved by expire_inflight

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _expired(self) -> APIError:
        return APIError(503, self._expired_message or "the server is shutting down", type="ServiceUnavailableError")

    def expire_inflight(self, message: str) -> None:
        """End every request in flight with a 503 (a stream: an error event, then [DONE]), aborting their engine
        requests; later ones too. Called on the event loop when the drain timeout expires, so that no request
        is left for the HTTP server to cancel (a plain-text 500, or a stream cut without [DONE])."""
        self._expired_message = message
        for stream in list(self._open_streams):
            stream.fail(self._expired())
        for waiter in list(self._offload_waiters):
            if not waiter.done():
                waiter.set_result(None)

    async def _offload(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the tokenizer pool; the event loop serves others meanwhile. A thread cannot be stopped:
        when the drain expires, the request stops waiting for it."""
        if self._expired_message is not None:
            raise self._expired()
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._pool, functools.partial(fn, *args))
        expired = loop.create_future()
        self._offload_waiters.add(expired)
        try:
            await asyncio.wait({work, expired}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._offload_waiters.discard(expired)
        if not work.done():
            work.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it any more
            raise self._expired()
        return work.result()

    # -- shared pieces ------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> str | None:
        """The LoRA adapter a request's `model` names (None: the base model). 404 model_not_found otherwise."""
        if model is None or model == self.model_name:
            return None
        if self.serves_adapters and self.llm.has_lora_adapter(model):
            return model
        served = ", ".join(f"`{n}`" for n in [self.model_name, *(a.name for a in self.llm.list_lora_adapters())])
        raise APIError(
            404,
            f"The model `{model}` does not exist; this server serves {served}",
            type="NotFoundError",
            param="model",
            code="model_not_found",
        )

    def response_model(self, model: str | None) -> str:
        """The model a response names: the adapter a checked request ran on (as vLLM answers), else the base."""
        return model if model is not None else self.model_name

    def models(self) -> dict[str, Any]:
        root = self.model_path
        cards = [p.ModelCard(id=self.model_name, root=root, max_model_len=self.max_model_len)]
        cards += [
            p.ModelCard(
                id=a.name, root=a.path, parent=self.model_name, adapter_type=a.kind, max_model_len=self.max_model_len
            )
            for a in self.llm.list_lora_adapters()
        ]
        return p.dump(p.ModelList(data=cards))

    # -- LoRA adapters at runtime (vLLM's endpoints and answers) ---------------------------------------

    async def load_lora_adapter(self, req: p.LoadLoRAAdapterRequest) -> PlainTextResponse:
        if not self.serves_adapters:
            raise APIError(400, "this server serves no LoRA adapters (start it with --enable-lora)", param="lora_name")
        if req.lora_name == self.model_name:
            raise APIError(400, f"expected an adapter name other than the base model's `{self.model_name}`")
        try:
            await self.llm.load_lora_adapter(req.lora_name, req.lora_path)
        except (FileNotFoundError, ValueError) as exc:  # AdapterExistsError too: vLLM answers 400
            raise APIError(400, str(exc), param="lora_path" if isinstance(exc, FileNotFoundError) else None) from None
        logger.info("linrec: LoRA adapter %r loaded from %s", req.lora_name, req.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    async def unload_lora_adapter(self, req: p.UnloadLoRAAdapterRequest) -> PlainTextResponse:
        try:
            await self.llm.remove_lora_adapter(req.lora_name)
        except AdapterNotFoundError as exc:
            raise APIError(404, str(exc), type="NotFoundError", param="lora_name") from None
        logger.info("linrec: LoRA adapter %r unloaded (its running requests finish on it)", req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

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
                bias[token_id] = value  # the engine checks the range (EngineCore.validate)
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
            )
        except ValueError as exc:
            raise APIError(400, str(exc), param=getattr(exc, "param", None)) from None

    def _too_long(self, size: str, param: str = "prompt", generates: bool = True) -> APIError:
        need = " (prompt plus at least one generated token)" if generates else ""
        return APIError(
            400,
            f"the prompt has {size}; this model's maximum context length is {self.max_model_len} tokens{need}",
            param=param,
            code="context_length_exceeded",
        )

    def _encode(self, text: str, param: str, generates: bool = True, **kwargs: Any) -> list[int]:
        """Tokenize `text` (in the pool), refusing first what its length alone proves too long for the model:
        no token spans more than max_chars_per_token characters, so a text that long has at least
        len(text) / max_chars_per_token tokens, and tokenizing it would be wasted work."""
        _check_text(text, param)
        max_tokens = self.max_model_len - (1 if generates else 0)
        if self.max_chars_per_token is not None:
            if len(text) > max_tokens * self.max_chars_per_token:
                at_least = math.ceil(len(text) / self.max_chars_per_token)
                raise self._too_long(
                    f"{len(text)} characters, so at least {at_least} tokens (no token of this tokenizer spans more "
                    f"than {self.max_chars_per_token} characters)",
                    param,
                    generates,
                )
        return self.tokenizer.encode(text, **kwargs)

    def _default_max_tokens(self, prompt_len: int) -> int:
        """max_tokens when a request names none: the rest of the context (vLLM's default too)."""
        return max(1, self.max_model_len - prompt_len)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        base_id: str,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        route: tuple[object, float] = (None, 0.0),
        stored: dict[str, Any] | None = None,
    ) -> AsyncIterator[tuple[int, SampleDelta]]:
        """Every prompt's deltas, merged, tagged with the prompt's index; metrics observed on the way. The
        engine validates each prompt (EngineCore.validate): a refusal ends the merged stream before any delta.
        stored: the stored-state fields of a one-prompt request (store_state, resume_state, state_meta)."""
        if self._expired_message is not None:
            raise self._expired()
        arrival = time.monotonic()
        stored = {k: v for k, v in (stored or {}).items() if v is not None}
        gens = [
            self._timed(
                self.llm.generate(
                    ids,
                    params,
                    f"{base_id}-{i}",
                    lora_name=lora_name,
                    cache_salt=cache_salt,
                    layer_route=route[0],
                    route_skip_bias=route[1],
                    **stored,
                ),
                RequestTimer(self.metrics, arrival, len(ids)),
                f"{base_id}-{i}",
                lora_name or self.model_name,
                len(ids),
            )
            for i, ids in enumerate(prompts)
        ]
        merged = _merge(gens)
        self._open_streams.add(merged)
        return merged

    async def _timed(
        self, gen: AsyncIterator[SampleDelta], timer: RequestTimer, request_id: str, model: str, num_prompt_tokens: int
    ) -> AsyncIterator[SampleDelta]:
        num_generated = 0
        async for delta in gen:
            now = time.monotonic()
            timer.on_delta(now, delta.index, len(delta.token_ids), delta.first_scheduled_time)
            num_generated += len(delta.token_ids)
            if delta.finish_reason is not None:
                timer.on_sample_finished(delta.finish_reason)
            yield delta
        timer.on_finished(time.monotonic())
        # usage per request and model (an adapter's name when it ran on one): who used what, in the log
        logger.info(
            "linrec: request %s model=%s prompt_tokens=%d completion_tokens=%d",
            request_id,
            model,
            num_prompt_tokens,
            num_generated,
        )

    async def _first(self, gen: AsyncIterator[T], raw: Request) -> T:
        """The first item, with engine refusals turned into 4xx/5xx errors."""
        try:
            return await _unless_disconnected(gen.__anext__(), raw)
        # AdapterNotFoundError is a KeyError: the adapter was unloaded after check_model (a 404, not a 500).
        except (ValueError, QueueFullError, EngineError, StopAsyncIteration, AdapterNotFoundError) as exc:
            await gen.aclose()
            raise _engine_error(exc) from None
        except BaseException:
            await gen.aclose()
            raise

    # -- /v1/completions ----------------------------------------------------------------------------

    async def create_completion(self, req: p.CompletionRequest, raw: Request, request_id: str):
        lora_name = self.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, f"best_of must equal n (got best_of={req.best_of}, n={req.n})", param="best_of")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs needs prompt logprobs, which linrec does not compute", param="echo")
        prompts = await self._offload(self._completion_prompts, req.prompt)
        max_tokens = req.max_tokens if req.max_tokens is not None else self._default_max_tokens(max(map(len, prompts)))
        params = self._sampling_params(req, max_tokens, req.logprobs)
        response_id = f"cmpl-{request_id}"
        created = int(time.time())
        echo_texts = await self._offload(self._echo_texts, prompts) if req.echo else [""] * len(prompts)
        merged = self._generate(prompts, params, f"cmpl-{uuid.uuid4().hex}", lora_name, req.cache_salt, _route(req))
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
        return await self._offload(
            self._completion_response, req, choices, echo_texts, response_id, created, num_prompt_tokens
        )

    def _completion_response(
        self,
        req: p.CompletionRequest,
        choices: list[_Choice],
        echo_texts: list[str],
        response_id: str,
        created: int,
        num_prompt_tokens: int,
    ) -> JSONResponse:
        """The whole response, rendered to bytes (in the pool: logprob texts and JSON grow with the output)."""
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
        usage = self._usage(req, num_prompt_tokens, num_generated, [c.layer_route for c in choices])
        body = p.CompletionResponse(
            id=response_id, created=created, model=self.response_model(req.model), choices=out, usage=usage
        )
        return JSONResponse(p.dump(body))

    def _completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """Every prompt as checked token ids (in the pool)."""
        if isinstance(prompt, str):
            prompts = [self._encode(prompt, "prompt")]
        elif not prompt:
            raise APIError(400, "expected a non-empty prompt, got an empty list", param="prompt")
        elif all(isinstance(x, str) for x in prompt):
            prompts = [self._encode(x, "prompt") for x in prompt]
        elif all(isinstance(x, int) for x in prompt):
            prompts = [list(prompt)]
        else:
            prompts = [list(x) for x in prompt]
        if any(not ids for ids in prompts):
            raise APIError(400, "expected a non-empty prompt, got 0 tokens", param="prompt")
        return prompts

    def _echo_texts(self, prompts: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]

    def _usage(
        self, req, num_prompt_tokens: int, num_generated: int, routes: list[tuple[int, ...] | None]
    ) -> p.UsageInfo:
        """Token counts; with a layer_route in the request, also the route each choice ran and its layer passes
        per token summed over the choices (every layer once where a choice ran none)."""
        usage = p.UsageInfo(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=num_generated,
            total_tokens=num_prompt_tokens + num_generated,
        )
        if req.layer_route is not None:
            ran = [list(r) if r is not None else [1] * self.num_layers for r in routes]
            usage.layer_routes = ran
            usage.layers_executed = sum(sum(r) for r in ran)
        return usage

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
        routes: dict[int, tuple[int, ...]] = {}  # choice index -> the layer route it runs
        num_choices = len(echo_texts) * req.n
        offsets = [len(echo_texts[i // req.n]) for i in range(num_choices)]
        echoed: set[int] = set()
        item: tuple[int, SampleDelta] | None = first
        try:
            while item is not None:
                prompt_index, delta = item
                index = prompt_index * req.n + delta.index
                num_generated += len(delta.token_ids)
                if delta.layer_route is not None:
                    routes[index] = delta.layer_route
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
                        id=response_id, created=created, model=self.response_model(req.model), choices=[choice]
                    )
                    yield _event(p.dump(chunk))
                item = await anext(merged, None)
            if include_usage:
                usage = self._usage(req, num_prompt_tokens, num_generated, [routes.get(i) for i in range(num_choices)])
                chunk = p.CompletionResponse(
                    id=response_id, created=created, model=self.response_model(req.model), choices=[], usage=usage
                )
                yield _event(p.dump(chunk))
        except (EngineError, APIError) as exc:  # APIError: the drain expired
            error = exc if isinstance(exc, APIError) else _engine_error(exc)
            yield _event(p.dump(error.response_body()))
        finally:
            _close_soon(merged)
        yield "data: [DONE]\n\n"

    # -- /v1/chat/completions -----------------------------------------------------------------------

    def chat_prompt(
        self, messages: list[p.ChatMessage], add_generation_prompt: bool = True, generates: bool = True
    ) -> list[int]:
        """The conversation through the chat template, as token ids (in the pool: templates are Python)."""
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
        text = self.chat_text(conversation, add_generation_prompt, "messages")
        return self._encode(text, "messages", generates, add_special_tokens=False)

    def chat_text(self, conversation: list[dict[str, str]], add_generation_prompt: bool, param: str) -> str:
        """A conversation of {"role", "content"} dicts through the chat template, as text (in the pool)."""
        for message in conversation:
            _check_text(message["content"], param)
        if self.tokenizer.chat_template is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param=param)
        try:
            return self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as exc:  # jinja's TemplateError and raise_exception(): the messages broke the template
            raise APIError(400, f"the chat template rejected the messages: {exc}", param=param) from None

    async def create_chat_completion(self, req: p.ChatCompletionRequest, raw: Request, request_id: str):
        lora_name = self.check_model(req.model)
        prompt_ids = await self._offload(self._checked_chat_prompt, req.messages, req.add_generation_prompt)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = self._default_max_tokens(len(prompt_ids))
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        params = self._sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        response_id = f"chatcmpl-{request_id}"
        created = int(time.time())
        merged = self._generate(
            [prompt_ids], params, f"chatcmpl-{uuid.uuid4().hex}", lora_name, req.cache_salt, _route(req)
        )
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
        return await self._offload(self._chat_response, req, choices, response_id, created, len(prompt_ids))

    def _checked_chat_prompt(self, messages: list[p.ChatMessage], add_generation_prompt: bool) -> list[int]:
        return self.chat_prompt(messages, add_generation_prompt)

    def _chat_response(
        self,
        req: p.ChatCompletionRequest,
        choices: list[_Choice],
        response_id: str,
        created: int,
        num_prompt_tokens: int,
    ) -> JSONResponse:
        """The whole response, rendered to bytes (in the pool, as _completion_response)."""
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
        usage = self._usage(req, num_prompt_tokens, num_generated, [c.layer_route for c in choices])
        body = p.ChatCompletionResponse(
            id=response_id, created=created, model=self.response_model(req.model), choices=out, usage=usage
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
                id=response_id, created=created, model=self.response_model(req.model), choices=choices, usage=usage
            )
            return _event(p.dump(body))

        num_generated = 0
        routes: dict[int, tuple[int, ...]] = {}  # choice index -> the layer route it runs
        num_choices = req.n
        try:
            for index in range(req.n):
                role = p.DeltaMessage(role="assistant", content="")
                yield chunk([p.ChatChunkChoice(index=index, delta=role)])
            item: tuple[int, SampleDelta] | None = first
            while item is not None:
                delta = item[1]
                num_generated += len(delta.token_ids)
                if delta.layer_route is not None:
                    routes[delta.index] = delta.layer_route
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
                usage = self._usage(req, num_prompt_tokens, num_generated, [routes.get(i) for i in range(num_choices)])
                yield chunk([], usage)
        except (EngineError, APIError) as exc:  # APIError: the drain expired
            error = exc if isinstance(exc, APIError) else _engine_error(exc)
            yield _event(p.dump(error.response_body()))
        finally:
            _close_soon(merged)
        yield "data: [DONE]\n\n"

    # -- /tokenize, /detokenize ---------------------------------------------------------------------

    async def tokenize(self, req: p.TokenizeRequest) -> JSONResponse:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "expected exactly one of prompt or messages")
        return await self._offload(self._tokenize, req)

    def _tokenize(self, req: p.TokenizeRequest) -> JSONResponse:
        # More than max_model_len tokens is no prompt this server could run (vLLM answers it anyway); the bound
        # keeps one request's tokenizer work, and its response, in proportion to what the model can take.
        if req.messages is not None:
            ids = self.chat_prompt(req.messages, req.add_generation_prompt, generates=False)
            param = "messages"
        else:
            ids = self._encode(req.prompt, "prompt", generates=False, add_special_tokens=req.add_special_tokens)
            param = "prompt"
        if len(ids) > self.max_model_len:
            raise self._too_long(f"{len(ids)} tokens", param, generates=False)
        return JSONResponse(p.dump(p.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.max_model_len)))

    async def detokenize(self, req: p.DetokenizeRequest) -> JSONResponse:
        self.check_model(req.model)
        # decode holds the GIL for its whole call: the token count bounds how long the loop waits on it.
        if len(req.tokens) > self.max_model_len:
            raise APIError(
                400,
                f"expected at most max_model_len={self.max_model_len} tokens, got {len(req.tokens)}",
                param="tokens",
                code="context_length_exceeded",
            )
        bad = [t for t in req.tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"expected token ids in [0, {self.vocab_size}), got {bad[0]}", param="tokens")
        return await self._offload(self._detokenize, req.tokens)

    def _detokenize(self, tokens: list[int]) -> JSONResponse:
        return JSONResponse(p.dump(p.DetokenizeResponse(prompt=self.tokenizer.decode(tokens))))


def _check_text(text: str, param: str) -> None:
    """JSON's \\ud800 escapes decode to lone surrogates, which no tokenizer can encode (it raised a TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(
            400,
            f"expected valid Unicode text, got a lone surrogate {text[exc.start]!r} at character {exc.start}",
            param=param,
        ) from None


@functools.cache
def _max_nfd_chars() -> int:
    """The most characters one character's canonical decomposition has: NFC merges at most that many into one."""
    return max(len(unicodedata.normalize("NFD", chr(c))) for c in range(0x110000) if not 0xD800 <= c < 0xE000)


def max_chars_per_token(tokenizer: Any) -> int | None:
    """The most characters of input text one token can stand for, or None where that is not bounded.

    Bounded for BPE tokenizers that never drop text and never let one token swallow a run: byte-level
    (every character becomes bytes in the vocabulary) or byte_fallback with all 256 byte tokens; normalizers
    that only add or map 1:1 (Prepend, Replace without shrinking) or NFC (which merges at most _max_nfd_chars
    characters into one); pre-tokenizers that keep every character (ByteLevel, Metaspace, Digits, Split and
    Punctuation unless they remove); added tokens without lstrip/rstrip (which absorb whitespace). Then a
    token covers at most as many characters as its vocabulary string has (a byte-level string has one
    character per byte; '<0x41>' covers one byte), times the NFC factor. Anything else (WordPiece's and
    Unigram's unknown tokens, whitespace-removing pre-tokenizers, slow tokenizers) gives None.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except (ValueError, TypeError, AttributeError):
        return None
    factor = _normalizer_factor(spec.get("normalizer"))
    if factor is None or not _keeps_every_character(spec.get("pre_tokenizer")):
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None
    vocab = backend.get_vocab(with_added_tokens=True)
    is_byte_level = _has_type(spec.get("pre_tokenizer"), "ByteLevel") or _has_type(spec.get("normalizer"), "ByteLevel")
    if is_byte_level:
        from tokenizers.pre_tokenizers import ByteLevel

        if not all(char in vocab for char in ByteLevel.alphabet()):
            return None
    elif not (model.get("byte_fallback") and all(f"<0x{b:02X}>" in vocab for b in range(256))):
        return None
    if any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or []):
        return None
    return factor * max(map(len, vocab), default=1)


def _has_type(spec: dict | None, kind: str) -> bool:
    if not spec:
        return False
    if spec.get("type") == "Sequence":
        members = spec.get("normalizers") or spec.get("pretokenizers") or []
        return any(_has_type(m, kind) for m in members)
    return spec.get("type") == kind


def _normalizer_factor(spec: dict | None) -> int | None:
    """How many input characters one normalized character can stand for; None if unbounded or unknown."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for member in spec.get("normalizers") or []:
            member_factor = _normalizer_factor(member)
            if member_factor is None:
                return None
            factor *= member_factor
        return factor
    if kind in ("Prepend", "ByteLevel"):
        return 1
    if kind == "Replace":
        pattern = (spec.get("pattern") or {}).get("String")
        return 1 if pattern is not None and len(spec.get("content") or "") >= len(pattern) else None
    if kind == "NFC":
        return _max_nfd_chars()
    return None


def _keeps_every_character(spec: dict | None) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_keeps_every_character(m) for m in spec.get("pretokenizers") or [])
    if kind in ("ByteLevel", "Metaspace", "Digits"):
        return True
    if kind in ("Split", "Punctuation"):
        return spec.get("behavior") != "Removed"
    return False


def _engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, QueueFullError):
        return APIError(429, f"the server is overloaded: {exc}", type="RateLimitError", headers={"Retry-After": "1"})
    if isinstance(exc, EngineError):
        return APIError(500, str(exc), type="InternalServerError")
    if isinstance(exc, StopAsyncIteration):
        return APIError(500, "the engine ended the request without output", type="InternalServerError")
    if isinstance(exc, AdapterNotFoundError):  # unloaded between the model check and the engine
        return APIError(404, str(exc), type="NotFoundError", param="model", code="model_not_found")
    if isinstance(exc, StateNotFoundError):  # also another model's, adapter's or tenant's: ids cannot be probed
        return APIError(404, str(exc), type="NotFoundError", param=exc.param, code="state_not_found")
    return APIError(400, str(exc), param=getattr(exc, "param", None), code=getattr(exc, "code", None))


def _route(req: p._SamplingRequest) -> tuple[object, float]:
    """The request's layer route for the engine ("auto", a tuple of counts or None) and its skip bias."""
    route = req.layer_route
    return (tuple(route) if isinstance(route, list) else route), req.layer_route_skip_bias


def _fold(choice: _Choice, delta: SampleDelta) -> None:
    choice.text.append(delta.text)
    choice.token_ids.extend(delta.token_ids)
    choice.logprobs.extend(delta.logprobs)
    if delta.layer_route is not None:
        choice.layer_route = delta.layer_route
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

    def fail(self, exc: BaseException) -> None:
        """The consumer's next item raises `exc` (then every source is cancelled)."""
        self._queue.put_nowait((-1, None, exc))

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

"""Handlers of OpenAI's Responses API and of linrec's state API (docs/responses.md).

A stored response is an engine state (engine/state_store.py) kept under the response's id, with the response
object as its meta: continuing it (previous_response_id) prefills only the new turn's tokens, whatever the
conversation's length. The prompt of a first turn is the chat template over [instructions] + input; a
continuation's is the segment the template renders for the new messages after an assistant turn: the rendering
of [placeholder user, placeholder assistant] + new messages with the placeholders' own rendering cut off its
front. So a continuation equals one request whose prompt is the stored conversation's tokens + that segment.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from linrec.engine.client import EngineError, StateNotFoundError
from linrec.engine.output import SampleDelta
from linrec.engine.sampling_params import InvalidRequestError
from linrec.engine.state_store import StateInfo
from linrec.server import protocol as p
from linrec.server.serving import (
    APIError,
    OpenAIServing,
    _Choice,
    _close_soon,
    _engine_error,
    _event,
    _fold,
    _route,
    _sse,
    _unless_disconnected,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
# The conversation a continuation's segment is cut from: the template renders it, then the new messages after
# it; what the new messages add is the segment. Any template that renders a conversation turn by turn has
# the placeholders' rendering as a prefix of the whole.
PLACEHOLDER = ({"role": "user", "content": "."}, {"role": "assistant", "content": "."})
# OpenAI's fields linrec does not serve: a request that sets them gets a 400 naming the field.
UNSUPPORTED = {
    "background": "background responses",
    "conversation": "conversations (continue with previous_response_id)",
    "prompt": "stored prompt templates",
}


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


class ResponsesServing:
    """POST/GET/DELETE /v1/responses, fork, and the state export and import, over OpenAIServing's pieces (model
    check, sampling params, the tokenizer pool, the merged engine stream)."""

    def __init__(self, serving: OpenAIServing):
        self.serving = serving
        self.llm = serving.llm

    # -- POST /v1/responses -----------------------------------------------------------------------------------

    async def create(self, req: p.ResponsesRequest, raw: Request) -> Response:
        serving = self.serving
        lora_name = serving.check_model(req.model)
        _check_supported(req)
        num_stored = 0
        if req.previous_response_id is not None:
            previous = await self._state(
                self.llm.state_info(req.previous_response_id, cache_salt=req.cache_salt), "previous_response_id"
            )
            num_stored = previous.num_tokens
        prompt_ids = await serving._offload(self._prompt, req)
        max_tokens = req.max_output_tokens
        if max_tokens is None:
            max_tokens = serving._default_max_tokens(num_stored + len(prompt_ids))
        params = serving._sampling_params(req, max_tokens, None)
        response_id = new_response_id()
        record = self._record(req, response_id)
        stored = {
            "store_state": response_id if req.store else None,
            "resume_state": req.previous_response_id,
            "state_meta": p.dump(record) if req.store else None,
        }
        merged = serving._generate([prompt_ids], params, response_id, lora_name, req.cache_salt, _route(req), stored)
        try:
            first = await serving._first(merged, raw)
        except APIError as exc:
            if exc.code == "state_not_found":  # expired or deleted since the lookup above
                exc.param = "previous_response_id"
            raise
        num_prompt_tokens = num_stored + len(prompt_ids)  # until the last delta says what the engine ran
        if req.stream:
            return _sse(self._stream(merged, first, req, record, num_prompt_tokens))

        choice = _Choice()
        last: list[SampleDelta] = []

        async def collect() -> None:
            item: tuple[int, SampleDelta] | None = first
            while item is not None:
                _fold(choice, item[1])
                if item[1].finish_reason is not None:
                    last.append(item[1])
                item = await anext(merged, None)

        try:
            await _unless_disconnected(collect(), raw)
        except EngineError as exc:
            raise _engine_error(exc) from None
        finally:
            await merged.aclose()
        done = self._finished(req, record, "".join(choice.text), choice, last[-1] if last else None, num_prompt_tokens)
        await self._keep(req, done)
        return JSONResponse(p.dump(done))

    def _prompt(self, req: p.ResponsesRequest) -> list[int]:
        """The token ids this request adds to the conversation (in the pool: templates are Python)."""
        serving = self.serving
        if isinstance(req.input, str):
            messages = [{"role": "user", "content": req.input}]
        else:
            messages = [{"role": m.role, "content": _content_text(m.content)} for m in req.input]
        if req.instructions is not None:
            messages.insert(0, {"role": "system", "content": req.instructions})
        if req.previous_response_id is None:
            text = serving.chat_text(messages, True, "input")
        else:
            head = serving.chat_text(list(PLACEHOLDER), False, "previous_response_id")
            whole = serving.chat_text([*PLACEHOLDER, *messages], True, "input")
            if not whole.startswith(head):
                raise APIError(
                    400,
                    "this model's chat template does not render a conversation as a prefix of its continuation "
                    "(a user and an assistant turn render differently once more messages follow), so the new "
                    "turn's tokens cannot be cut from it: previous_response_id is not served for this model",
                    param="previous_response_id",
                )
            text = whole[len(head) :]
        return serving._encode(text, "input", add_special_tokens=False)

    def _record(self, req: p.ResponsesRequest, response_id: str) -> p.ResponseObject:
        """The response object as it starts (in progress, no output yet)."""
        return p.ResponseObject(
            id=response_id,
            created_at=int(time.time()),
            status="in_progress",
            instructions=req.instructions,
            max_output_tokens=req.max_output_tokens,
            metadata=req.metadata or {},
            model=self.serving.response_model(req.model),
            previous_response_id=req.previous_response_id,
            store=req.store,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            user=req.user,
        )

    def _finished(
        self,
        req: p.ResponsesRequest,
        record: p.ResponseObject,
        text: str,
        choice: _Choice,
        last: SampleDelta | None,
        num_prompt_tokens: int,
    ) -> p.ResponseObject:
        """The response object once the output ended: completed, or incomplete when max_output_tokens ended it."""
        is_complete = choice.finish_reason != "length"
        message = _message(record.id, text, "completed" if is_complete else "incomplete")
        if last is not None and last.num_prompt_tokens is not None:
            num_prompt_tokens = last.num_prompt_tokens
        num_cached = (last.num_cached_tokens if last is not None else None) or 0
        num_output = len(choice.token_ids)
        usage = p.ResponseUsage(
            input_tokens=num_prompt_tokens,
            input_tokens_details=p.InputTokensDetails(cached_tokens=num_cached),
            output_tokens=num_output,
            total_tokens=num_prompt_tokens + num_output,
        )
        if req.layer_route is not None:
            ran = list(choice.layer_route) if choice.layer_route is not None else [1] * self.serving.num_layers
            usage.layer_routes = [ran]
            usage.layers_executed = sum(ran)
        return record.model_copy(
            update={
                "status": "completed" if is_complete else "incomplete",
                "completed_at": int(time.time()),
                "incomplete_details": None if is_complete else p.IncompleteDetails(),
                "output": [message],
                "usage": usage,
            }
        )

    async def _keep(self, req: p.ResponsesRequest, done: p.ResponseObject) -> None:
        """Store the finished response object with its state (shielded: a client gone now does not leave the
        stored record in progress)."""
        if not req.store:
            return
        try:
            await asyncio.shield(self.llm.set_state_meta(done.id, p.dump(done), cache_salt=req.cache_salt))
        except StateNotFoundError:  # pushed out of a full store already (no --state-store directory)
            logger.warning("linrec: response %s finished, but its state was not kept (the store is full)", done.id)

    async def _stream(
        self,
        merged: AsyncIterator[tuple[int, SampleDelta]],
        first: tuple[int, SampleDelta],
        req: p.ResponsesRequest,
        record: p.ResponseObject,
        num_prompt_tokens: int,
    ) -> AsyncIterator[str]:
        """OpenAI's event sequence: created, in_progress, the message item and its text part added, text deltas,
        then text, part and item done, and response.completed (or response.incomplete); an engine failure is an
        `error` event followed by response.failed. Every event is `event: <type>` and `data: <JSON>`."""
        numbers = itertools.count()
        item_id = _message_id(record.id)

        def event(kind: str, **fields: Any) -> str:
            return f"event: {kind}\n" + _event({"type": kind, "sequence_number": next(numbers), **fields})

        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        choice = _Choice()
        last: SampleDelta | None = None
        try:
            yield event("response.created", response=p.dump(record))
            yield event("response.in_progress", response=p.dump(record))
            added = p.ResponseOutputMessage(id=item_id, status="in_progress", content=[])
            yield event("response.output_item.added", output_index=0, item=p.dump(added))
            yield event("response.content_part.added", **where, part=p.dump(p.ResponseOutputText(text="")))
            item: tuple[int, SampleDelta] | None = first
            while item is not None:
                delta = item[1]
                _fold(choice, delta)
                if delta.finish_reason is not None:
                    last = delta
                if delta.text:
                    yield event("response.output_text.delta", **where, delta=delta.text, logprobs=[])
                item = await anext(merged, None)
            text = "".join(choice.text)
            done = self._finished(req, record, text, choice, last, num_prompt_tokens)
            yield event("response.output_text.done", **where, text=text, logprobs=[])
            yield event("response.content_part.done", **where, part=p.dump(p.ResponseOutputText(text=text)))
            yield event("response.output_item.done", output_index=0, item=p.dump(done.output[0]))
            await self._keep(req, done)
            kind = "response.completed" if done.status == "completed" else "response.incomplete"
            yield event(kind, response=p.dump(done))
        except (EngineError, APIError) as exc:  # APIError: the drain expired
            error = exc if isinstance(exc, APIError) else _engine_error(exc)
            yield event("error", code=error.code or error.type, message=error.message, param=error.param)
            failed = record.model_copy(
                update={"status": "failed", "error": p.ResponseError(code="server_error", message=error.message)}
            )
            yield event("response.failed", response=p.dump(failed))
        finally:
            _close_soon(merged)

    # -- GET / DELETE /v1/responses/{id}, fork ----------------------------------------------------------------

    async def retrieve(self, response_id: str, cache_salt: str | None) -> JSONResponse:
        info = await self._state(self.llm.state_info(response_id, cache_salt=cache_salt), "response_id")
        return JSONResponse(self._stored_record(info))

    async def delete(self, response_id: str, cache_salt: str | None) -> JSONResponse:
        await self._state(self.llm.delete_state(response_id, cache_salt=cache_salt), "response_id")
        logger.info("linrec: response %s deleted", response_id)
        return JSONResponse(p.dump(p.ResponseDeleted(id=response_id)))

    async def fork(self, response_id: str, cache_salt: str | None) -> JSONResponse:
        """A new response id over an independent copy of the state: two continuations of one conversation."""
        info = await self._state(self.llm.state_info(response_id, cache_salt=cache_salt), "response_id")
        new_id = new_response_id()
        record = {**self._stored_record(info), "id": new_id}
        await self._state(self.llm.fork_state(response_id, new_id, cache_salt=cache_salt, meta=record), "response_id")
        return JSONResponse(record)

    def _stored_record(self, info: StateInfo) -> dict[str, Any]:
        """A stored state's response object: the one kept with it, or (an import made without one) a bare one."""
        if info.meta.get("object") == "response":
            return {**info.meta, "id": info.state_id}
        bare = p.ResponseObject(
            id=info.state_id,
            created_at=int(info.created_at),
            completed_at=int(info.created_at),
            status="completed",
            model=self.serving.response_model(info.lora_name),
        )
        return p.dump(bare)

    # -- linrec's state API: GET /v1/states/{id}, POST /v1/states ------------------------------------------------

    async def export_state(self, state_id: str, cache_salt: str | None) -> Response:
        data = await self._state(self.llm.export_state(state_id, cache_salt=cache_salt), "state_id")
        return Response(
            data,
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{state_id}.safetensors"'},
        )

    async def import_state(self, raw: Request, state_id: str | None, cache_salt: str | None) -> JSONResponse:
        data = await raw.body()  # the middleware bounded it (--max-request-body-bytes)
        if not data:
            raise APIError(400, "expected a state exported by GET /v1/states/{id} as the body, got an empty body")
        state_id = state_id or new_response_id()
        info = await self._state(self.llm.import_state(data, state_id, cache_salt=cache_salt), "body")
        record = self._stored_record(info)
        if record != info.meta:  # the exported record names its old id (or there was none)
            await self._state(self.llm.set_state_meta(state_id, record, cache_salt=cache_salt), "id")
        logger.info("linrec: state %s imported (%d tokens, %d bytes)", state_id, info.num_tokens, info.num_bytes)
        body = p.StateObject(
            id=state_id,
            model=self.serving.response_model(info.lora_name),
            num_tokens=info.num_tokens,
            num_bytes=info.num_bytes,
            created_at=int(info.created_at),
        )
        return JSONResponse(p.dump(body))

    async def _state(self, work: Awaitable[T], param: str) -> T:
        """A state store call, its refusals as 4xx (not found: 404 naming `param`; a bad blob or id: 400)."""
        try:
            return await work
        except StateNotFoundError as exc:
            raise APIError(404, str(exc), type="NotFoundError", param=param, code="state_not_found") from None
        except InvalidRequestError as exc:  # InvalidStateError: an import that is no state of this model
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from None
        except EngineError as exc:
            raise _engine_error(exc) from None


def _check_supported(req: p.ResponsesRequest) -> None:
    for name, what in UNSUPPORTED.items():
        value = getattr(req, name)
        if value not in (None, False):
            raise APIError(400, f"linrec does not serve {what}: expected no {name}, got {value!r}"[:300], param=name)
    if req.tools:
        raise APIError(400, f"linrec generates text only: expected no tools, got {len(req.tools)}", param="tools")
    if req.tool_choice not in (None, "auto", "none"):
        message = f"expected tool_choice 'auto' or 'none' (no tools), got {req.tool_choice!r}"[:300]
        raise APIError(400, message, param="tool_choice")
    if req.top_logprobs:
        raise APIError(
            400, "linrec's Responses API returns no logprobs: expected no top_logprobs", param="top_logprobs"
        )


def _content_text(content: str | list[p.ResponseInputText]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _message_id(response_id: str) -> str:
    return "msg_" + response_id.removeprefix("resp_")


def _message(response_id: str, text: str, status: str) -> p.ResponseOutputMessage:
    return p.ResponseOutputMessage(
        id=_message_id(response_id), status=status, content=[p.ResponseOutputText(text=text)]
    )

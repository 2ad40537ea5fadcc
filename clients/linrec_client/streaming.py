"""Server-sent events: the decoder, and the sync and async streams of typed chunks built on it.

A stream ends at `data: [DONE]`; one that ends without it was cut off (the server died or the
connection dropped) and raises APIConnectionError rather than pass for a complete answer. An error
object sent inside the stream raises LinrecAPIError with the server's message.

A Responses API stream (ResponseStream) has no [DONE]: it ends with response.completed, .incomplete or
.failed, and an `error` event raises LinrecAPIError.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Generic, TypeVar

import httpx
from pydantic import BaseModel

from linrec_client.errors import APIConnectionError, api_error, transport_error
from linrec_client.types import (
    FINAL_RESPONSE_EVENTS,
    RESPONSE_EVENTS,
    Response,
    ResponseErrorEvent,
    ResponseEvent,
    Usage,
)

T = TypeVar("T", bound=BaseModel)
DONE = "[DONE]"


class SSEDecoder:
    """Feeds on lines (without their line endings); returns each event's data when the event ends.

    Follows the WHATWG event-stream rules that matter here: `data:` lines of one event join with
    newlines, one space after the colon is dropped, lines starting with `:` are comments, and other
    fields (event, id, retry) are ignored.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """The pending event's data, if any (also called when the stream ends without a blank line)."""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data


def iter_events(lines: Iterable[str]) -> Iterator[str]:
    decoder = SSEDecoder()
    for line in lines:
        data = decoder.feed(line)
        if data is not None:
            yield data
    data = decoder.flush()
    if data is not None:
        yield data


async def aiter_events(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    decoder = SSEDecoder()
    async for line in lines:
        data = decoder.feed(line)
        if data is not None:
            yield data
    data = decoder.flush()
    if data is not None:
        yield data


def parse_chunk(data: str, cast: type[T]) -> T:
    try:
        payload = json.loads(data)
    except json.JSONDecodeError:
        raise APIConnectionError(f"expected a JSON event in the stream, got {data[:200]!r}") from None
    if isinstance(payload, dict) and "error" in payload:
        raise api_error(None, payload)
    return cast.model_validate(payload)


def parse_response_event(data: str) -> ResponseEvent:
    """A Responses API event as its class (RESPONSE_EVENTS; unknown types as ResponseEvent). An `error` event,
    or an error object, raises LinrecAPIError."""
    try:
        payload = json.loads(data)
    except json.JSONDecodeError:
        raise APIConnectionError(f"expected a JSON event in the stream, got {data[:200]!r}") from None
    if isinstance(payload, dict) and "error" in payload:
        raise api_error(None, payload)
    kind = payload.get("type") if isinstance(payload, dict) else None
    event = RESPONSE_EVENTS.get(kind, ResponseEvent).model_validate(payload)
    if isinstance(event, ResponseErrorEvent):
        raise api_error(None, {"error": {"message": event.message, "type": event.code, "code": event.code}})
    return event


def _cut_off(end: str = f"`data: {DONE}`") -> APIConnectionError:
    return APIConnectionError(f"the stream ended before {end} (the server closed it early)")


_RESPONSE_END = "response.completed, .incomplete or .failed"


class Stream(Generic[T]):
    """Iterate for chunks; closing it (or leaving a `with` block) closes the connection, which makes
    the server abort the request. `usage` holds the last chunk's usage (with include_usage)."""

    def __init__(self, response: httpx.Response, cast: type[T]):
        self.response = response
        self.usage: Usage | None = None
        self._iterator = self._iterate(cast)

    def _iterate(self, cast: type[T]) -> Iterator[T]:
        try:
            for data in iter_events(self.response.iter_lines()):
                if data == DONE:
                    return
                chunk = parse_chunk(data, cast)
                self.usage = getattr(chunk, "usage", None) or self.usage
                yield chunk
            raise _cut_off()
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        finally:
            self.response.close()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        return next(self._iterator)

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncStream(Generic[T]):
    """The async twin of Stream: `async for chunk in stream`, `await stream.aclose()`."""

    def __init__(self, response: httpx.Response, cast: type[T]):
        self.response = response
        self.usage: Usage | None = None
        self._iterator = self._iterate(cast)

    async def _iterate(self, cast: type[T]) -> AsyncIterator[T]:
        try:
            async for data in aiter_events(self.response.aiter_lines()):
                if data == DONE:
                    return
                chunk = parse_chunk(data, cast)
                self.usage = getattr(chunk, "usage", None) or self.usage
                yield chunk
            raise _cut_off()
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        finally:
            await self.response.aclose()

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class ResponseStream:
    """A streamed response's events (ResponseEvent and its subclasses); `final_response` is the response object
    of the event that ended it (completed, incomplete or failed). Closing it closes the connection, which makes
    the server abort the request (nothing is stored)."""

    def __init__(self, response: httpx.Response):
        self.response = response
        self.final_response: Response | None = None
        self._iterator = self._iterate()

    def _iterate(self) -> Iterator[ResponseEvent]:
        try:
            for data in iter_events(self.response.iter_lines()):
                event = parse_response_event(data)
                if event.type in FINAL_RESPONSE_EVENTS:
                    self.final_response = event.response
                    yield event
                    return
                yield event
            raise _cut_off(_RESPONSE_END)
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        finally:
            self.response.close()

    def __iter__(self) -> Iterator[ResponseEvent]:
        return self

    def __next__(self) -> ResponseEvent:
        return next(self._iterator)

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> ResponseStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncResponseStream:
    """The async twin of ResponseStream."""

    def __init__(self, response: httpx.Response):
        self.response = response
        self.final_response: Response | None = None
        self._iterator = self._iterate()

    async def _iterate(self) -> AsyncIterator[ResponseEvent]:
        try:
            async for data in aiter_events(self.response.aiter_lines()):
                event = parse_response_event(data)
                if event.type in FINAL_RESPONSE_EVENTS:
                    self.final_response = event.response
                    yield event
                    return
                yield event
            raise _cut_off(_RESPONSE_END)
        except httpx.TransportError as exc:
            raise transport_error(exc) from exc
        finally:
            await self.response.aclose()

    def __aiter__(self) -> AsyncIterator[ResponseEvent]:
        return self

    async def __anext__(self) -> ResponseEvent:
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncResponseStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

"""Client and AsyncClient: one method per server route, typed responses, retries and timeouts.

    client = Client("http://127.0.0.1:8000", api_key=None)
    client.completions("Hello", max_tokens=8).choices[0].text
    for chunk in client.chat_completions([{"role": "user", "content": "Hi"}], stream=True): ...
    turn = client.responses("Hi"); client.responses("And?", previous_response_id=turn.id)

Every call retries 429 and 503 answers and connection failures (RetryPolicy: exponential backoff,
Retry-After honoured), then raises the exception errors.py maps the status to, carrying the
server's message, type, param and code. A stream is retried only until its response starts.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal, TypeVar, overload

import httpx
from pydantic import BaseModel

from linrec_client._base import (
    BaseClient,
    ChatParams,
    CompletionParams,
    Prompt,
    ResponseInput,
    ResponseParams,
    RetryPolicy,
    Unpack,
    quote_id,
    salt_query,
    should_retry,
)
from linrec_client.errors import from_response, transport_error
from linrec_client.streaming import AsyncResponseStream, AsyncStream, ResponseStream, Stream
from linrec_client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    DetokenizeResult,
    ModelList,
    Response,
    ResponseDeleted,
    State,
    TokenizeResult,
)

T = TypeVar("T", bound=BaseModel)
Timeout = float | httpx.Timeout | None


class Client(BaseClient):
    """Synchronous client; use it as a context manager or call close() to release its connections."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        """base_url: the server's root (a trailing /v1 is accepted too); default LINREC_BASE_URL or
        http://127.0.0.1:8000. api_key: default LINREC_API_KEY. timeout: seconds or an httpx.Timeout
        (default 600 s, 5 s to connect). max_retries (default 2) or a whole RetryPolicy. transport: for
        tests (httpx.MockTransport)."""
        super().__init__(base_url, api_key, model, timeout, max_retries, retry, headers)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    # -- routes ----------------------------------------------------------------------------------------

    @overload
    def completions(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        stream: Literal[False] = False,
        include_usage: bool = True,
        timeout: Timeout = None,
        **params: Unpack[CompletionParams],
    ) -> Completion: ...

    @overload
    def completions(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        stream: Literal[True],
        include_usage: bool = True,
        timeout: Timeout = None,
        **params: Unpack[CompletionParams],
    ) -> Stream[Completion]: ...

    def completions(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        stream: bool = False,
        include_usage: bool = True,
        timeout: Timeout = None,
        **params: Unpack[CompletionParams],
    ) -> Completion | Stream[Completion]:
        """POST /v1/completions. A prompt is a string, a list of strings, token ids or lists of them.
        With stream=True, a Stream of Completion chunks (the last carries usage unless include_usage=False)."""
        body = self._generation_body("prompt", prompt, model, stream, include_usage, params)
        if stream:
            return Stream(self._send("POST", "/v1/completions", body, timeout, stream=True), Completion)
        return self._json("POST", "/v1/completions", body, timeout, Completion)

    @overload
    def chat_completions(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str | None = None,
        stream: Literal[False] = False,
        include_usage: bool = True,
        timeout: Timeout = None,
        **params: Unpack[ChatParams],
    ) -> ChatCompletion: ...

    @overload
    def chat_completions(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str | None = None,
        stream: Literal[True],
        include_usage: bool = True,
        timeout: Timeout = None,
        **params: Unpack[ChatParams],
    ) -> Stream[ChatCompletionChunk]: ...

    def chat_completions(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str | None = None,
        stream: bool = False,
        include_usage: bool = True,
        timeout: Timeout = None,
        **params: Unpack[ChatParams],
    ) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """POST /v1/chat/completions with messages such as [{"role": "user", "content": "Hi"}]."""
        body = self._generation_body("messages", messages, model, stream, include_usage, params)
        if stream:
            return Stream(self._send("POST", "/v1/chat/completions", body, timeout, stream=True), ChatCompletionChunk)
        return self._json("POST", "/v1/chat/completions", body, timeout, ChatCompletion)

    # -- the Responses API and stored states (docs/responses.md) ----------------------------------------------

    @overload
    def responses(
        self,
        input: ResponseInput,
        *,
        model: str | None = None,
        stream: Literal[False] = False,
        timeout: Timeout = None,
        **params: Unpack[ResponseParams],
    ) -> Response: ...

    @overload
    def responses(
        self,
        input: ResponseInput,
        *,
        model: str | None = None,
        stream: Literal[True],
        timeout: Timeout = None,
        **params: Unpack[ResponseParams],
    ) -> ResponseStream: ...

    def responses(
        self,
        input: ResponseInput,
        *,
        model: str | None = None,
        stream: bool = False,
        timeout: Timeout = None,
        **params: Unpack[ResponseParams],
    ) -> Response | ResponseStream:
        """POST /v1/responses: input is a user message's text or a list of messages; previous_response_id
        continues a stored response (only the new turn's tokens are prefilled). With stream=True, a ResponseStream
        of events whose final_response is the response as it ended."""
        body = self._responses_body(input, model, stream, params)
        if stream:
            return ResponseStream(self._send("POST", "/v1/responses", body, timeout, stream=True))
        return self._json("POST", "/v1/responses", body, timeout, Response)

    def retrieve_response(self, response_id: str, *, cache_salt: str | None = None) -> Response:
        """GET /v1/responses/{id}: a stored response (NotFoundError, code state_not_found, when there is none
        for this model and tenant)."""
        path = f"/v1/responses/{quote_id(response_id)}"
        return self._json("GET", path, None, None, Response, params=salt_query(cache_salt))

    def delete_response(self, response_id: str, *, cache_salt: str | None = None) -> ResponseDeleted:
        """DELETE /v1/responses/{id}: the response and its state are gone (later turns from it: NotFoundError)."""
        path = f"/v1/responses/{quote_id(response_id)}"
        return self._json("DELETE", path, None, None, ResponseDeleted, params=salt_query(cache_salt))

    def fork_response(self, response_id: str, *, cache_salt: str | None = None) -> Response:
        """POST /v1/responses/{id}/fork: a new response id over an independent copy of the stored state."""
        body = {"cache_salt": cache_salt} if cache_salt is not None else None
        return self._json("POST", f"/v1/responses/{quote_id(response_id)}/fork", body, None, Response)

    def export_state(self, state_id: str, *, cache_salt: str | None = None) -> bytes:
        """GET /v1/states/{id}: the stored state as linrec's safetensors bytes (for import_state, here or on a
        server of the same model)."""
        path = f"/v1/states/{quote_id(state_id)}"
        return self._send("GET", path, None, None, params=salt_query(cache_salt)).content

    def import_state(self, data: bytes, *, state_id: str | None = None, cache_salt: str | None = None) -> State:
        """POST /v1/states: store exported bytes under state_id (default: a new resp_ id), continued with
        previous_response_id=state.id. BadRequestError for bytes that are no state of this server's model."""
        query = {**(salt_query(cache_salt) or {}), **({"id": state_id} if state_id is not None else {})}
        return self._json("POST", "/v1/states", None, None, State, params=query or None, content=bytes(data))

    def models(self) -> ModelList:
        return self._json("GET", "/v1/models", None, None, ModelList)

    def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        add_special_tokens: bool = True,
        add_generation_prompt: bool = True,
    ) -> TokenizeResult:
        """POST /tokenize: a prompt's token ids, or those of messages rendered by the chat template."""
        body = self._tokenize_body(prompt, messages, add_special_tokens, add_generation_prompt)
        return self._json("POST", "/tokenize", body, None, TokenizeResult)

    def detokenize(self, tokens: list[int]) -> DetokenizeResult:
        body: dict[str, Any] = {"tokens": tokens, **({"model": self.model} if self.model else {})}
        return self._json("POST", "/detokenize", body, None, DetokenizeResult)

    def health(self, timeout: Timeout = 5.0) -> bool:
        """True when the server answers /health with 200; False when it errs, drains or is unreachable."""
        try:
            return self._http.get("/health", timeout=timeout).status_code == 200
        except httpx.TransportError:
            return False

    def version(self) -> str:
        response = self._send("GET", "/version", None, None)
        return str(response.json()["version"])

    def load_lora_adapter(self, lora_name: str, lora_path: str) -> str:
        """POST /v1/load_lora_adapter: serve the adapter in the server's directory `lora_path` as the model
        `lora_name`; the server's text. BadRequestError for a name already loaded, a directory that is not a
        servable adapter, or a server started without --enable-lora."""
        body = {"lora_name": lora_name, "lora_path": lora_path}
        return self._send("POST", "/v1/load_lora_adapter", body, None).text

    def unload_lora_adapter(self, lora_name: str) -> str:
        """POST /v1/unload_lora_adapter: later requests naming `lora_name` get 404 (running ones finish on it);
        the server's text. NotFoundError for a name the server does not serve."""
        return self._send("POST", "/v1/unload_lora_adapter", {"lora_name": lora_name}, None).text

    # -- plumbing --------------------------------------------------------------------------------------

    def _json(self, method: str, path: str, body: Any, timeout: Timeout, cast: type[T], **extra: Any) -> T:
        return cast.model_validate(self._send(method, path, body, timeout, **extra).json())

    def _send(
        self,
        method: str,
        path: str,
        body: Any,
        timeout: Timeout,
        stream: bool = False,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        """The first successful response (a streamed one is left open for the caller), after retries. content:
        raw bytes sent instead of a JSON body."""
        request = self._http.build_request(
            method,
            path,
            json=body,
            content=content,
            params=params,
            headers={"Content-Type": "application/octet-stream"} if content is not None else None,
            timeout=timeout if timeout is not None else self.timeout,
        )
        attempt = 0
        while True:
            headers = None
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if not should_retry(attempt, self.retry, exc):
                    raise transport_error(exc) from exc
            else:
                if response.status_code < 400:
                    return response
                try:
                    response.read()
                finally:
                    response.close()
                error, headers = from_response(response), response.headers
                if not should_retry(attempt, self.retry, error):
                    raise error
            time.sleep(self.retry.delay(attempt, headers))
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient(BaseClient):
    """The async twin of Client (same arguments, same methods, awaited); `async with` or aclose()."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int | None = None,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        super().__init__(base_url, api_key, model, timeout, max_retries, retry, headers)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    # -- routes ----------------------------------------------------------------------------------------

    @overload
    async def completions(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        stream: Literal[False] = False,
        include_usage: bool = True,
        timeout: Timeout = None,
        **params: Unpack[CompletionParams],
    ) -> Completion: ...

    @overload
    async def completions(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        stream: Literal[True],
        include_usage: bool = True,
        timeout: Timeout = None,
        **params: Unpack[CompletionParams],
    ) -> AsyncStream[Completion]: ...

    async def completions(
        self,
        prompt: Prompt,
        *,
        model: str | None = None,
        stream: bool = False,
        include_usage: bool = True,
        timeout: Timeout = None,
        **params: Unpack[CompletionParams],
    ) -> Completion | AsyncStream[Completion]:
        body = self._generation_body("prompt", prompt, model, stream, include_usage, params)
        if stream:
            return AsyncStream(await self._send("POST", "/v1/completions", body, timeout, stream=True), Completion)
        return await self._json("POST", "/v1/completions", body, timeout, Completion)

    @overload
    async def chat_completions(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str | None = None,
        stream: Literal[False] = False,
        include_usage: bool = True,
        timeout: Timeout = None,
        **params: Unpack[ChatParams],
    ) -> ChatCompletion: ...

    @overload
    async def chat_completions(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str | None = None,
        stream: Literal[True],
        include_usage: bool = True,
        timeout: Timeout = None,
        **params: Unpack[ChatParams],
    ) -> AsyncStream[ChatCompletionChunk]: ...

    async def chat_completions(
        self,
        messages: list[dict[str, Any]],
        *,
        model: str | None = None,
        stream: bool = False,
        include_usage: bool = True,
        timeout: Timeout = None,
        **params: Unpack[ChatParams],
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        body = self._generation_body("messages", messages, model, stream, include_usage, params)
        if stream:
            response = await self._send("POST", "/v1/chat/completions", body, timeout, stream=True)
            return AsyncStream(response, ChatCompletionChunk)
        return await self._json("POST", "/v1/chat/completions", body, timeout, ChatCompletion)

    # -- the Responses API and stored states (docs/responses.md) ----------------------------------------------

    @overload
    async def responses(
        self,
        input: ResponseInput,
        *,
        model: str | None = None,
        stream: Literal[False] = False,
        timeout: Timeout = None,
        **params: Unpack[ResponseParams],
    ) -> Response: ...

    @overload
    async def responses(
        self,
        input: ResponseInput,
        *,
        model: str | None = None,
        stream: Literal[True],
        timeout: Timeout = None,
        **params: Unpack[ResponseParams],
    ) -> AsyncResponseStream: ...

    async def responses(
        self,
        input: ResponseInput,
        *,
        model: str | None = None,
        stream: bool = False,
        timeout: Timeout = None,
        **params: Unpack[ResponseParams],
    ) -> Response | AsyncResponseStream:
        """POST /v1/responses: input is a user message's text or a list of messages; previous_response_id
        continues a stored response (only the new turn's tokens are prefilled). With stream=True, a ResponseStream
        of events whose final_response is the response as it ended."""
        body = self._responses_body(input, model, stream, params)
        if stream:
            return AsyncResponseStream(await self._send("POST", "/v1/responses", body, timeout, stream=True))
        return await self._json("POST", "/v1/responses", body, timeout, Response)

    async def retrieve_response(self, response_id: str, *, cache_salt: str | None = None) -> Response:
        """GET /v1/responses/{id}: a stored response (NotFoundError, code state_not_found, when there is none
        for this model and tenant)."""
        path = f"/v1/responses/{quote_id(response_id)}"
        return await self._json("GET", path, None, None, Response, params=salt_query(cache_salt))

    async def delete_response(self, response_id: str, *, cache_salt: str | None = None) -> ResponseDeleted:
        """DELETE /v1/responses/{id}: the response and its state are gone (later turns from it: NotFoundError)."""
        path = f"/v1/responses/{quote_id(response_id)}"
        return await self._json("DELETE", path, None, None, ResponseDeleted, params=salt_query(cache_salt))

    async def fork_response(self, response_id: str, *, cache_salt: str | None = None) -> Response:
        """POST /v1/responses/{id}/fork: a new response id over an independent copy of the stored state."""
        body = {"cache_salt": cache_salt} if cache_salt is not None else None
        return await self._json("POST", f"/v1/responses/{quote_id(response_id)}/fork", body, None, Response)

    async def export_state(self, state_id: str, *, cache_salt: str | None = None) -> bytes:
        """GET /v1/states/{id}: the stored state as linrec's safetensors bytes (for import_state, here or on a
        server of the same model)."""
        path = f"/v1/states/{quote_id(state_id)}"
        return (await self._send("GET", path, None, None, params=salt_query(cache_salt))).content

    async def import_state(self, data: bytes, *, state_id: str | None = None, cache_salt: str | None = None) -> State:
        """POST /v1/states: store exported bytes under state_id (default: a new resp_ id), continued with
        previous_response_id=state.id. BadRequestError for bytes that are no state of this server's model."""
        query = {**(salt_query(cache_salt) or {}), **({"id": state_id} if state_id is not None else {})}
        return await self._json("POST", "/v1/states", None, None, State, params=query or None, content=bytes(data))

    async def models(self) -> ModelList:
        return await self._json("GET", "/v1/models", None, None, ModelList)

    async def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        add_special_tokens: bool = True,
        add_generation_prompt: bool = True,
    ) -> TokenizeResult:
        body = self._tokenize_body(prompt, messages, add_special_tokens, add_generation_prompt)
        return await self._json("POST", "/tokenize", body, None, TokenizeResult)

    async def detokenize(self, tokens: list[int]) -> DetokenizeResult:
        body: dict[str, Any] = {"tokens": tokens, **({"model": self.model} if self.model else {})}
        return await self._json("POST", "/detokenize", body, None, DetokenizeResult)

    async def health(self, timeout: Timeout = 5.0) -> bool:
        try:
            return (await self._http.get("/health", timeout=timeout)).status_code == 200
        except httpx.TransportError:
            return False

    async def version(self) -> str:
        response = await self._send("GET", "/version", None, None)
        return str(response.json()["version"])

    async def load_lora_adapter(self, lora_name: str, lora_path: str) -> str:
        body = {"lora_name": lora_name, "lora_path": lora_path}
        return (await self._send("POST", "/v1/load_lora_adapter", body, None)).text

    async def unload_lora_adapter(self, lora_name: str) -> str:
        return (await self._send("POST", "/v1/unload_lora_adapter", {"lora_name": lora_name}, None)).text

    # -- plumbing --------------------------------------------------------------------------------------

    async def _json(self, method: str, path: str, body: Any, timeout: Timeout, cast: type[T], **extra: Any) -> T:
        return cast.model_validate((await self._send(method, path, body, timeout, **extra)).json())

    async def _send(
        self,
        method: str,
        path: str,
        body: Any,
        timeout: Timeout,
        stream: bool = False,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        request = self._http.build_request(
            method,
            path,
            json=body,
            content=content,
            params=params,
            headers={"Content-Type": "application/octet-stream"} if content is not None else None,
            timeout=timeout if timeout is not None else self.timeout,
        )
        attempt = 0
        while True:
            headers = None
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if not should_retry(attempt, self.retry, exc):
                    raise transport_error(exc) from exc
            else:
                if response.status_code < 400:
                    return response
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                error, headers = from_response(response), response.headers
                if not should_retry(attempt, self.retry, error):
                    raise error
            await asyncio.sleep(self.retry.delay(attempt, headers))
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

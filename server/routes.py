"""Wiring: URL -> handler, error rendering, and the middleware every request passes through
(request id, drain refusal, API key, body size limit, in-flight count, HTTP metrics)."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import linrec
from linrec.engine.client import EngineDeadError
from linrec.server import protocol as p
from linrec.server.metrics import Metrics
from linrec.server.responses import ResponsesServing
from linrec.server.serving import APIError, ClientDisconnected, OpenAIServing

logger = logging.getLogger(__name__)
UNTRACKED_PATHS = ("/metrics",)  # scrapes neither count as in-flight work nor get refused while draining
# Everything else needs the API key when one is set (unknown paths too: no route probing without it). Probes
# and the API's description stay open; /metrics too unless metrics_require_api_key.
OPEN_PATHS = frozenset({"/health", "/version", "/openapi.json"})
FASTAPI_BODY_ERROR = "There was an error parsing the body"  # FastAPI's 400 when json.loads fails oddly


class ServerState:
    """What the middleware and the drain share; touched only on the event loop's thread."""

    def __init__(self) -> None:
        self.is_draining = False
        self.num_inflight = 0


# What each status means here, for the OpenAPI document (every error body is OpenAI's ErrorResponse).
_ERROR_MEANINGS = {
    400: "Invalid request: the message names the field (`param`) and what was expected",
    401: "Missing or wrong API key",
    404: "Unknown model, or no stored response under this id for this model and tenant (`state_not_found`)",
    413: "Request body over --max-request-body-bytes",
    429: "The engine's waiting queue is full; retry after Retry-After seconds",
    500: "The engine failed (never the client's input)",
    503: "Shutting down (draining)",
}


def _responses(
    *codes: int, ok: type | None = None, stream: bool = False, named_events: bool = False, **ok_content: Any
) -> dict[int | str, Any]:
    out: dict[int | str, Any] = {
        code: {"model": p.ErrorResponse, "description": _ERROR_MEANINGS[code]} for code in codes
    }
    if ok is not None:
        out[200] = {"model": ok, "description": "Success"}
        if stream:  # stream: true answers with server-sent events: `data: <chunk JSON>` lines, then `data: [DONE]`
            event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
            if named_events:  # the Responses API's: `event: <type>` and `data: <event JSON>`, no [DONE]
                event["properties"]["event"] = {"type": "string"}
                event["required"] = ["event", "data"]
            out[200]["content"] = {"text/event-stream": {"schema": event}}
    elif ok_content:
        out[200] = {"description": "Success", **ok_content}
    return out


_BODY_ERRORS = (400, 401, 404, 413, 503)  # every route that reads a JSON body
# A tenant, as in a request body's cache_salt: GET, DELETE and the state routes take it in the query.
SaltQuery = Annotated[
    str | None,
    Query(min_length=1, max_length=p.MAX_CACHE_SALT_CHARS, description="the tenant (cache_salt) it was stored under"),
]
_STATE_BYTES = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def build_router(serving: OpenAIServing) -> APIRouter:
    router = APIRouter()

    @router.get("/health", response_class=Response, responses=_responses(500, 503))
    async def health() -> Response:
        try:
            serving.llm.check_health()
        except EngineDeadError as exc:
            return APIError(500, str(exc), type="InternalServerError").response()
        return Response(status_code=200)

    # HEAD too (its own operation in the document): load balancers probe with it.
    router.add_api_route(
        "/health",
        health,
        methods=["HEAD"],
        response_class=Response,
        responses=_responses(500, 503),
        operation_id="health_head",
    )

    @router.get("/version")
    async def version() -> dict[str, str]:
        return {"version": linrec.__version__}

    @router.get(
        "/metrics",
        response_class=Response,
        responses=_responses(401, content={"text/plain": {"schema": {"type": "string"}}}),
    )
    async def metrics() -> Response:
        body, content_type = serving.metrics.render()
        return Response(body, media_type=content_type)

    @router.get("/v1/models", response_model=p.ModelList, responses=_responses(401, 503))
    async def models() -> dict[str, Any]:
        return serving.models()

    @router.post(
        "/v1/completions",
        response_model=None,
        responses=_responses(*_BODY_ERRORS, 429, 500, ok=p.CompletionResponse, stream=True),
    )
    async def completions(body: p.CompletionRequest, raw: Request) -> Response:
        return await serving.create_completion(body, raw, raw.state.request_id)

    @router.post(
        "/v1/chat/completions",
        response_model=None,
        responses=_responses(*_BODY_ERRORS, 429, 500, ok=p.ChatCompletionResponse, stream=True),
    )
    async def chat_completions(body: p.ChatCompletionRequest, raw: Request) -> Response:
        return await serving.create_chat_completion(body, raw, raw.state.request_id)

    responses = ResponsesServing(serving)

    @router.post(
        "/v1/responses",
        response_model=None,
        responses=_responses(*_BODY_ERRORS, 429, 500, ok=p.ResponseObject, stream=True, named_events=True),
    )
    async def create_response(body: p.ResponsesRequest, raw: Request) -> Response:
        return await responses.create(body, raw)

    @router.get(
        "/v1/responses/{response_id}",
        response_model=None,
        responses=_responses(400, 401, 404, 503, ok=p.ResponseObject),
    )
    async def retrieve_response(response_id: str, cache_salt: SaltQuery = None) -> Response:
        return await responses.retrieve(response_id, cache_salt)

    @router.delete(
        "/v1/responses/{response_id}",
        response_model=None,
        responses=_responses(400, 401, 404, 503, ok=p.ResponseDeleted),
    )
    async def delete_response(response_id: str, cache_salt: SaltQuery = None) -> Response:
        return await responses.delete(response_id, cache_salt)

    @router.post(
        "/v1/responses/{response_id}/fork",
        response_model=None,
        responses=_responses(*_BODY_ERRORS, 500, ok=p.ResponseObject),
    )
    async def fork_response(response_id: str, body: p.ForkRequest | None = None) -> Response:
        return await responses.fork(response_id, body.cache_salt if body is not None else None)

    @router.get(
        "/v1/states/{state_id}",
        response_class=Response,
        responses=_responses(400, 401, 404, 503, content=_STATE_BYTES),
    )
    async def export_state(state_id: str, cache_salt: SaltQuery = None) -> Response:
        return await responses.export_state(state_id, cache_salt)

    @router.post(
        "/v1/states",
        response_model=None,
        responses=_responses(400, 401, 413, 500, 503, ok=p.StateObject),
        openapi_extra={"requestBody": {"required": True, "content": _STATE_BYTES}},
    )
    async def import_state(
        raw: Request,
        id: Annotated[
            str | None, Query(pattern=p.STATE_ID_PATTERN, description="the id to keep it under (default: a new one)")
        ] = None,
        cache_salt: SaltQuery = None,
    ) -> Response:
        return await responses.import_state(raw, id, cache_salt)

    @router.post(
        "/v1/load_lora_adapter",
        response_model=None,
        responses=_responses(*_BODY_ERRORS, content={"text/plain": {"schema": {"type": "string"}}}),
    )
    async def load_lora_adapter(body: p.LoadLoRAAdapterRequest) -> Response:
        return await serving.load_lora_adapter(body)

    @router.post(
        "/v1/unload_lora_adapter",
        response_model=None,
        responses=_responses(*_BODY_ERRORS, content={"text/plain": {"schema": {"type": "string"}}}),
    )
    async def unload_lora_adapter(body: p.UnloadLoRAAdapterRequest) -> Response:
        return await serving.unload_lora_adapter(body)

    @router.post("/tokenize", response_model=None, responses=_responses(*_BODY_ERRORS, ok=p.TokenizeResponse))
    async def tokenize(body: p.TokenizeRequest) -> Response:
        return await serving.tokenize(body)

    @router.post("/detokenize", response_model=None, responses=_responses(*_BODY_ERRORS, ok=p.DetokenizeResponse))
    async def detokenize(body: p.DetokenizeRequest) -> Response:
        return await serving.detokenize(body)

    return router


def install_openapi(
    app: FastAPI, model_name: str, vocab_size: int, has_api_key: bool, is_metrics_protected: bool = False
) -> None:
    """FastAPI's document, less its 422 responses (this server answers validation errors with 400 in OpenAI's
    shape), with the one `model` this server serves and its token id range, and with the bearer scheme when
    an API key is set."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
                    if has_api_key and path not in OPEN_PATHS and (path != "/metrics" or is_metrics_protected):
                        operation["security"] = [{"bearer": []}]
            components = schema.setdefault("components", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.get("schemas", {}).pop(name, None)
            requests = ("CompletionRequest", "ChatCompletionRequest", "ResponsesRequest", "TokenizeRequest")
            for name in (*requests, "DetokenizeRequest"):
                model = components.get("schemas", {}).get(name, {}).get("properties", {}).get("model")
                if model is not None:  # any other name is a 404
                    model.clear()
                    model.update({"anyOf": [{"const": model_name}, {"type": "null"}], "title": "Model"})
            if has_api_key:
                components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            _bound_token_ids(schema, vocab_size)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        whole_body = [e for e in exc.errors() if tuple(e.get("loc", ())) == ("body",)]
        if whole_body and "json" not in content_type.lower():  # FastAPI parses JSON bodies only
            got = f"Content-Type: {content_type}" if content_type else "no Content-Type"
            return APIError(400, f"expected a JSON body with Content-Type: application/json, got {got}").response()
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if message == FASTAPI_BODY_ERROR and exc.__cause__ is not None:
            # Say why: not UTF-8, nested too deep, an integer of too many digits (the client's own input).
            cause = str(exc.__cause__).strip().splitlines()
            message = f"expected a JSON body: {cause[0] if cause else type(exc.__cause__).__name__}"
        return APIError(exc.status_code, message, type=kind, headers=exc.headers).response()  # 405: Allow

    @app.exception_handler(ClientDisconnected)
    async def disconnected(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("linrec: unhandled error in a request")
        return APIError(500, f"internal server error ({type(exc).__name__})", type="InternalServerError").response()


# Pydantic names the member of a union it tried in `loc` ('str', 'list[int]', 'constrained-str'): not a field.
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in _TYPE_NAMES or any(c in part for c in "[-("))


def _bound_token_ids(node: Any, vocab_size: int) -> None:
    if isinstance(node, dict):
        if node.pop(p.TOKEN_ID_MARKER, False):
            node["maximum"] = vocab_size - 1
        for value in node.values():
            _bound_token_ids(value, vocab_size)
    elif isinstance(node, list):
        for value in node:
            _bound_token_ids(value, vocab_size)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"expected a JSON body: {first.get('msg', 'malformed JSON')}")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    # A union value fails once per member; the member whose type matched says what is wrong with it
    # ("at most 64 items"), the others only that the type differs.
    same_field = [e for e in errors if [str(x) for x in e.get("loc", ()) if x != "body"][:1] == loc[:1]]
    specific = [e for e in same_field if not str(e.get("type", "")).endswith("_type")]
    if specific:
        first = specific[0]
        msg = first.get("msg", "invalid value")
    else:
        msg = " or ".join(dict.fromkeys(e.get("msg", "invalid value") for e in same_field))
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body" and not _is_union_tag(x)) or "body"
    return APIError(400, f"{where}: {msg}", param=param)


class ServerMiddleware:
    """Pure ASGI so that streaming bodies stay in flight until their last byte."""

    def __init__(
        self,
        app: ASGIApp,
        state: ServerState,
        metrics: Metrics,
        api_key: str | None,
        route_paths: frozenset[str],
        max_request_body_bytes: int,
        is_metrics_protected: bool = False,
    ):
        self.app = app
        self.state = state
        self.metrics = metrics
        self.api_key = api_key
        self.max_request_body_bytes = max_request_body_bytes
        self.open_paths = OPEN_PATHS if is_metrics_protected else OPEN_PATHS | {"/metrics"}
        # Requests refused here (401, 503) never reach the router, which sets scope["route"]; their
        # label is still the route's path. Anything else unrouted is "unmatched" (bounded label values).
        self.route_paths = route_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        start = time.monotonic()
        tracked = path not in UNTRACKED_PATHS
        try:
            if tracked and self.state.is_draining:
                error = APIError(503, "the server is shutting down", type="ServiceUnavailableError")
                await _send_response(error.response(), scope, receive, send_with_id)
            elif self.api_key is not None and path not in self.open_paths and not self._authorized(headers):
                error = APIError(401, "invalid or missing API key", type="AuthenticationError", code="invalid_api_key")
                await _send_response(error.response(), scope, receive, send_with_id)
            else:
                if tracked:
                    self.state.num_inflight += 1
                try:
                    try:
                        body = await self._bounded_body(headers, receive)
                    except _BodyTooLarge as exc:
                        error = APIError(
                            413,
                            f"expected a request body of at most {self.max_request_body_bytes} bytes "
                            f"(--max-request-body-bytes), got {exc.size}",
                            code="request_too_large",
                            headers={"Connection": "close"},  # stop the upload rather than read what we refuse
                        )
                        await _send_response(error.response(), scope, receive, send_with_id)
                    else:
                        await self.app(scope, body, send_with_id)
                finally:
                    if tracked:
                        self.state.num_inflight -= 1
        finally:
            route = scope.get("route")
            route_path = getattr(route, "path", None) or (path if path in self.route_paths else "unmatched")
            method = scope.get("method", "GET")
            self.metrics.http_requests.labels(method, route_path, str(status["code"])).inc()
            self.metrics.http_request_duration.labels(method, route_path).observe(time.monotonic() - start)

    async def _bounded_body(self, headers: dict[str, str], receive: Receive) -> Receive:
        """`receive` for the app; raises _BodyTooLarge before the app reads a byte over the limit. A declared
        Content-Length is checked before any byte is read (the HTTP server holds the client to it); a chunked
        body is read here, counted as it comes, and replayed, so that no more than the limit is buffered."""
        limit = self.max_request_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()) or int(declared) > limit:
                raise _BodyTooLarge(f"Content-Length: {declared}")
            return receive
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            return receive
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client went away: the app hears it too
                break
            size += len(message.get("body", b""))
            if size > limit:
                raise _BodyTooLarge(f"a chunked body of more than {limit} bytes")
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        return replay

    def _authorized(self, headers: dict[str, str]) -> bool:
        given = headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())


class _BodyTooLarge(Exception):
    def __init__(self, size: str):
        super().__init__(size)
        self.size = size


async def _send_response(response: Response, scope: Scope, receive: Receive, send: Send) -> None:
    await response(scope, receive, send)

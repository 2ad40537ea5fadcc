"""Wiring: URL -> handler, error rendering, and the middleware every request passes through
(request id, drain refusal, API key, in-flight count, HTTP metrics)."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import linrec
from linrec.engine.async_llm import EngineDeadError
from linrec.server import protocol as p
from linrec.server.metrics import Metrics
from linrec.server.serving import APIError, ClientDisconnected, OpenAIServing

logger = logging.getLogger(__name__)
UNTRACKED_PATHS = ("/metrics",)  # scrapes neither count as in-flight work nor get refused while draining


class ServerState:
    """What the middleware and the drain share; touched only on the event loop's thread."""

    def __init__(self) -> None:
        self.is_draining = False
        self.num_inflight = 0


def build_router(serving: OpenAIServing) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        try:
            serving.llm.check_health()
        except EngineDeadError as exc:
            return APIError(500, str(exc), type="InternalServerError").response()
        return Response(status_code=200)

    @router.get("/version")
    async def version() -> dict[str, str]:
        return {"version": linrec.__version__}

    @router.get("/metrics")
    async def metrics() -> Response:
        body, content_type = serving.metrics.render()
        return Response(body, media_type=content_type)

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return serving.models()

    @router.post("/v1/completions")
    async def completions(body: p.CompletionRequest, raw: Request):
        return await serving.create_completion(body, raw, raw.state.request_id)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, raw: Request):
        return await serving.create_chat_completion(body, raw, raw.state.request_id)

    @router.post("/tokenize")
    async def tokenize(body: p.TokenizeRequest) -> dict[str, Any]:
        return serving.tokenize(body)

    @router.post("/detokenize")
    async def detokenize(body: p.DetokenizeRequest) -> dict[str, Any]:
        return serving.detokenize(body)

    return router


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(ClientDisconnected)
    async def disconnected(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("linrec: unhandled error in a request")
        return APIError(500, f"internal server error ({type(exc).__name__})", type="InternalServerError").response()


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"expected a JSON body: {first.get('msg', 'malformed JSON')}")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    return APIError(400, f"{where}: {first.get('msg', 'invalid value')}", param=param)


class ServerMiddleware:
    """Pure ASGI so that streaming bodies stay in flight until their last byte."""

    def __init__(
        self, app: ASGIApp, state: ServerState, metrics: Metrics, api_key: str | None, route_paths: frozenset[str]
    ):
        self.app = app
        self.state = state
        self.metrics = metrics
        self.api_key = api_key
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
            elif self.api_key is not None and path.startswith("/v1") and not self._authorized(headers):
                error = APIError(401, "invalid or missing API key", type="AuthenticationError", code="invalid_api_key")
                await _send_response(error.response(), scope, receive, send_with_id)
            else:
                if tracked:
                    self.state.num_inflight += 1
                try:
                    await self.app(scope, receive, send_with_id)
                finally:
                    if tracked:
                        self.state.num_inflight -= 1
        finally:
            route = scope.get("route")
            route_path = getattr(route, "path", None) or (path if path in self.route_paths else "unmatched")
            method = scope.get("method", "GET")
            self.metrics.http_requests.labels(method, route_path, str(status["code"])).inc()
            self.metrics.http_request_duration.labels(method, route_path).observe(time.monotonic() - start)

    def _authorized(self, headers: dict[str, str]) -> bool:
        given = headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())


async def _send_response(response: Response, scope: Scope, receive: Receive, send: Send) -> None:
    await response(scope, receive, send)

"""Exceptions: the server's error object (message, type, param, code) and HTTP status, carried as attributes.

LinrecError
  APIConnectionError          the request got no HTTP response (refused, reset, DNS)
    APITimeoutError           a timeout expired (connect, read, write or pool)
  LinrecAPIError              the server answered with an error (status_code set) or sent one inside a stream
    BadRequestError           400
    AuthenticationError       401
    PermissionDeniedError     403
    NotFoundError             404
    UnprocessableEntityError  422
    RateLimitError            429 (the server's queue is full; retried by default, honouring Retry-After)
    InternalServerError       500 and other 5xx
    ServiceUnavailableError   503 (the server is draining; retried by default)
"""

from __future__ import annotations

import json
from typing import Any

import httpx


class LinrecError(Exception):
    """Base of every exception this package raises."""


class APIConnectionError(LinrecError):
    def __init__(self, message: str, request: httpx.Request | None = None):
        super().__init__(message)
        self.message = message
        self.request = request


class APITimeoutError(APIConnectionError):
    pass


class LinrecAPIError(LinrecError):
    """An error the server reported; `str(exc)` is the server's message with the status in front."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        body: Any = None,
        headers: httpx.Headers | None = None,
    ):
        where = f"HTTP {status_code}" if status_code is not None else "in the stream"
        super().__init__(f"{where}: {message}")
        self.message = message
        self.status_code = status_code  # None for an error event inside a stream (the stream itself began with 200)
        self.type = type
        self.param = param
        self.code = code
        self.body = body  # the decoded JSON body (or the raw text when it was not JSON)
        self.headers = headers if headers is not None else httpx.Headers()

    @property
    def request_id(self) -> str | None:
        return self.headers.get("x-request-id")


class BadRequestError(LinrecAPIError):
    pass


class AuthenticationError(LinrecAPIError):
    pass


class PermissionDeniedError(LinrecAPIError):
    pass


class NotFoundError(LinrecAPIError):
    pass


class UnprocessableEntityError(LinrecAPIError):
    pass


class RateLimitError(LinrecAPIError):
    pass


class InternalServerError(LinrecAPIError):
    pass


class ServiceUnavailableError(InternalServerError):
    pass


_BY_STATUS: dict[int, type[LinrecAPIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_class(status_code: int) -> type[LinrecAPIError]:
    if status_code in _BY_STATUS:
        return _BY_STATUS[status_code]
    return InternalServerError if status_code >= 500 else LinrecAPIError


def api_error(status_code: int | None, body: Any, headers: httpx.Headers | None = None) -> LinrecAPIError:
    """The exception for an error body: OpenAI's {"error": {...}} shape, or whatever else came."""
    info = body.get("error") if isinstance(body, dict) else None
    if isinstance(info, dict):
        message = str(info.get("message") or "no message")
        fields = {k: info.get(k) for k in ("type", "param", "code")}
        fields = {k: (None if v is None else str(v)) for k, v in fields.items()}
    else:
        message = body if isinstance(body, str) and body else f"unexpected error body {body!r}"
        fields = {}
    cls = LinrecAPIError if status_code is None else error_class(status_code)
    return cls(message, status_code=status_code, body=body, headers=headers, **fields)


def transport_error(exc: httpx.TransportError) -> APIConnectionError:
    """A timeout becomes APITimeoutError; any other failure to get (or finish reading) a response,
    APIConnectionError."""
    cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    try:
        request: httpx.Request | None = exc.request
    except RuntimeError:  # httpx raises when the error carries no request
        request = None
    return cls(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, request)


def from_response(response: httpx.Response) -> LinrecAPIError:
    """The exception for an HTTP error response whose body has been read."""
    try:
        body: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = response.text or response.reason_phrase
    return api_error(response.status_code, body, response.headers)

"""linrec-client: a small Python client for the linrec server (httpx + pydantic; no torch)."""

from linrec_client._base import VERSION as __version__
from linrec_client._base import RetryPolicy
from linrec_client.client import AsyncClient, Client
from linrec_client.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    LinrecAPIError,
    LinrecError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from linrec_client.streaming import AsyncStream, Stream
from linrec_client.types import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    DetokenizeResult,
    Model,
    ModelList,
    TokenizeResult,
    Usage,
)

__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Client",
    "Completion",
    "DetokenizeResult",
    "InternalServerError",
    "LinrecAPIError",
    "LinrecError",
    "Model",
    "ModelList",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RetryPolicy",
    "ServiceUnavailableError",
    "Stream",
    "TokenizeResult",
    "UnprocessableEntityError",
    "Usage",
    "__version__",
]

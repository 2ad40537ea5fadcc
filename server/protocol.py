"""OpenAI-compatible request and response schemas (the fields the official `openai` client sends and reads).

Requests ignore unknown fields, as OpenAI's server does for fields it has retired; ranges that OpenAI
documents are enforced here so that a bad value is a 400 before the engine sees it. Extras beyond
OpenAI's API (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids, cache_salt)
carry vLLM's names.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, model_serializer

from linrec.engine.sampling_params import MAX_LOGPROBS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS

# Bounds on what one request makes every engine step do (the engine's own limits where it has them), so that a
# refusal is a 400 naming the field and the limit before any work is done.
MAX_N = 128  # samples per prompt accepted at the schema level; the engine also caps n at its slot count
# logit_bias entries: each is a scatter into the request's logits row every step. vLLM sets no bound; 1024 is
# the stop_token_ids bound (the same per-step cost), and far above what biasing a few words or a class needs.
MAX_LOGIT_BIAS = 1024
MAX_CACHE_SALT_CHARS = 1024  # a tenant id or a hash; every prefix snapshot saved under the salt holds it
MAX_LAYERS = 1024  # a layer route's length bound before the engine checks it against the model

# Requests: unknown fields ignored (OpenAI's retired ones), types strict as documented: "16" is no integer and
# 0 no boolean (OpenAI refuses both; the lax default let the document and the server disagree).
REQUEST_CONFIG = ConfigDict(extra="ignore", strict=True)


def _integral(value: Any) -> Any:
    # JSON Schema's integer includes 16.0 (JSON has one number type); strict mode alone would refuse it.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Request integers: JSON integers, 16.0 included; never "16". Constraints go before it in Annotated (after
# a validator, pydantic leaves them out of the JSON schema).
INTEGRAL = BeforeValidator(_integral)
Int = Annotated[int, INTEGRAL]


def _layer_route(value: Any) -> Any:
    """One message for every malformed layer_route (a union's per-branch errors would name only one branch)."""
    if value is None or value == "auto":
        return value
    counts = [_integral(v) for v in value] if isinstance(value, list) else None
    if not counts or len(counts) > MAX_LAYERS or any(type(c) is not int or c not in (0, 1, 2) for c in counts):
        shown = json.dumps(value)[:80] if isinstance(value, (list, str, int, float)) else type(value).__name__
        raise ValueError(f"expected 'auto' or a list of up to {MAX_LAYERS} counts 0, 1 or 2, got {shown}")
    return counts


# linrec's layer_route: one count per layer (0 skip, 1 execute, 2 repeat), or "auto" (docs/routing.md).
LayerRoute = Annotated[Literal["auto"] | list[int], BeforeValidator(_layer_route)]
# OpenAI's roles; whether a model takes one is its chat template's business (it may refuse with a 400).
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]

# Prompts per completions request: each is an engine request that every scheduler step considers. 2048 is
# half the engine's default waiting queue (--max-waiting-requests 4096): one request cannot fill it alone.
MAX_PROMPTS = 2048

StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]


def _prompt_kind(value: Any) -> str | None:
    """Which form a prompt takes, from its first element, so that only that form is validated: trying every
    member of the union validated (and collected an error for) every element of a million-token list
    several times over, seconds on the event loop. The tags read as types: error locations drop them."""
    if isinstance(value, str):
        return "str"
    if not isinstance(value, list):
        return None
    first = value[0] if value else 0
    if isinstance(first, str):
        return "list[str]"
    return "list[list[int]]" if isinstance(first, list) else "list[int]"


# A token id; the served OpenAPI document gets this server's vocabulary size as its maximum (the marker).
TOKEN_ID_MARKER = "x-linrec-token-id"
TokenId = Annotated[int, Field(ge=0, json_schema_extra={TOKEN_ID_MARKER: True}), INTEGRAL]
# fail_fast: the first bad element ends validation (a list of a million bad ids is one error, not a million).
TokenIds = Annotated[list[TokenId], Field(fail_fast=True)]
NonEmptyTokenIds = Annotated[list[TokenId], Field(min_length=1, fail_fast=True)]
Prompt = Annotated[
    Annotated[str, Tag("str")]
    | Annotated[list[str], Tag("list[str]"), Field(min_length=1, max_length=MAX_PROMPTS, fail_fast=True)]
    | Annotated[NonEmptyTokenIds, Tag("list[int]")]
    | Annotated[
        list[NonEmptyTokenIds], Tag("list[list[int]]"), Field(min_length=1, max_length=MAX_PROMPTS, fail_fast=True)
    ],
    Discriminator(
        _prompt_kind,
        custom_error_type="prompt_type",
        custom_error_message="expected a string, a list of strings, a list of token ids or a list of such lists",
    ),
]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG

    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = REQUEST_CONFIG

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N), INTEGRAL] = 1
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: (
        Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=MAX_LOGIT_BIAS)] | None
    ) = None
    seed: Int | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extras (vLLM's names).
    top_k: Annotated[int, Field(ge=-1), INTEGRAL] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    min_tokens: Annotated[int, Field(ge=0), INTEGRAL] = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    skip_special_tokens: bool = True
    # vLLM's name: prefix-cache states are shared only between requests with the same salt (tenant isolation).
    cache_salt: Annotated[str, Field(min_length=1, max_length=MAX_CACHE_SALT_CHARS)] | None = None
    # linrec's: one count per layer (0 skip, 1 execute, 2 repeat), or "auto" for the model's routers to decide
    # (docs/routing.md); with "auto", the bias added to every router's skip logit.
    layer_route: LayerRoute | None = None
    layer_route_skip_bias: Annotated[float, Field(ge=-100.0, le=100.0)] = 0.0


class CompletionRequest(_SamplingRequest):
    prompt: Prompt
    max_tokens: Int | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Int | None = None


class ContentPart(BaseModel):
    model_config = REQUEST_CONFIG

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = REQUEST_CONFIG

    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Int | None = None  # deprecated by OpenAI in favour of max_completion_tokens; both work
    max_completion_tokens: Int | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = None
    add_generation_prompt: bool = True


class TokenizeRequest(BaseModel):
    model_config = REQUEST_CONFIG

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = REQUEST_CONFIG

    model: str | None = None
    tokens: TokenIds


# -- responses -------------------------------------------------------------------------------------


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # With a layer_route (linrec's): the route each choice ran, and its layer passes per token summed over the
    # choices. Left out of the JSON for requests without one.
    layer_routes: list[list[int]] | None = None
    layers_executed: int | None = None

    @model_serializer(mode="wrap")
    def _without_unrouted(self, handler):
        data = handler(self)
        if self.layer_routes is None:
            data.pop("layer_routes", None)
            data.pop("layers_executed", None)
        return data


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "linrec"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field); None for the base model itself
    adapter_type: str | None = None  # "lora" | "shira" | "sparse_delta" for an adapter; None for the base model
    max_model_len: int | None = None


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's /v1/load_lora_adapter body: a name for requests' `model` and a local adapter directory."""

    model_config = REQUEST_CONFIG

    lora_name: Annotated[str, Field(min_length=1, max_length=256)]
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = REQUEST_CONFIG

    lora_name: Annotated[str, Field(min_length=1, max_length=256)]
    lora_int_id: int | None = None  # vLLM accepts it; linrec keys adapters by name


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict; None fields stay (OpenAI sends explicit nulls, e.g. logprobs: null)."""
    return model.model_dump(mode="json")


# -- /v1/responses (OpenAI's Responses API over linrec's stored states; docs/responses.md) -----------------

MAX_METADATA_KEYS = 16  # OpenAI's bounds on `metadata`: 16 pairs, keys of 64 and values of 512 characters
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
# A stored response's id (the engine's state id): ours are resp_<32 hex>; an import may name its own, in
# characters that are safe in a URL path and a file name (the disk tier keeps one file per state).
STATE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
StateId = Annotated[str, Field(pattern=STATE_ID_PATTERN)]
Metadata = Annotated[
    dict[
        Annotated[str, Field(max_length=MAX_METADATA_KEY_CHARS)],
        Annotated[str, Field(max_length=MAX_METADATA_VALUE_CHARS)],
    ],
    Field(max_length=MAX_METADATA_KEYS),
]


class ResponseInputText(BaseModel):
    """A text part of an input message; `output_text` is what an assistant message of an earlier output holds
    (OpenAI takes its output items back as input)."""

    model_config = REQUEST_CONFIG

    type: Literal["input_text", "output_text"]
    text: str


class ResponseInputMessage(BaseModel):
    """One message of `input` (OpenAI's EasyInputMessage; an output message item passed back fits it too)."""

    model_config = REQUEST_CONFIG

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ResponseInputText]


class ResponseTextFormat(BaseModel):
    model_config = REQUEST_CONFIG

    type: Literal["text"] = "text"  # linrec generates plain text only (no json_schema / json_object)


class ResponseTextConfig(BaseModel):
    model_config = REQUEST_CONFIG

    format: ResponseTextFormat | None = None


class ResponsesRequest(_SamplingRequest):
    """POST /v1/responses. OpenAI's fields that linrec serves, with the extras of /v1/chat/completions (vLLM's
    sampling names, cache_salt, layer_route); fields for tools, reasoning or background runs are refused by the
    handler rather than silently ignored."""

    input: str | Annotated[list[ResponseInputMessage], Field(min_length=1)]
    instructions: str | None = None
    previous_response_id: StateId | None = None
    store: bool = True  # OpenAI's default: the response (and here its end state) is kept for later turns
    max_output_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    metadata: Metadata | None = None
    # The Responses API has one output per request (and a stored state needs exactly one).
    n: Annotated[int, Field(ge=1, le=1), INTEGRAL] = 1
    # OpenAI's fields that linrec accepts only in their default form (the handler says so in a 400).
    text: ResponseTextConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    background: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), INTEGRAL] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    reasoning: dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None


class ResponseOutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ResponseOutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[ResponseOutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0  # conversation tokens not prefilled: loaded from the stored state or a prefix snapshot
    cache_write_tokens: int = 0  # OpenAI's (tokens written to its prompt cache); linrec's cache has no such charge


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int = 0  # the whole conversation the engine ran: every earlier turn's tokens plus this input's
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int = 0
    # As UsageInfo's: with a layer_route in the request, the route the output ran and its layer passes per token.
    layer_routes: list[list[int]] | None = None
    layers_executed: int | None = None

    @model_serializer(mode="wrap")
    def _without_unrouted(self, handler):
        data = handler(self)
        if self.layer_routes is None:
            data.pop("layer_routes", None)
            data.pop("layers_executed", None)
        return data


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """OpenAI's Response object: what POST answers, what GET returns of a stored one, and what a stream's
    response.* events carry. Fields linrec has no use for keep OpenAI's defaults (no tools, no reasoning)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    model: str
    output: list[ResponseOutputMessage] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = True
    temperature: float = 1.0
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str = "auto"
    tools: list[Any] = Field(default_factory=list)
    top_p: float = 1.0
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    background: bool = False


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class ForkRequest(BaseModel):
    """POST /v1/responses/{id}/fork's optional body: the tenant the stored response belongs to."""

    model_config = REQUEST_CONFIG

    cache_salt: Annotated[str, Field(min_length=1, max_length=MAX_CACHE_SALT_CHARS)] | None = None


class StateObject(BaseModel):
    """What linrec keeps of a stored response (POST /v1/states answers it for an import)."""

    id: str
    object: Literal["state"] = "state"
    model: str
    num_tokens: int  # the conversation so far: every turn's input and output tokens
    num_bytes: int
    created_at: int

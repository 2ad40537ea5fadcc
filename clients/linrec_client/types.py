"""Typed responses of the linrec server (OpenAI's shapes plus linrec's `stop_reason` and tokenizer routes).

Every model keeps fields it does not know (extra="allow"), so a newer server never breaks an older client.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # With a layer_route in the request: the route each choice ran, and its layer passes per token summed over
    # the choices; None otherwise.
    layer_routes: list[list[int]] | None = None
    layers_executed: int | None = None


# -- /v1/completions ---------------------------------------------------------------------------------


class CompletionLogprobs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None  # stop, length or abort; None on stream chunks before the last
    stop_reason: int | str | None = None  # the stop string or token id that ended the sample


class Completion(_Response):
    """A whole completion, and also each chunk of a streamed one (OpenAI uses one object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None  # streams: only on the last chunk, with include_usage


# -- /v1/chat/completions ----------------------------------------------------------------------------


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ChatMessage(_Response):
    role: str = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(_Response):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChoiceDelta(_Response):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# -- models and tokenizer routes ---------------------------------------------------------------------


class Model(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = ""
    root: str | None = None  # the model's directory; a LoRA adapter's own directory
    parent: str | None = None  # a LoRA adapter's base model; None for the base model itself
    adapter_type: str | None = None  # "lora" | "shira" | "sparse_delta" for an adapter; None for the base model
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[Model]


class TokenizeResult(_Response):
    tokens: list[int]
    count: int
    max_model_len: int | None = None


class DetokenizeResult(_Response):
    prompt: str


ChatMessageParam = dict[str, Any]  # {"role": ..., "content": ...}, as the openai client takes them


# -- /v1/responses (OpenAI's Responses API; docs/responses.md) and linrec's state API -----------------------------


class ResponseOutputText(_Response):
    type: str = "output_text"
    text: str = ""
    annotations: list[Any] = Field(default_factory=list)


class ResponseOutputMessage(_Response):
    id: str
    type: str = "message"
    role: str = "assistant"
    status: str | None = None  # in_progress, completed or incomplete
    content: list[ResponseOutputText] = Field(default_factory=list)


class ResponseInputTokensDetails(_Response):
    cached_tokens: int = 0  # conversation tokens the server did not prefill (its stored state had them)


class ResponseUsage(_Response):
    input_tokens: int = 0  # the whole conversation the server ran: every earlier turn and this input
    input_tokens_details: ResponseInputTokensDetails = Field(default_factory=ResponseInputTokensDetails)
    output_tokens: int = 0
    total_tokens: int = 0
    # With a layer_route in the request: the route the output ran, and its layer passes per token.
    layer_routes: list[list[int]] | None = None
    layers_executed: int | None = None


class IncompleteDetails(_Response):
    reason: str | None = None  # "max_output_tokens"


class ResponseError(_Response):
    code: str | None = None
    message: str = ""


class Response(_Response):
    """A response object: what responses() returns, what retrieve_response() reads back of a stored one."""

    id: str
    object: Literal["response"] = "response"
    created_at: float
    status: str | None = None  # in_progress, completed, incomplete (max_output_tokens ended it) or failed
    model: str
    output: list[ResponseOutputMessage] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: ResponseError | None = None
    instructions: str | None = None
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    store: bool | None = None
    completed_at: float | None = None

    @property
    def output_text(self) -> str:
        """Every output_text part of every message, joined (as the openai client's property)."""
        return "".join(part.text for item in self.output for part in item.content if part.type == "output_text")


class ResponseDeleted(_Response):
    id: str
    object: Literal["response"] = "response"
    deleted: bool


class State(_Response):
    """A stored state as POST /v1/states reports an import."""

    id: str
    object: Literal["state"] = "state"
    model: str
    num_tokens: int  # the conversation so far: every turn's input and output tokens
    num_bytes: int
    created_at: float


class ResponseEvent(_Response):
    """One event of a streamed response; its `type` says which class below it is (unknown types stay this)."""

    type: str
    sequence_number: int


class ResponseLifecycleEvent(ResponseEvent):
    """response.created, .in_progress, .completed, .incomplete and .failed: the response object as it stands."""

    response: Response


class ResponseOutputItemEvent(ResponseEvent):
    """response.output_item.added and .done."""

    output_index: int
    item: ResponseOutputMessage


class ResponseContentPartEvent(ResponseEvent):
    """response.content_part.added and .done."""

    item_id: str
    output_index: int
    content_index: int
    part: ResponseOutputText


class ResponseTextDeltaEvent(ResponseEvent):
    """response.output_text.delta: new text."""

    item_id: str
    output_index: int
    content_index: int
    delta: str


class ResponseTextDoneEvent(ResponseEvent):
    """response.output_text.done: the whole text."""

    item_id: str
    output_index: int
    content_index: int
    text: str


class ResponseErrorEvent(ResponseEvent):
    """`error`: the server failed the response after the stream began."""

    message: str
    code: str | None = None
    param: str | None = None


RESPONSE_EVENTS: dict[str, type[ResponseEvent]] = {
    "response.created": ResponseLifecycleEvent,
    "response.in_progress": ResponseLifecycleEvent,
    "response.completed": ResponseLifecycleEvent,
    "response.incomplete": ResponseLifecycleEvent,
    "response.failed": ResponseLifecycleEvent,
    "response.output_item.added": ResponseOutputItemEvent,
    "response.output_item.done": ResponseOutputItemEvent,
    "response.content_part.added": ResponseContentPartEvent,
    "response.content_part.done": ResponseContentPartEvent,
    "response.output_text.delta": ResponseTextDeltaEvent,
    "response.output_text.done": ResponseTextDoneEvent,
    "error": ResponseErrorEvent,
}
# The events that end a stream: the response as it ended.
FINAL_RESPONSE_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})

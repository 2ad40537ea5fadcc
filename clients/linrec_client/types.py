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

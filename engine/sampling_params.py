"""SamplingParams: what a request asks of the sampler and the stop checks (vLLM's field names)."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Per-request limits: each bounds work the engine thread does for one request, every step, on behalf of
# everyone else's latency. The HTTP schema states the same numbers (server/protocol.py imports these).
MAX_STOP_STRINGS = 64  # stop strings per request (OpenAI allows 4; clients of vLLM send a few dozen)
MAX_STOP_STRING_CHARS = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024  # stop_token_ids per request
MAX_LOGPROBS = 20  # top logprobs per token (OpenAI's top_logprobs limit, vLLM's default max_logprobs)


class InvalidRequestError(ValueError):
    """A request the engine refuses (HTTP 400); `param` names the offending field when one does, `code` is
    OpenAI's error code where one applies (context_length_exceeded)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # samples per prompt; they fork from one prefill by copying the slot
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept, (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 keeps all
    min_p: float = 0.0  # drop tokens below min_p * p(most likely)
    presence_penalty: float = 0.0  # OpenAI: subtract once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL-style: divide positive / multiply negative logits of seen tokens
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    seed: int | None = None  # per-request generator: same output whatever else is in the batch
    max_tokens: int = 16  # generated tokens at most
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens exist
    stop: tuple[str, ...] = ()  # stop strings, matched across token boundaries; not part of the output
    stop_token_ids: tuple[int, ...] = ()  # extra tokens that end the request (kept in token_ids)
    ignore_eos: bool = False  # keep generating past EOS
    logprobs: int | None = None  # None: no logprobs; k >= 0: the sampled token's plus the top k
    skip_special_tokens: bool = True  # drop special tokens from the text

    def __post_init__(self) -> None:
        # Normalise list inputs so that the dataclass stays hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        # NaN passes every range check below (each comparison is False), so finiteness comes first.
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidRequestError(f"expected a finite {name}, got {getattr(self, name)}", name)
        if any(not math.isfinite(v) for v in (self.logit_bias or {}).values()):
            raise InvalidRequestError("expected finite logit_bias values", "logit_bias")
        if self.n < 1:
            raise InvalidRequestError(f"expected n >= 1, got {self.n}", "n")
        if self.temperature < 0:
            raise InvalidRequestError(f"expected temperature >= 0, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"expected 0 < top_p <= 1, got {self.top_p}", "top_p")
        if self.top_k < -1:
            raise InvalidRequestError(f"expected top_k >= -1 (0 or -1 disable it), got {self.top_k}", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"expected 0 <= min_p <= 1, got {self.min_p}", "min_p")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise InvalidRequestError(
                f"expected -2 <= presence_penalty <= 2, got {self.presence_penalty}", "presence_penalty"
            )
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise InvalidRequestError(
                f"expected -2 <= frequency_penalty <= 2, got {self.frequency_penalty}", "frequency_penalty"
            )
        if self.repetition_penalty <= 0:
            raise InvalidRequestError(
                f"expected repetition_penalty > 0, got {self.repetition_penalty}", "repetition_penalty"
            )
        if self.max_tokens < 1:
            raise InvalidRequestError(f"expected max_tokens >= 1, got {self.max_tokens}", "max_tokens")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"expected 0 <= min_tokens <= max_tokens={self.max_tokens}, got {self.min_tokens}", "min_tokens"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(
                f"expected logprobs in [0, {MAX_LOGPROBS}] or None, got {self.logprobs}", "logprobs"
            )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"expected at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}", "stop")
        if any(not s for s in self.stop):
            raise InvalidRequestError("expected non-empty stop strings, got an empty one", "stop")
        longest = max(map(len, self.stop), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise InvalidRequestError(
                f"expected stop strings of at most {MAX_STOP_STRING_CHARS} characters, got one of {longest}", "stop"
            )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(
                f"expected at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(self.stop_token_ids)}",
                "stop_token_ids",
            )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

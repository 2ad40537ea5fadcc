"""Incremental detokenizer: one request's new tokens -> the text that is safe to stream, with stop strings.

Two things make a token's text unsafe to show at once. A byte-level token can end inside a UTF-8
character: its decode ends in U+FFFD until the next tokens complete it. And text can be the start of a
stop string: shown now, it could not be taken back when the rest of the stop string arrives. So each
`append` decodes a short window of tokens (vLLM's prefix_offset / read_offset scheme: a few tokens of
context, so that decoders which drop or add a leading space see the same neighbours as in a full
decode), holds back an incomplete character, then holds back the longest tail that could still become
a stop string, and returns the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Prompt tokens kept as decoding context for the first output tokens (vLLM keeps 5 too).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(Protocol):
    """What is needed of a tokenizer: transformers' `decode` (fast or slow tokenizers both have it)."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ..., **kwargs) -> str: ...


class IncrementalDetokenizer:
    """Streams one request's output text; `append` each new token, `flush` when it ends for another reason.

    `text` is everything returned so far (the concatenation of the deltas). When a stop string
    completes, `stop_reason` is set, the text ends before it (after it with include_stop_str_in_output)
    and later calls return "". With several stop strings, the one that completes first in the text
    wins (ties: the longer), which is what reading the text one character at a time would find, so the
    result does not depend on how the text was cut into tokens.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        if any(not s for s in stop):
            raise ValueError(f"expected non-empty stop strings, got {list(stop)}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self._include_stop_str_in_output = include_stop_str_in_output
        # Only the tokens from _prefix_offset on are kept: older ones never change the text again.
        self._token_ids: list[int] = [int(t) for t in prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]]
        self._prefix_offset = 0  # start of the decoding window (context tokens already shown or in the prompt)
        self._read_offset = len(self._token_ids)  # tokens before this one have had their text taken
        self._pending = ""  # decoded text not yet returned: a tail that may be the start of a stop string
        self._text = ""
        self._stop_reason: str | None = None
        self._is_finished = False

    @property
    def text(self) -> str:
        """The output text returned so far."""
        return self._text

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the text, or None."""
        return self._stop_reason

    @property
    def is_finished(self) -> bool:
        """A stop string matched or `flush` was called: nothing more will be returned."""
        return self._is_finished

    def append(self, token_id: int) -> str:
        """Add one generated token; return the new text that is safe to show (often "")."""
        if self._is_finished:
            return ""
        self._token_ids.append(int(token_id))
        return self._emit(self._decode_new(force=False), is_last=False)

    def flush(self) -> str:
        """End of the request: return whatever was held back (an incomplete character decodes to U+FFFD).

        A stop string can still complete here (the held text may finish one), so check `stop_reason`.
        """
        if self._is_finished:
            return ""
        return self._emit(self._decode_new(force=True), is_last=True)

    def _decode(self, token_ids: list[int]) -> str:
        # No clean-up: it rewrites spaces around punctuation, depending on neighbours the window may not hold.
        return self._tokenizer.decode(
            token_ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _decode_new(self, force: bool) -> str:
        """Text of the tokens after _read_offset, or "" while it ends inside a character (unless forced)."""
        if self._read_offset == len(self._token_ids):
            return ""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._token_ids[self._prefix_offset :])
        # A shorter or equal text: the new tokens decode to nothing yet (special tokens skipped, pieces
        # a decoder joins later). A trailing U+FFFD: a character split across tokens, wait for the rest.
        if len(full_text) <= len(prefix_text) or (full_text.endswith(_REPLACEMENT_CHAR) and not force):
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        del self._token_ids[: self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        return delta

    def _emit(self, new_text: str, is_last: bool) -> str:
        """Add decoded text; return what can be shown now, cutting at a completed stop string."""
        pending = self._pending + new_text
        if self._stop:
            match = _first_stop(pending, self._stop)
            if match is not None:
                start, stop = match
                end = start + len(stop) if self._include_stop_str_in_output else start
                self._stop_reason = stop
                self._is_finished = True
                self._pending = ""
                return self._take(pending[:end])
        hold = 0 if is_last else _longest_stop_prefix_suffix(pending, self._stop)
        self._pending = pending[len(pending) - hold :]
        if is_last:
            self._is_finished = True
        return self._take(pending[: len(pending) - hold])

    def _take(self, delta: str) -> str:
        self._text += delta
        return delta


def _first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(start, stop) of the stop string that ends first in `text` (ties: the longer one), or None."""
    best = None
    for stop in stops:
        start = text.find(stop)
        if start >= 0:
            key = (start + len(stop), -len(stop))
            if best is None or key < best[0]:
                best = (key, start, stop)
    return None if best is None else (best[1], best[2])


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string (0 if none)."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest

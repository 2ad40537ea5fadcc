"""Incremental detokenizer: one request's new tokens -> the text that is safe to stream, with stop strings.

Two things make a token's text unsafe to show at once. A byte-level token can end inside a UTF-8
character: its decode ends in U+FFFD until the next tokens complete it. And text can be the start of a
stop string: shown now, it could not be taken back when the rest of the stop string arrives. So each
`append` decodes a short window of tokens (vLLM's prefix_offset / read_offset scheme: a few tokens of
context, so that decoders which drop or add a leading space see the same neighbours as in a full
decode), holds back an incomplete character, then holds back the longest tail that could still become
a stop string, and returns the rest.

Stop strings are matched by a cursor on an Aho-Corasick automaton (engine/stop_strings.py) that reads
each new character once: the work per token does not grow with the number or length of the stop
strings, nor with the held text. The automaton can be built once and shared by the n samples of a
request (`stop_matcher=`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol

from linrec.engine.stop_strings import StopMatcher, StopStringMatcher

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

    Stop strings come either as `stop` (an automaton is built for this detokenizer) or as a prebuilt
    `stop_matcher` (shared by several detokenizers; `NaiveStopStringMatcher` gives the old algorithm,
    which the tests and the benchmark compare against).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        stop_matcher: StopMatcher | None = None,
    ) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        if stop and stop_matcher is not None:
            raise ValueError(
                f"expected stop strings or a prebuilt stop_matcher, not both; got stop={list(stop)} and a matcher "
                f"for {len(stop_matcher.stops)} stop strings"
            )
        if stop:
            stop_matcher = StopStringMatcher(stop)  # checks that they are non-empty
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop_matcher = stop_matcher
        # The automaton state after all the text decoded so far; None without stop strings.
        self._stop_cursor = stop_matcher.cursor() if stop_matcher is not None and stop_matcher.stops else None
        self._include_stop_str_in_output = include_stop_str_in_output
        # Only the tokens from _prefix_offset on are kept: older ones never change the text again.
        self._token_ids: list[int] = [int(t) for t in prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]]
        self._prefix_offset = 0  # start of the decoding window (context tokens already shown or in the prompt)
        self._read_offset = len(self._token_ids)  # tokens before this one have had their text taken
        # Decoded text not yet returned (a tail that may be the start of a stop string), as the pieces it
        # arrived in, so that returning part of it copies only the piece it is cut in, never the whole.
        # Invariant: its length is the cursor's num_held_chars, or 0 without stop strings.
        self._held_pieces: deque[str] = deque()
        self._num_held_chars = 0
        self._text = ""
        self._stop_reason: str | None = None
        self._is_finished = False

    @property
    def text(self) -> str:
        """The output text returned so far."""
        return self._text

    @property
    def stop_matcher(self) -> StopMatcher | None:
        """The matcher of this detokenizer's stop strings (possibly shared with other detokenizers), or None."""
        return self._stop_matcher

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
        if new_text:
            self._held_pieces.append(new_text)
            self._num_held_chars += len(new_text)
        num_held = 0
        if self._stop_cursor is not None:
            # Only the new characters are read: the cursor remembers the rest as its automaton state.
            match = self._stop_cursor.feed(new_text)
            if match is not None:
                # The held text ends with new_text, and the stop string starts inside the held text (its
                # part before new_text was a tail that was a prefix of it, so it was held back).
                end = self._num_held_chars - len(new_text) + match.end
                self._stop_reason = match.stop
                self._is_finished = True
                delta = self._release(end if self._include_stop_str_in_output else end - len(match.stop))
                self._held_pieces.clear()
                self._num_held_chars = 0
                return self._take(delta)
            num_held = 0 if is_last else self._stop_cursor.num_held_chars
        if is_last:
            self._is_finished = True
        return self._take(self._release(self._num_held_chars - num_held))

    def _release(self, num_chars: int) -> str:
        """Remove and return the first `num_chars` characters of the held text."""
        released = []
        while num_chars > 0:
            piece = self._held_pieces[0]
            if len(piece) <= num_chars:
                released.append(self._held_pieces.popleft())
            else:
                released.append(piece[:num_chars])
                self._held_pieces[0] = piece[num_chars:]
            num_taken = len(released[-1])
            num_chars -= num_taken
            self._num_held_chars -= num_taken
        return "".join(released)

    def _take(self, delta: str) -> str:
        self._text += delta
        return delta

"""IncrementalDetokenizer against full decodes, tokenizers' own DecodeStream, and a character-by-character
stop-string reference, on tokenizers built in the test (no downloads)."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from linrec.engine import output as output_module
from linrec.engine.detokenizer import IncrementalDetokenizer
from linrec.engine.output import OutputProcessor
from linrec.engine.request import Request
from linrec.engine.sampling_params import SamplingParams
from linrec.engine.scheduler import RequestUpdate
from linrec.engine.stop_strings import (
    NaiveStopStringMatcher,
    StopStringMatcher,
    naive_first_stop,
    naive_longest_stop_prefix_suffix,
)

SPECIALS = ["<s>", "</s>", "<|im_end|>"]
PIECES = [
    "hello", " world", "héllo", "naïve", "日本語", "中文", "한국어", "Ελληνικά", " русский", "עברית", "مرحبا",
    "🙂", "👍🏽", "👨‍👩‍👧", "🇫🇷", "\n", " ", "  ", "\t", "ß", "€", "𝔘", "STOP", "ST", "OP", "a", "b", ".",
]  # fmt: skip
CORPUS = [
    "hello world, the naïve cat sat on the mat.",
    "日本語のテキストと中文的文本 and 한국어 텍스트 🙂 👍🏽",
    "Ελληνικά κείμενα, русский текст, עברית, مرحبا بالعالم",
    "STOP here. Stop there. The end 👨‍👩‍👧 🇫🇷 € ß 𝔘",
    "the quick brown fox jumps over the lazy dog\n\tagain and again",
]


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (ids 0..255 are the bytes), plus specials: every character > 1 byte is split."""
    byte_to_char = bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={byte_to_char[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _trained_bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on CORPUS: merges cover whole words and parts of multi-byte characters."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _metaspace_bpe() -> PreTrainedTokenizerFast:
    """SentencePiece-style (▁ for spaces): a decode drops the leading space of its first token."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", *SPECIALS])
    tok.train_from_iterator([CORPUS[0], CORPUS[4]] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizers_by_name() -> dict[str, PreTrainedTokenizerFast]:
    return {"bytes": _byte_tokenizer(), "bpe": _trained_bpe(), "metaspace": _metaspace_bpe()}


def _random_text(rng: random.Random, num_pieces: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(num_pieces))


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(detokenizer: IncrementalDetokenizer, token_ids: list[int]) -> tuple[list[str], list[str]]:
    """Deltas of every append and the final flush, and the text shown after each of them."""
    deltas, shown = [], []
    for token_id in token_ids:
        deltas.append(detokenizer.append(token_id))
        shown.append(detokenizer.text)
    deltas.append(detokenizer.flush())
    shown.append(detokenizer.text)
    return deltas, shown


@pytest.mark.parametrize("name", ["bytes", "bpe"])
@pytest.mark.parametrize("with_prompt", [False, True])
def test_deltas_concatenate_to_the_full_decode(tokenizers_by_name, name, with_prompt):
    tokenizer = tokenizers_by_name[name]
    rng = random.Random(f"{name}-{with_prompt}")
    num_held_steps = 0
    for _ in range(25):
        prompt = _encode(tokenizer, _random_text(rng, 3)) if with_prompt else []
        output = _encode(tokenizer, _random_text(rng, 12))
        detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        stream = DecodeStream(ids=prompt, skip_special_tokens=True)
        reference = ""
        for token_id in output:
            delta = detokenizer.append(token_id)
            reference += stream.step(tokenizer.backend_tokenizer, token_id) or ""
            num_held_steps += delta == ""
            assert "\ufffd" not in delta, f"emitted a replacement char for an incomplete character: {delta!r}"
            # tokenizers' own streaming decoder shows the same text after every token.
            assert detokenizer.text == reference
        assert detokenizer.flush() == ""  # valid text: nothing left held back
        assert detokenizer.text == tokenizer.decode(output)
        assert detokenizer.stop_reason is None and detokenizer.is_finished
    assert num_held_steps > 0  # multi-byte characters were split across tokens, so some steps held text


def test_metaspace_leading_space_comes_from_the_prompt_context(tokenizers_by_name):
    tokenizer = tokenizers_by_name["metaspace"]
    prompt = _encode(tokenizer, "the cat")
    output = _encode(tokenizer, "sat on the mat.")  # the first token is "▁sat"
    deltas, _ = _stream(IncrementalDetokenizer(tokenizer, prompt), output)
    text = "".join(deltas)
    assert text == tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)) :] == " sat on the mat."
    assert tokenizer.decode(output) == "sat on the mat."  # decoded alone, the space would be lost
    stream = DecodeStream(ids=prompt, skip_special_tokens=True)
    assert text == "".join(stream.step(tokenizer.backend_tokenizer, t) or "" for t in output)


def test_incomplete_character_is_held_until_complete(tokenizers_by_name):
    tokenizer = tokenizers_by_name["bytes"]
    emoji = list("🙂".encode())
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert [detokenizer.append(b) for b in [ord("a"), *emoji]] == ["a", "", "", "", "🙂"]
    # A request that ends inside a character shows what a full decode shows: U+FFFD.
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert [detokenizer.append(b) for b in emoji[:2]] == ["", ""]
    assert detokenizer.flush() == "\ufffd" == tokenizer.decode(emoji[:2])


def test_random_bytes_match_the_full_decode(tokenizers_by_name):
    """Arbitrary byte sequences, invalid UTF-8 included: deltas + flush == decode(all ids)."""
    tokenizer = tokenizers_by_name["bytes"]
    rng = random.Random(0)
    for _ in range(40):
        output = [rng.choice([rng.randrange(256), rng.randrange(0x80, 0x100), 0xE2, 0xF0]) for _ in range(20)]
        deltas, _ = _stream(IncrementalDetokenizer(tokenizer, []), output)
        assert "".join(deltas) == tokenizer.decode(output)


def _reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Read the text one character at a time and stop at the first stop string that completes."""
    for end in range(1, len(text) + 1):
        ended = [s for s in stops if text[:end].endswith(s)]
        if ended:
            stop = max(ended, key=len)
            return text[: end if include else end - len(stop)], stop
    return text, None


@pytest.mark.parametrize("name", ["bytes", "bpe"])
def test_stop_strings_match_a_character_by_character_reference(tokenizers_by_name, name):
    """Random texts and stop strings cut from them; every intermediate text is a prefix of the final one."""
    tokenizer = tokenizers_by_name[name]
    rng = random.Random(1)
    num_stopped = 0
    for trial in range(60):
        text = _random_text(rng, 10)
        stops = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randint(1, 6)])
        stops.append(rng.choice(["STOP", "🙂!", "zzz"]))
        include = trial % 2 == 1
        output = _encode(tokenizer, text)
        detokenizer = IncrementalDetokenizer(tokenizer, [], stop=stops, include_stop_str_in_output=include)
        _, shown = _stream(detokenizer, output)
        expected, expected_stop = _reference_stop(tokenizer.decode(output), stops, include)
        assert (detokenizer.text, detokenizer.stop_reason) == (expected, expected_stop), (text, stops)
        # Streaming never showed text that the stop later took back: no partial stop string.
        assert all(expected.startswith(s) for s in shown)
        num_stopped += expected_stop is not None
    assert num_stopped > 40


@pytest.mark.parametrize("name", ["bytes", "bpe"])
def test_stop_string_split_across_tokens(tokenizers_by_name, name):
    tokenizer = tokenizers_by_name[name]
    text = "the naïve cat said: STOP here. And more."
    output = _encode(tokenizer, text)
    pieces = [tokenizer.decode([t]) for t in output]
    # The stop string starts inside one token and ends in another one (2 to 4 tokens on these tokenizers).
    stop = "d: ST"
    starts = [i for i in range(len(pieces)) if stop in "".join(pieces[i:])]
    ends = [i for i in range(len(pieces)) if stop in "".join(pieces[: i + 1])]
    assert ends[0] - starts[-1] + 1 >= 2
    for include, expected in ((False, "the naïve cat sai"), (True, "the naïve cat said: ST")):
        detokenizer = IncrementalDetokenizer(tokenizer, [], stop=[stop, "never"], include_stop_str_in_output=include)
        deltas, shown = _stream(detokenizer, output)
        assert detokenizer.text == expected and detokenizer.stop_reason == stop
        assert all(expected.startswith(s) for s in shown)
        # The stop completes at token ends[0]; nothing comes after it.
        assert shown[ends[0]] == expected and all(d == "" for d in deltas[ends[0] + 1 :])


def test_false_starts_are_released_once_they_cannot_match(tokenizers_by_name):
    tokenizer = tokenizers_by_name["bytes"]
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["STOP"])
    deltas = [detokenizer.append(b) for b in b"a STOmp STOP b"]
    assert deltas[:6] == ["a", " ", "", "", "", "STOm"]  # "STO" held until "m" rules it out
    assert detokenizer.text == "a STOmp " and detokenizer.stop_reason == "STOP"
    assert detokenizer.append(ord("x")) == "" and detokenizer.flush() == ""


def test_flush_returns_a_held_stop_prefix(tokenizers_by_name):
    tokenizer = tokenizers_by_name["bytes"]
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["STOP"])
    assert "".join(detokenizer.append(b) for b in b"Hello ST") == "Hello "
    assert detokenizer.flush() == "ST"
    assert detokenizer.text == "Hello ST" and detokenizer.stop_reason is None


def test_multibyte_stop_string(tokenizers_by_name):
    tokenizer = tokenizers_by_name["bytes"]
    output = _encode(tokenizer, "日本語🙂 tail")
    for include, expected in ((False, "日本"), (True, "日本語🙂")):
        detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["語🙂"], include_stop_str_in_output=include)
        _stream(detokenizer, output)
        assert detokenizer.text == expected and detokenizer.stop_reason == "語🙂"


@pytest.mark.parametrize("name", ["bytes", "bpe"])
def test_skip_special_tokens(tokenizers_by_name, name):
    tokenizer = tokenizers_by_name[name]
    bos, eos, im_end = (tokenizer.convert_tokens_to_ids(t) for t in SPECIALS)
    output = [bos, *_encode(tokenizer, "héllo 🙂"), im_end, *_encode(tokenizer, " world"), eos]
    skipped, _ = _stream(IncrementalDetokenizer(tokenizer, [bos], skip_special_tokens=True), output)
    assert "".join(skipped) == "héllo 🙂 world" == tokenizer.decode(output, skip_special_tokens=True)
    kept, _ = _stream(IncrementalDetokenizer(tokenizer, [bos], skip_special_tokens=False), output)
    assert "".join(kept) == "<s>héllo 🙂<|im_end|> world</s>" == tokenizer.decode(output)
    # A special token's text can be a stop string when it is kept.
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False, stop=["<|im_end|>"])
    _stream(detokenizer, output)
    assert detokenizer.text == "<s>héllo 🙂" and detokenizer.stop_reason == "<|im_end|>"


def test_rejects_empty_stop_strings(tokenizers_by_name):
    with pytest.raises(ValueError, match="non-empty stop strings"):
        IncrementalDetokenizer(tokenizers_by_name["bytes"], [], stop=["ok", ""])


def test_stop_strings_ending_together_cut_at_the_longer(tokenizers_by_name):
    tokenizer = tokenizers_by_name["bpe"]
    for stops in (["OP", "STOP"], ["STOP", "OP"]):
        detokenizer = IncrementalDetokenizer(tokenizer, [], stop=stops)
        _stream(detokenizer, _encode(tokenizer, "a STOP b"))
        assert detokenizer.text == "a " and detokenizer.stop_reason == "STOP"
    # The stop that completes first wins even when another started earlier.
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["a STOP", "ST"])
    _stream(detokenizer, _encode(tokenizer, "a STOP b"))
    assert detokenizer.text == "a " and detokenizer.stop_reason == "ST"


class _OldIncrementalDetokenizer:
    """IncrementalDetokenizer as it was before the stop-string automaton (commit 0b1536e), frozen here as
    the oracle for "same outputs as today": the decode window, the U+FFFD hold-back and the quadratic
    stop-string search of the held text, unchanged."""

    def __init__(self, tokenizer, prompt_token_ids, skip_special_tokens=True, stop=(), include=False):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = tuple(stop)
        self._include = include
        self._token_ids = [int(t) for t in prompt_token_ids[-5:]]
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._pending = ""
        self.text = ""
        self.stop_reason = None
        self.is_finished = False

    def append(self, token_id: int) -> str:
        if self.is_finished:
            return ""
        self._token_ids.append(int(token_id))
        return self._emit(self._decode_new(force=False), is_last=False)

    def flush(self) -> str:
        if self.is_finished:
            return ""
        return self._emit(self._decode_new(force=True), is_last=True)

    def _decode(self, token_ids):
        return self._tokenizer.decode(
            token_ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _decode_new(self, force: bool) -> str:
        if self._read_offset == len(self._token_ids):
            return ""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._token_ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not force):
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        del self._token_ids[: self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
        return delta

    def _emit(self, new_text: str, is_last: bool) -> str:
        pending = self._pending + new_text
        if self._stop:
            match = naive_first_stop(pending, self._stop)
            if match is not None:
                start, stop = match
                end = start + len(stop) if self._include else start
                self.stop_reason = stop
                self.is_finished = True
                self._pending = ""
                return self._take(pending[:end])
        hold = 0 if is_last else naive_longest_stop_prefix_suffix(pending, self._stop)
        self._pending = pending[len(pending) - hold :]
        if is_last:
            self.is_finished = True
        return self._take(pending[: len(pending) - hold])

    def _take(self, delta: str) -> str:
        self.text += delta
        return delta


def _trace(detokenizer, token_ids: list[int]) -> list[tuple[str, str, str | None, bool]]:
    """(delta, text, stop_reason, is_finished) after every append and after the final flush."""
    trace = []
    for token_id in token_ids:
        delta = detokenizer.append(token_id)
        trace.append((delta, detokenizer.text, detokenizer.stop_reason, detokenizer.is_finished))
    delta = detokenizer.flush()
    trace.append((delta, detokenizer.text, detokenizer.stop_reason, detokenizer.is_finished))
    return trace


@pytest.mark.parametrize("name", ["bytes", "bpe"])
def test_automaton_gives_the_old_implementations_deltas_on_random_token_streams(tokenizers_by_name, name):
    """Random texts over a few pieces (multi-byte ones split across byte tokens, specials in between),
    random overlapping stop strings cut from the text and from its characters, both include settings."""
    tokenizer = tokenizers_by_name[name]
    bos, _, im_end = (tokenizer.convert_tokens_to_ids(t) for t in SPECIALS)
    rng = random.Random(f"old-{name}")
    pieces = ["ab", "a", "b", "ba", "é", "🙂", " ", "語"]
    num_stopped = num_held = 0
    for trial in range(150):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        stops = []
        for _ in range(rng.randint(1, 4)):
            if text and rng.random() < 0.6:
                start = rng.randrange(len(text))
                stops.append(text[start : start + rng.randint(1, 5)])
            else:
                stops.append("".join(rng.choice("ab🙂") for _ in range(rng.randint(1, 4))))
        include = trial % 2 == 1
        skip_special_tokens = trial % 3 != 0
        prompt = [bos, *_encode(tokenizer, rng.choice(["", "ab", "語 a"]))]
        output = _encode(tokenizer, text)
        if output and trial % 5 == 0:
            output.insert(rng.randrange(len(output) + 1), im_end)
        if trial % 7 == 0:
            output = output[: rng.randint(0, len(output))]  # may end inside a character: flush shows U+FFFD
        old = _OldIncrementalDetokenizer(tokenizer, prompt, skip_special_tokens, stops, include)
        expected = _trace(old, output)
        kwargs = {"skip_special_tokens": skip_special_tokens, "include_stop_str_in_output": include}
        new = _trace(IncrementalDetokenizer(tokenizer, prompt, stop=stops, **kwargs), output)
        assert new == expected, (text, stops, include)
        # The old algorithm behind the new detokenizer's interface gives the same too.
        naive = IncrementalDetokenizer(tokenizer, prompt, stop_matcher=NaiveStopStringMatcher(stops), **kwargs)
        assert _trace(naive, output) == expected
        num_stopped += expected[-1][2] is not None
        num_held += any(delta == "" for delta, *_ in expected[:-1])
    assert num_stopped > 50 and num_held > 50


def test_a_prebuilt_matcher_is_shared_by_detokenizers(tokenizers_by_name):
    tokenizer = tokenizers_by_name["bytes"]
    matcher = StopStringMatcher(["STOP", "ab"])
    first = IncrementalDetokenizer(tokenizer, [], stop_matcher=matcher)
    second = IncrementalDetokenizer(tokenizer, [], stop_matcher=matcher, include_stop_str_in_output=True)
    assert first.stop_matcher is second.stop_matcher is matcher
    # Interleaved streams keep their own automaton state.
    for a, b in zip(b"xx STOP yy", b"a b STOP a"):
        first.append(a)
        second.append(b)
    assert (first.text, first.stop_reason) == ("xx ", "STOP")
    assert (second.text, second.stop_reason) == ("a b STOP", "STOP")
    with pytest.raises(ValueError, match="stop strings or a prebuilt stop_matcher, not both"):
        IncrementalDetokenizer(tokenizer, [], stop=["x"], stop_matcher=matcher)


def test_output_processor_builds_one_matcher_for_the_n_samples_of_a_request(tokenizers_by_name, monkeypatch):
    built: list[StopStringMatcher] = []

    class CountedMatcher(StopStringMatcher):
        def __init__(self, stops):
            super().__init__(stops)
            built.append(self)

    monkeypatch.setattr(output_module, "StopStringMatcher", CountedMatcher)
    params = SamplingParams(n=3, stop=("STOP", "ab"))
    parent = Request("r", [1, 2], params)
    parent.children = [Request(f"r#{i}", [1, 2], params, sample_index=i, parent_id="r") for i in (1, 2)]
    processor = OutputProcessor(tokenizers_by_name["bytes"])
    processor.add(parent)
    assert len(built) == 1 and built[0].stops == ("STOP", "ab")  # one automaton for the three samples
    processor.add(Request("plain", [1], SamplingParams()))
    assert len(built) == 1  # none without stop strings
    # Each sample still keeps its own place in the text: they stop at different tokens.
    texts = {"r": b"x STOP", "r#1": b"yy ab", "r#2": b"z"}
    updates = [
        RequestUpdate(request, list(texts[request.request_id]), [], False) for request in (parent, *parent.children)
    ]
    deltas, stopped, _failed = processor.process(updates)
    assert [(d.index, d.text, d.stop_reason) for d in deltas] == [(0, "x ", "STOP"), (1, "yy ", "ab"), (2, "z", None)]
    assert [(request.request_id, stop) for request, stop in stopped] == [("r", "STOP"), ("r#1", "ab")]

"""The Aho-Corasick stop-string matcher against its naive reference (the detokenizer's old algorithm) and
against the rule read off one character at a time; and its work, counted in steps, on a workload that made
the old algorithm quadratic."""

from __future__ import annotations

import random

import pytest

from linrec.engine.stop_strings import (
    NaiveStopStringMatcher,
    StopMatch,
    StopStringMatcher,
    naive_first_stop,
    naive_longest_stop_prefix_suffix,
)


def _by_definition(text: str, stops: list[str]) -> tuple[int, str | None, int]:
    """Read `text` one character at a time: (end, stop, 0) of the first stop string to complete (the longest
    of those completing together), or (len(text), None, held) with held the longest tail of the text that
    is a proper prefix of some stop string."""
    for end in range(1, len(text) + 1):
        ended = [s for s in stops if text[:end].endswith(s)]
        if ended:
            return end, max(ended, key=len), 0
    held = max((n for s in stops for n in range(len(s)) if text.endswith(s[:n])), default=0)
    return len(text), None, held


def _random_cuts(rng: random.Random, text: str) -> list[str]:
    """`text` cut into pieces at random places; empty pieces included (a token can decode to nothing)."""
    cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, len(text) + 2)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def _random_stops(rng: random.Random, alphabet: str, text: str) -> list[str]:
    """Stop strings built to overlap: random words, pieces of the text, prefixes and suffixes of each
    other, runs of one character, and repeats."""
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
    for _ in range(rng.randint(0, 3)):
        kind = rng.randrange(5)
        base = rng.choice(stops)
        if kind == 0 and text:
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randint(1, 7)])
        elif kind == 1 and len(base) > 1:
            stops.append(base[: rng.randint(1, len(base) - 1)])
        elif kind == 2 and len(base) > 1:
            stops.append(base[rng.randint(1, len(base) - 1) :])
        elif kind == 3:
            stops.append(rng.choice(alphabet) * rng.randint(2, 6))
        else:
            stops.append(base)
    rng.shuffle(stops)
    return stops


def _feed_all(matcher, pieces: list[str]) -> list[tuple[StopMatch | None, int]]:
    """(match, held length) after each piece, until a match ends the stream."""
    cursor = matcher.cursor()
    results = []
    for piece in pieces:
        match = cursor.feed(piece)
        results.append((match, cursor.num_held_chars))
        if match is not None:
            break
    return results


def test_matches_the_naive_reference_and_the_definition_on_random_cases():
    rng = random.Random(0)
    num_matched = num_held = 0
    for trial in range(3000):
        alphabet = ("ab", "abc", "aab", "xyzw")[trial % 4]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        stops = _random_stops(rng, alphabet, text)
        pieces = _random_cuts(rng, text)
        fast = _feed_all(StopStringMatcher(stops), pieces)
        assert fast == _feed_all(NaiveStopStringMatcher(stops), pieces), (text, stops, pieces)
        # Where the stream ended (in the whole text's coordinates) and what was held: as if read char by char.
        match, held = fast[-1] if fast else (None, 0)
        num_fed_before = sum(len(p) for p in pieces[: len(fast) - 1])
        end = len(text) if match is None else num_fed_before + match.end
        assert (end, None if match is None else match.stop, held) == _by_definition(text, stops), (text, stops)
        num_matched += match is not None
        num_held += held > 0
    assert num_matched > 1500 and num_held > 300  # both outcomes are common on these alphabets


def test_the_result_does_not_depend_on_the_cuts():
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice("ab") for _ in range(30))
        stops = _random_stops(rng, "ab", text)
        matcher = StopStringMatcher(stops)  # one automaton, many cursors
        outcomes = set()
        for _ in range(5):
            pieces = _random_cuts(rng, text)
            fed = _feed_all(matcher, pieces)
            match = fed[-1][0] if fed else None
            num_fed_before = sum(len(p) for p in pieces[: len(fed) - 1])
            outcomes.add(None if match is None else (num_fed_before + match.end, match.stop))
        assert len(outcomes) == 1, (text, stops, outcomes)


@pytest.mark.parametrize("make", [StopStringMatcher, NaiveStopStringMatcher])
def test_first_completing_wins_and_ties_go_to_the_longer(make):
    # The stop that completes first wins even when another one started earlier.
    assert make(["a STOP", "ST"]).cursor().feed("a STOP b") == StopMatch("ST", 4)
    assert make(["abcd", "bc"]).cursor().feed("abcd") == StopMatch("bc", 3)
    # Completing at the same character: the longer one, whatever the order given.
    for stops in (["OP", "STOP"], ["STOP", "OP"], ["P", "OP", "STOP", "TOP"]):
        assert make(stops).cursor().feed("a STOP b") == StopMatch("STOP", 6)
    # A stop string that is a prefix of another one completes first.
    assert make(["abc", "ab"]).cursor().feed("xabc") == StopMatch("ab", 3)
    # Repeated stop strings and overlapping occurrences of one.
    assert make(["aa", "aa"]).cursor().feed("baaa") == StopMatch("aa", 3)
    # Split across feeds, the end counts in the feed that completes it.
    cursor = make(["hello"]).cursor()
    assert [cursor.feed(p) for p in ("say hel", "", "l")] == [None, None, None]
    assert cursor.feed("o there") == StopMatch("hello", 1)


@pytest.mark.parametrize("make", [StopStringMatcher, NaiveStopStringMatcher])
def test_held_length_is_the_longest_tail_that_is_a_proper_stop_prefix(make):
    cursor = make(["abcab", "bd"]).cursor()
    held = []
    for piece in ("x", "a", "b", "c", "a", "c", "ab", "ca"):
        assert cursor.feed(piece) is None
        held.append(cursor.num_held_chars)
    # "xabca": "abca" is a prefix of "abcab"; "abcac" rules it out; "ab" and then "abca" again.
    assert held == [0, 1, 2, 3, 4, 0, 2, 4]
    assert cursor.feed("b") == StopMatch("abcab", 1) and cursor.num_held_chars == 0
    with pytest.raises(ValueError, match="no more text after a stop string matched"):
        cursor.feed("x")


def test_cursors_on_one_matcher_are_independent():
    matcher = StopStringMatcher(["needle", "nee"])
    first, second = matcher.cursor(), matcher.cursor()
    assert first.feed("ne") is None and second.feed("xx") is None
    assert (first.num_held_chars, second.num_held_chars) == (2, 0)
    assert second.feed("ne") is None and first.feed("e") == StopMatch("nee", 1)
    assert second.feed("edle") == StopMatch("nee", 1)


@pytest.mark.parametrize("make", [StopStringMatcher, NaiveStopStringMatcher])
def test_rejects_empty_stop_strings(make):
    with pytest.raises(ValueError, match=r"expected non-empty stop strings, got \['ok', ''\]"):
        make(["ok", ""])


def test_unicode_and_single_character_stops():
    stops = ["語🙂", "🙂", "\n\n", "é"]
    for text in ("日本語🙂 tail", "a\n\nb", "café", "🙂"):
        pieces = list(text)
        assert _feed_all(StopStringMatcher(stops), pieces) == _feed_all(NaiveStopStringMatcher(stops), pieces)
    assert StopStringMatcher(stops).cursor().feed("日本語🙂") == StopMatch("語🙂", 4)


def test_naive_functions_are_the_old_detokenizer_helpers():
    assert naive_first_stop("a STOP b", ("OP", "STOP")) == (2, "STOP")
    assert naive_first_stop("nothing", ("STOP",)) is None
    assert naive_longest_stop_prefix_suffix("Hello ST", ("STOP",)) == 2
    assert naive_longest_stop_prefix_suffix("Hello STOP", ("STOP",)) == 0  # proper prefixes only


def _long_stops_workload(num_stops: int, stop_len: int, num_chars: int, seed: int) -> tuple[str, list[str]]:
    """A text over a few characters, and stop strings that never complete but whose long prefixes keep
    occurring in it: half are windows of the text whose last character is replaced by one the text lacks,
    half are runs of "a" ending in that character (the classic worst case for failure links)."""
    rng = random.Random(seed)
    text = "".join(rng.choice("aab") for _ in range(num_chars))
    stops = []
    for i in range(num_stops):
        if i % 2:
            start = rng.randrange(max(1, num_chars - stop_len))
            stops.append(text[start : start + stop_len - 1] + "#")
        else:
            stops.append("a" * (stop_len - 1 - i % 7) + "#")
    return text, stops


def test_work_is_linear_in_the_text_for_1000_stops_of_1000_chars():
    """The regression test for the quadratic matcher, in counted steps (no clocks): 1,000 stop strings of
    1,000 characters over a text whose tails keep matching long prefixes of them."""
    text, stops = _long_stops_workload(num_stops=1000, stop_len=1000, num_chars=20_000, seed=2)
    matcher = StopStringMatcher(stops)
    total_stop_chars = sum(len(s) for s in stops)
    assert matcher.num_states <= 1 + total_stop_chars
    assert matcher.num_build_steps <= 2 * total_stop_chars  # one per trie character + failure-link steps
    cursor = matcher.cursor()
    rng = random.Random(3)
    held = []
    for piece in _random_cuts(rng, text[:10_000]) + list(text[10_000:]):
        assert cursor.feed(piece) is None
        held.append(cursor.num_held_chars)
    assert max(held) >= 500  # long prefixes really were in play
    assert cursor.num_steps <= 2 * len(text)  # at most one transition and one failure link per character

    # The reference does at least one string operation per stop string per feed, plus one per tail
    # length tried: thousands per character here, growing with the held text (a prefix of the text is
    # enough to show it; the reference takes seconds per hundred characters of this workload).
    naive = NaiveStopStringMatcher(stops).cursor()
    num_chars = 40
    steps_after = []
    for char in text[:num_chars]:
        assert naive.feed(char) is None
        steps_after.append(naive.num_steps)
    prefix_cursor = matcher.cursor()
    assert prefix_cursor.feed(text[:num_chars]) is None
    assert naive.num_held_chars == prefix_cursor.num_held_chars
    assert naive.num_steps >= 1000 * num_chars
    # The step count of each feed grows with the held text: quadratic in the text while the tail matches.
    assert steps_after[-1] - steps_after[-2] > 10 * (steps_after[1] - steps_after[0])


def test_work_per_character_does_not_grow_with_the_stop_strings():
    steps_per_char = {}
    for num_stops, stop_len in ((10, 10), (100, 100), (1000, 300)):
        text, stops = _long_stops_workload(num_stops, stop_len, num_chars=5000, seed=4)
        cursor = StopStringMatcher(stops).cursor()
        for char in text:
            cursor.feed(char)
        steps_per_char[num_stops] = cursor.num_steps / len(text)
    assert all(1.0 <= s <= 2.0 for s in steps_per_char.values()), steps_per_char

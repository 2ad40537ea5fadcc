"""`linrec bench stop-strings`: the cost of stop strings per generated token, with the Aho-Corasick matcher
and with the naive reference (the detokenizer's algorithm before it), beside no stop strings, in one run.

What is timed is what the engine thread does for one sample: the generated text goes token by token
through `IncrementalDetokenizer` with the demo models' byte-level tokenizer (one token per byte; the text
is ASCII, so one token per character), and the request ends with `flush`. Each contender gets a fresh
detokenizer per pass; the automaton is built once per stop set, outside the passes, and its build time
is reported on its own (a request builds it once and its n samples share it).

Two stop sets of `num_stops` strings of `stop_len` characters, both ending in a character the text never
contains, so that no stop string completes and every contender reads the whole text:
- overlapping: windows of the text itself (the last character replaced): long prefixes of them keep
  matching the text's tail, so up to stop_len - 1 characters are held back at a time. This is the case
  that made the old algorithm quadratic: it searched the whole held text for every stop string and tried
  every tail length against every stop string, on every token.
- unrelated: random strings over the text's alphabet: only short prefixes ever match.

Times are CPU seconds of this process (`time.process_time`): the development machines are shared, and
CPU time is what the engine thread would spend. The contenders take turns for `repeats` rounds; in each
round a contender streams the text as many times as fit in _MIN_ROUND_CPU_S (at least once: one pass of
the naive reference is already longer), and its fastest pass counts.

The server caps requests at 64 stop strings of at most 1,024 characters; the bench feeds the detokenizer
directly, so it can go past those caps to show how the cost grows.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass

from linrec.engine.detokenizer import IncrementalDetokenizer
from linrec.engine.stop_strings import NaiveStopStringMatcher, StopMatcher, StopStringMatcher

# The generated text: common words, lower case, one space between them (ASCII: one byte token each).
_WORDS = (
    "the of and to in is it that was for on are with as be at by this have from or one had not but what all "
    "were when we there can an your which their said if do will each about how up out them then she many "
    "some so these would other into has more her two like him see time could no make than first been its "
    "who now people my made over did down only way find use may water long little very after words called"
).split()
_ALPHABET = "abcdefghijklmnopqrstuvwxyz "
_NEVER_IN_TEXT = "#"  # ends every stop string, so that none completes
# CPU seconds of passes per contender per round: a pass of the default 2,000 tokens without stop strings
# takes ~20 ms, too short to be timed once on a loaded machine.
_MIN_ROUND_CPU_S = 0.1


@dataclass(frozen=True)
class StopStringWorkload:
    text: str
    stop_sets: dict[str, list[str]]  # "overlapping" / "unrelated" -> the stop strings


def make_stop_string_workload(num_stops: int, stop_len: int, num_tokens: int, seed: int) -> StopStringWorkload:
    """`num_tokens` characters of seeded words, and the two stop sets of the module docstring."""
    for name, value in (("num_stops", num_stops), ("stop_len", stop_len), ("num_tokens", num_tokens)):
        if value < 1:
            raise ValueError(f"expected {name} >= 1, got {value}")
    rng = random.Random(seed)
    words: list[str] = []
    num_chars = 0
    while num_chars < num_tokens:
        words.append(rng.choice(_WORDS))
        num_chars += len(words[-1]) + 1
    text = " ".join(words)[:num_tokens]
    # Windows may run past the end of a short text: they wrap around to its start.
    looped = text * (stop_len // len(text) + 2)
    overlapping = []
    for _ in range(num_stops):
        start = rng.randrange(len(text))
        overlapping.append(looped[start : start + stop_len - 1] + _NEVER_IN_TEXT)
    unrelated = ["".join(rng.choice(_ALPHABET) for _ in range(stop_len - 1)) + _NEVER_IN_TEXT for _ in range(num_stops)]
    return StopStringWorkload(text, {"overlapping": overlapping, "unrelated": unrelated})


@dataclass
class ContenderResult:
    stop_set: str  # "none", "overlapping" or "unrelated"
    matcher: str  # "none", "automaton" or "naive"
    cpu_us_per_token: float  # fastest pass: CPU microseconds per appended token (flush included)
    num_passes: int  # passes timed, over all rounds
    text_is_the_input: bool  # the streamed text (deltas + flush) equals the generated text, and no stop matched


@dataclass
class StopSetStats:
    stop_set: str
    automaton_build_s: float  # CPU seconds to build the automaton, once per request
    automaton_states: int
    automaton_steps_per_char: float  # transitions + failure links per character of the text (<= 2)
    max_held_chars: int  # the longest tail held back while streaming the text


@dataclass
class StopStringBenchResult:
    num_stops: int
    stop_len: int
    num_tokens: int
    repeats: int
    stop_sets: list[StopSetStats]
    contenders: list[ContenderResult]

    def us_per_token(self, stop_set: str, matcher: str) -> float:
        for c in self.contenders:
            if (c.stop_set, c.matcher) == (stop_set, matcher):
                return c.cpu_us_per_token
        raise KeyError(
            f"expected a contender ({stop_set}, {matcher}), got {[(c.stop_set, c.matcher) for c in self.contenders]}"
        )

    def ratios(self) -> dict[str, dict[str, float]]:
        """Per stop set: automaton / no stop strings, and naive / automaton."""
        plain = self.us_per_token("none", "none")
        ratios = {}
        for stats in self.stop_sets:
            automaton = self.us_per_token(stats.stop_set, "automaton")
            ratios[stats.stop_set] = {
                "automaton_over_no_stops": automaton / plain,
                "naive_over_automaton": self.us_per_token(stats.stop_set, "naive") / automaton,
            }
        return ratios

    def to_json(self) -> str:
        data = asdict(self)
        data["ratios"] = self.ratios()
        return json.dumps(data, indent=2)

    def format(self) -> str:
        rows = [
            f"workload: {self.num_tokens} tokens of generated ASCII text through IncrementalDetokenizer (demo byte "
            f"tokenizer), then flush; {self.num_stops} stop strings of {self.stop_len} characters that never complete; "
            f"CPU time, fastest pass of {self.repeats} interleaved rounds",
            "",
            f"{'stop strings':<13} {'matcher':<10} {'us/token':>10} {'passes':>7} {'text ok':>8}",
        ]
        for c in self.contenders:
            ok = "yes" if c.text_is_the_input else "NO"
            rows.append(f"{c.stop_set:<13} {c.matcher:<10} {c.cpu_us_per_token:>10.2f} {c.num_passes:>7} {ok:>8}")
        rows += ["", f"{'stop strings':<13} {'automaton/no stops':>19} {'naive/automaton':>16} {'build s':>8} "
                 f"{'states':>9} {'steps/char':>11} {'max held':>9}"]  # fmt: skip
        ratios = self.ratios()
        for s in self.stop_sets:
            r = ratios[s.stop_set]
            rows.append(
                f"{s.stop_set:<13} {r['automaton_over_no_stops']:>18.2f}x {r['naive_over_automaton']:>15.1f}x "
                f"{s.automaton_build_s:>8.2f} {s.automaton_states:>9} {s.automaton_steps_per_char:>11.2f} "
                f"{s.max_held_chars:>9}"
            )
        return "\n".join(rows)


def byte_tokenizer():
    """The demo models' byte-level tokenizer, wrapped as transformers' fast tokenizer (what the engine gets)."""
    from transformers import PreTrainedTokenizerFast

    from linrec.models.tokenizer import BOS_TOKEN, EOS_TOKEN, build_byte_tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=build_byte_tokenizer(), bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)


def _stream(tokenizer, token_ids: list[int], stop_matcher: StopMatcher | None) -> tuple[float, str, str | None]:
    """One pass: (CPU seconds, streamed text, stop_reason)."""
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop_matcher=stop_matcher)
    start = time.process_time()
    for token_id in token_ids:
        detokenizer.append(token_id)
    detokenizer.flush()
    return time.process_time() - start, detokenizer.text, detokenizer.stop_reason


def run_stop_string_bench(
    num_stops: int = 1000, stop_len: int = 1000, num_tokens: int = 2000, repeats: int = 3, seed: int = 0
) -> StopStringBenchResult:
    """Time the contenders of the module docstring on one generated workload."""
    if repeats < 1:
        raise ValueError(f"expected repeats >= 1, got {repeats}")
    workload = make_stop_string_workload(num_stops, stop_len, num_tokens, seed)
    tokenizer = byte_tokenizer()
    token_ids = tokenizer.encode(workload.text, add_special_tokens=False)
    if len(token_ids) != num_tokens:
        raise AssertionError(f"expected one byte token per character, got {len(token_ids)} for {num_tokens} chars")

    matchers: dict[tuple[str, str], StopMatcher | None] = {("none", "none"): None}  # (stop set, matcher) ->
    stop_sets = []
    for name, stops in workload.stop_sets.items():
        start = time.process_time()
        automaton = StopStringMatcher(stops)
        build_s = time.process_time() - start
        # Work counters, from the matcher alone fed token by token as the detokenizer feeds it.
        cursor = automaton.cursor()
        max_held = 0
        for char in workload.text:
            cursor.feed(char)
            max_held = max(max_held, cursor.num_held_chars)
        steps_per_char = cursor.num_steps / len(workload.text)
        stop_sets.append(StopSetStats(name, build_s, automaton.num_states, steps_per_char, max_held))
        matchers[(name, "automaton")] = automaton
        matchers[(name, "naive")] = NaiveStopStringMatcher(stops)

    best = {key: float("inf") for key in matchers}
    num_passes = {key: 0 for key in matchers}
    text_ok = {key: True for key in matchers}
    # Rounds interleave the contenders so that load from other processes falls on each of them alike.
    for _ in range(repeats):
        for key, matcher in matchers.items():
            round_seconds = 0.0
            while round_seconds < _MIN_ROUND_CPU_S:  # at least one pass
                seconds, text, stop_reason = _stream(tokenizer, token_ids, matcher)
                round_seconds += seconds
                best[key] = min(best[key], seconds)
                num_passes[key] += 1
                text_ok[key] = text_ok[key] and text == workload.text and stop_reason is None
    contenders = [
        ContenderResult(*key, best[key] / num_tokens * 1e6, num_passes[key], text_ok[key]) for key in matchers
    ]
    return StopStringBenchResult(num_stops, stop_len, num_tokens, repeats, stop_sets, contenders)

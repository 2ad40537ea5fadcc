"""Stop strings: find the first one that completes in a text that arrives a piece at a time.

The rule (the detokenizer's since the start): read the text one character at a time; the first stop
string to complete wins, and when several complete at the same character, the longest of them. So the
answer does not depend on how the text was cut into pieces. Until a stop string completes, the longest
tail of the text that is a proper prefix of some stop string must be held back: shown now, it could not
be taken back if the rest of that stop string arrived.

Two implementations share one interface: `matcher.cursor()` gives a per-stream cursor, and
`cursor.feed(new_text)` returns the first completed `StopMatch` or None, after which
`cursor.num_held_chars` is the length to hold back.

- `StopStringMatcher`: an Aho-Corasick automaton over the stop strings. It is built once, in time
  linear in their total length, and is never changed afterwards, so the n samples of a request share
  one; each sample's cursor is one automaton state. A state is the longest tail of the text read so far
  that is a prefix of some stop string, and its depth is therefore exactly the length to hold back (had
  that tail been a whole stop string, a match would have ended the text). Each character costs one
  transition plus the failure links it follows; every failure link shortens the tail that one earlier
  transition grew by one character, so a stream of N characters costs at most 2N steps, whatever the
  number and length of the stop strings.
- `NaiveStopStringMatcher`, with `naive_first_stop` and `naive_longest_stop_prefix_suffix`: the
  algorithm the detokenizer used before, kept as the readable reference that the tests and
  `linrec bench stop-strings` compare against. Each feed searches the held text plus the new text for
  every stop string, and tries every tail length against every stop string: its work per character
  grows with the number and length of the stop strings and with the held text. That was the bug the
  automaton fixes: a request with 1,000 stop strings of 1,000 characters took 158 s instead of 5.3 s,
  and slowed every other request down, since matching runs on the engine thread.

Both cursors count their steps (`num_steps`) so that tests can check how work grows without timing.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

_ROOT = 0  # the automaton state of the empty tail
_NO_STOP = -1  # in the automaton's per-state stop index: no stop string ends here


@dataclass(frozen=True)
class StopMatch:
    """The stop string that completed first (the longest of those completing at the same character)."""

    stop: str
    end: int  # index just after its last character, in the text of the `feed` call that found it


def _check_stops(stops: Sequence[str]) -> tuple[str, ...]:
    if isinstance(stops, str):
        stops = (stops,)
    stops = tuple(stops)
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"expected non-empty stop strings, got {list(stops)}")
    return stops


class StopStringMatcher:
    """Aho-Corasick automaton over the stop strings; immutable once built, shared by every cursor on it.

    States are trie nodes, numbered in creation order; node 0 is the root (the empty string). Inserting
    a stop string creates its missing tail as a run of consecutive nodes, so most nodes' only child is
    the next number: `_chain_char[n]` is the character of the edge n -> n + 1 ("" if there is none) and
    `_branches` holds the other edges of the few nodes that have them. With 1,000 stop strings of 1,000
    characters (a million nodes) this keeps the automaton in tens of MB instead of one dict per node.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = _check_stops(stops)
        chain_char: list[str] = [""]
        branches: dict[int, dict[str, int]] = {}
        depth = array("l", [0])
        own_stop = array("l", [_NO_STOP])  # index of the stop string spelled by exactly this node
        num_steps = 0
        for stop_index, stop in enumerate(self._stops):
            node = _ROOT
            num_known = 0  # characters of `stop` already in the trie: walk them
            for char in stop:
                child = _child(chain_char, branches, node, char)
                if child is None:
                    break
                node = child
                num_known += 1
            num_new = len(stop) - num_known
            if num_new:
                # The rest of `stop` becomes a run of new nodes first, first + 1, ..., linked by chain edges.
                first = len(chain_char)
                if node == first - 1 and not chain_char[node]:
                    chain_char[node] = stop[num_known]
                else:
                    branches.setdefault(node, {})[stop[num_known]] = first
                chain_char.extend(stop[num_known + 1 :])
                chain_char.append("")
                depth.extend(range(depth[node] + 1, depth[node] + 1 + num_new))
                own_stop.extend(array("l", [_NO_STOP]) * num_new)
                node = first + num_new - 1
            num_steps += len(stop)
            if own_stop[node] == _NO_STOP:  # a repeated stop string keeps its first index
                own_stop[node] = stop_index

        num_nodes = len(chain_char)
        # fail[n]: the node of the longest proper suffix of n's string that is also in the trie.
        # longest_stop[n]: index of the longest stop string that is a suffix of n's string (or _NO_STOP):
        # n's own stop if it has one (nothing longer can be a suffix), else its failure node's.
        fail = array("l", [_ROOT]) * num_nodes
        longest_stop = array("l", [_NO_STOP]) * num_nodes
        # Breadth first (`order` grows while it is read), so that a node's failure node, which is
        # shallower, is complete before the node itself.
        order = [_ROOT]
        for node in order:
            chain = chain_char[node]
            branch = branches.get(node)
            if branch is None:
                if not chain:
                    continue
                children: Sequence[tuple[str, int]] = ((chain, node + 1),)
            else:
                children = [*branch.items(), (chain, node + 1)] if chain else list(branch.items())
            for char, child in children:
                order.append(child)
                target = _ROOT
                if node != _ROOT:
                    # Extend the longest suffix of node's string that is in the trie and continues with char.
                    # Summed along one stop string's path these walks take at most its length in steps,
                    # so the whole construction is linear in the total length of the stop strings.
                    suffix = fail[node]
                    while True:
                        num_steps += 1
                        extended = _child(chain_char, branches, suffix, char)
                        if extended is not None:
                            target = extended
                            break
                        if suffix == _ROOT:
                            break
                        suffix = fail[suffix]
                fail[child] = target
                longest_stop[child] = own_stop[child] if own_stop[child] != _NO_STOP else longest_stop[target]

        self._chain_char = chain_char
        self._branches = branches
        self._depth = depth
        self._fail = fail
        self._longest_stop = longest_stop
        self._num_build_steps = num_steps

    @property
    def stops(self) -> tuple[str, ...]:
        return self._stops

    @property
    def num_states(self) -> int:
        """Trie nodes, the root included: at most 1 + the total length of the stop strings."""
        return len(self._chain_char)

    @property
    def num_build_steps(self) -> int:
        """Trie edges walked or created plus failure-link steps taken while building."""
        return self._num_build_steps

    def cursor(self) -> StopStringCursor:
        return StopStringCursor(self)


def _child(chain_char: list[str], branches: dict[int, dict[str, int]], node: int, char: str) -> int | None:
    if chain_char[node] == char:
        return node + 1
    branch = branches.get(node)
    return None if branch is None else branch.get(char)


class StopStringCursor:
    """One stream's position in a `StopStringMatcher`: the automaton state after the text fed so far."""

    def __init__(self, matcher: StopStringMatcher) -> None:
        self._matcher = matcher
        self._node = _ROOT
        self._is_matched = False
        self._num_steps = 0

    @property
    def num_held_chars(self) -> int:
        """Length of the longest tail of the text fed so far that is a proper prefix of a stop string.

        That is the state's depth (see the module docstring); 0 once a stop string has matched.
        """
        return 0 if self._is_matched else self._matcher._depth[self._node]

    @property
    def num_steps(self) -> int:
        """Transitions taken: one per character plus one per failure link followed (at most 2 per character)."""
        return self._num_steps

    def feed(self, text: str) -> StopMatch | None:
        """Read `text` after everything fed before; return the first stop string it completes, or None.

        After a match the stream has ended: feeding more is an error.
        """
        if self._is_matched:
            raise ValueError("expected no more text after a stop string matched, got another feed")
        # Locals: this loop runs once per generated character on the engine thread.
        matcher = self._matcher
        chain_char, branches, fail, longest_stop = (
            matcher._chain_char,
            matcher._branches,
            matcher._fail,
            matcher._longest_stop,
        )
        node = self._node
        num_steps = 0
        for position, char in enumerate(text):
            while True:
                num_steps += 1
                if chain_char[node] == char:
                    node += 1
                    break
                branch = branches.get(node)
                if branch is not None and char in branch:
                    node = branch[char]
                    break
                if node == _ROOT:
                    break
                node = fail[node]
            stop_index = longest_stop[node]
            if stop_index != _NO_STOP:
                self._node, self._is_matched = node, True
                self._num_steps += num_steps
                return StopMatch(matcher._stops[stop_index], position + 1)
        self._node = node
        self._num_steps += num_steps
        return None


# --- The reference: the detokenizer's algorithm before the automaton, unchanged. ---


class WorkCounter:
    """Counts the string operations the naive reference makes (each reads at least one character)."""

    def __init__(self) -> None:
        self._num_steps = 0

    @property
    def num_steps(self) -> int:
        return self._num_steps

    def add(self, num_steps: int = 1) -> None:
        self._num_steps += num_steps


def naive_first_stop(text: str, stops: tuple[str, ...], work: WorkCounter | None = None) -> tuple[int, str] | None:
    """(start, stop) of the stop string that ends first in `text` (ties: the longer one), or None.

    Reference: one search of the whole text per stop string.
    """
    best = None
    for stop in stops:
        if work is not None:
            work.add()
        start = text.find(stop)
        if start >= 0:
            key = (start + len(stop), -len(stop))
            if best is None or key < best[0]:
                best = (key, start, stop)
    return None if best is None else (best[1], best[2])


def naive_longest_stop_prefix_suffix(text: str, stops: tuple[str, ...], work: WorkCounter | None = None) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string (0 if none).

    Reference: every tail length, longest first, against every stop string.
    """
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if work is not None:
                work.add()
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class NaiveStopStringMatcher:
    """The reference matcher: same interface as `StopStringMatcher`, nothing built in advance."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = _check_stops(stops)

    @property
    def stops(self) -> tuple[str, ...]:
        return self._stops

    def cursor(self) -> NaiveStopStringCursor:
        return NaiveStopStringCursor(self._stops)


class NaiveStopStringCursor:
    """Keeps the held tail as text and searches it again with every feed, as the detokenizer used to."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""  # the tail that may still become a stop string
        self._is_matched = False
        self._work = WorkCounter()

    @property
    def num_held_chars(self) -> int:
        return len(self._held)

    @property
    def num_steps(self) -> int:
        """String operations made: one per stop string searched, one per tail length tried."""
        return self._work.num_steps

    def feed(self, text: str) -> StopMatch | None:
        if self._is_matched:
            raise ValueError("expected no more text after a stop string matched, got another feed")
        held = self._held + text
        match = naive_first_stop(held, self._stops, self._work)
        if match is not None:
            start, stop = match
            self._held, self._is_matched = "", True
            # The match ends in `text`: a stop string ending inside the held text would have matched earlier.
            return StopMatch(stop, start + len(stop) - (len(held) - len(text)))
        num_held = naive_longest_stop_prefix_suffix(held, self._stops, self._work)
        self._held = held[len(held) - num_held :]
        return None


StopMatcher = StopStringMatcher | NaiveStopStringMatcher  # what IncrementalDetokenizer accepts

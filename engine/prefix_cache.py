"""The prefix-state cache: a radix tree over token ids whose nodes may hold a snapshot of a request's state.

For a recurrent model the state after a prefix is one fixed-size row whatever the prefix length, so a
cache entry is one snapshot row of the StatePool, and a hit is one row copy: the request's prefill
resumes at the next token. Snapshots sit at exact token positions (branch points, prefill-chunk ends,
prompt ends, the end state of a finished request), so hits are token-granular with no block alignment.

This module is plain data: token ids, row ids and counters. The scheduler decides when to save and
load; the runner copies the rows; the pool owns the tensors.

Invariants:
- A snapshot at node N holds the state after exactly the tokens on the root->N path, under one
  PrefixKey (everything that changes a state besides the tokens: model, adapter, layer route, salt).
- `ref` of a node counts the live paths that cover it: the inserted paths of pending requests and the
  path of every snapshot. A node with ref 0 holds nothing and is pruned.
- A snapshot that is pinned (a load reads it this step, or a waiting follower will) or not yet
  written (`is_ready` False) is never evicted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PrefixKey:
    """Everything besides the tokens that changes a state: snapshots match only under an equal key."""

    model: str  # the served weights (path, dtype, linearization, merged LoRA)
    adapter: str | None = None  # per-request adapter (filled by the adapter issue)
    layer_route: tuple[int, ...] | None = None  # per-request layer route (filled by the routing issue)
    cache_salt: str | None = None  # tenant isolation: requests with different salts never share a state


class RadixNode:
    """One edge of the tree and the position at its end."""

    __slots__ = (
        "tokens",
        "parent",
        "children",
        "depth",
        "ref",
        "row",
        "is_ready",
        "hits",
        "last_access",
        "pins",
        "claimed_by",
        "followers",
    )

    def __init__(self, tokens: list[int], parent: RadixNode | None, depth: int):
        self.tokens = tokens  # edge label: the tokens between the parent's position and this one
        self.parent = parent
        self.children: dict[int, RadixNode] = {}  # first token of the child's edge -> child
        self.depth = depth  # tokens from the root to the end of this edge
        self.ref = 0  # live paths covering this node (pending requests' paths and snapshot paths)
        self.row: int | None = None  # snapshot row: the state after the root->here tokens
        self.is_ready = False  # the row has been written (a save lands at the end of its step)
        self.hits = 0  # loads served
        self.last_access = 0  # cache clock at the last save or load (recency tie-break)
        self.pins = 0  # loads or waiting followers that will read the row: never evict while > 0
        self.claimed_by: str | None = None  # request that will save here (its prefill is cut at this depth)
        self.followers: list[Any] = []  # the scheduler's requests waiting for this node's snapshot

    @property
    def is_pending(self) -> bool:
        """A snapshot will appear here: claimed by a prefilling request, or written by this step."""
        return self.claimed_by is not None or (self.row is not None and not self.is_ready)

    def __repr__(self) -> str:
        return f"RadixNode(depth={self.depth}, edge={len(self.tokens)}, ref={self.ref}, row={self.row})"


@dataclass
class PathInfo:
    """What the tree knows along one request's path (tokens[:limit])."""

    hit: RadixNode | None  # deepest ready snapshot on the path
    hit_depth: int  # its depth (0 without a hit)
    branches: list[RadixNode]  # beyond the hit: positions where another live path leaves or ends (no snapshot)
    pending: RadixNode | None  # deepest node beyond the hit where a snapshot is being made by someone else


def _common_prefix_len(edge: list[int], tokens: list[int], start: int) -> int:
    n = min(len(edge), len(tokens) - start)
    if edge[:n] == tokens[start : start + n]:
        return n
    lo, hi = 0, n  # edge[:lo] matches, edge[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if edge[:mid] == tokens[start : start + mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    """Radix tree of state snapshots held in the rows `rows` of the StatePool.

    state_bytes: bytes of one snapshot (one request's state), for the value-per-byte eviction score.
    max_snapshots_per_path: at most this many snapshots on one root-to-leaf path (chunk ends of one
    long prompt would otherwise fill the cache with states that serve nobody but that prompt).
    """

    def __init__(self, rows: list[int], state_bytes: int, max_snapshots_per_path: int = 8):
        if max_snapshots_per_path < 1:
            raise ValueError(f"expected max_snapshots_per_path >= 1, got {max_snapshots_per_path}")
        self.num_rows = len(rows)
        self.state_bytes = state_bytes
        self.max_snapshots_per_path = max_snapshots_per_path
        self._free_rows: list[int] = sorted(rows, reverse=True)
        self._roots: dict[PrefixKey, RadixNode] = {}
        self._snapshots: dict[RadixNode, None] = {}  # ordered set of nodes holding a row
        self._clock = 0
        self.num_evictions = 0
        self.num_saves = 0

    # -- the tree ----------------------------------------------------------------------------------

    def root(self, key: PrefixKey) -> RadixNode:
        node = self._roots.get(key)
        if node is None:
            node = self._roots[key] = RadixNode([], None, 0)
        return node

    def insert_path(self, key: PrefixKey, tokens: list[int]) -> RadixNode:
        """Add one live path (ref + 1 on every node it covers), splitting edges so that a node ends
        exactly at len(tokens). Returns that node (the root for an empty path)."""
        node = self.root(key)
        i = 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                new = RadixNode(list(tokens[i:]), node, len(tokens))
                new.ref = 1
                node.children[tokens[i]] = new
                return new
            m = _common_prefix_len(child.tokens, tokens, i)
            if m < len(child.tokens):
                child = self._split(child, m)
            child.ref += 1
            node = child
            i += m
        return node

    def release_path(self, node: RadixNode) -> None:
        """Drop one live path ending at `node` (ref - 1 up to the root); prune nodes nobody holds."""
        while node.parent is not None:
            parent = node.parent
            node.ref -= 1
            if node.ref < 0:
                raise RuntimeError(f"{node} released more often than inserted")
            if node.ref == 0 and not node.children:
                if node.row is not None or node.is_pending or node.followers:
                    raise RuntimeError(f"{node} has no live path but still holds a snapshot, claim or followers")
                del parent.children[node.tokens[0]]
                node.parent = None
            node = parent

    def find(self, key: PrefixKey, tokens: list[int]) -> RadixNode | None:
        """The node ending exactly at len(tokens) on this path, if the tree has one."""
        nodes = list(self.walk(key, tokens, len(tokens)))
        if not tokens:
            return self._roots.get(key)
        return nodes[-1] if nodes and nodes[-1].depth == len(tokens) else None

    def walk(self, key: PrefixKey, tokens: list[int], limit: int) -> Iterator[RadixNode]:
        """The nodes whose whole edge matches tokens and ends at depth <= limit, root first (root excluded)."""
        node = self._roots.get(key)
        if node is None:
            return
        i = 0
        while i < limit:
            child = node.children.get(tokens[i])
            if child is None or child.depth > limit:
                return
            n = len(child.tokens)
            if child.tokens != tokens[i : i + n]:
                return
            yield child
            node = child
            i += n

    def path_info(self, key: PrefixKey, tokens: list[int], limit: int, request_id: str | None = None) -> PathInfo:
        """Hit, branch points and pending snapshots along tokens[:limit].

        A branch point is a node end where another live path leaves the request's path or ends
        (ref >= 2 and more than the next node on the path holds): the state there serves both.
        `request_id`'s own claims do not count as pending.
        """
        nodes = list(self.walk(key, tokens, limit))
        hit, hit_index = None, -1
        for index, node in enumerate(nodes):
            if node.row is not None and node.is_ready:
                hit, hit_index = node, index
        branches: list[RadixNode] = []
        pending: RadixNode | None = None
        for index in range(hit_index + 1, len(nodes)):
            node = nodes[index]
            if node.is_pending and node.claimed_by != request_id:
                pending = node
                continue
            if node.row is not None:
                continue
            next_ref = nodes[index + 1].ref if index + 1 < len(nodes) else 0
            if node.ref >= 2 and node.ref > next_ref:
                branches.append(node)
        return PathInfo(hit, hit.depth if hit is not None else 0, branches, pending)

    def _split(self, child: RadixNode, m: int) -> RadixNode:
        """Cut child's edge after m tokens; returns the new upper node (child keeps the lower part, so
        every handle to child stays valid)."""
        parent = child.parent
        upper = RadixNode(child.tokens[:m], parent, child.depth - len(child.tokens) + m)
        upper.ref = child.ref
        parent.children[child.tokens[0]] = upper
        child.tokens = child.tokens[m:]
        child.parent = upper
        upper.children[child.tokens[0]] = child
        return upper

    # -- snapshots ---------------------------------------------------------------------------------

    @property
    def num_snapshots(self) -> int:
        return len(self._snapshots)

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    @property
    def snapshot_bytes(self) -> int:
        return self.num_snapshots * self.state_bytes

    def snapshots(self) -> list[RadixNode]:
        return list(self._snapshots)

    def ancestor_snapshot_depth(self, node: RadixNode) -> int:
        """Depth of the deepest snapshot strictly above `node` (0: none), what a hit falls back to without it."""
        parent = node.parent
        while parent is not None:
            if parent.row is not None:
                return parent.depth
            parent = parent.parent
        return 0

    def value(self, node: RadixNode) -> float:
        """Expected prefill compute saved per byte held: (hits + 1) x the tokens this snapshot saves
        beyond its nearest ancestor snapshot, over its bytes."""
        return (node.hits + 1) * (node.depth - self.ancestor_snapshot_depth(node)) / self.state_bytes

    def is_evictable(self, node: RadixNode) -> bool:
        return node.row is not None and node.is_ready and node.pins == 0 and node.claimed_by is None

    def evict(self, node: RadixNode) -> int:
        """Drop node's snapshot; returns its row to the free list (and returns the row id)."""
        if not self.is_evictable(node):
            raise RuntimeError(f"{node} is in use (pinned, pending or claimed) and must not be evicted")
        row = node.row
        node.row = None
        node.is_ready = False
        del self._snapshots[node]
        self._free_rows.append(row)
        self.num_evictions += 1
        self.release_path(node)
        return row

    def _victim(self, candidates) -> RadixNode | None:
        """The least valuable evictable snapshot among candidates; older access first on equal value."""
        best, best_score = None, None
        for node in candidates:
            if not self.is_evictable(node):
                continue
            score = (self.value(node), node.last_access)
            if best_score is None or score < best_score:
                best, best_score = node, score
        return best

    def allocate_row(self, min_value: float | None = None) -> int | None:
        """A free snapshot row, evicting the least valuable evictable snapshot when none is free.

        min_value: evict only a snapshot worth less than this (an opportunistic save must not push out
        something better); None evicts whatever is least valuable (a save that followers wait for).
        """
        if not self._free_rows:
            victim = self._victim(self._snapshots)
            if victim is None or (min_value is not None and self.value(victim) >= min_value):
                return None
            self.evict(victim)
        return self._free_rows.pop()

    def save(self, key: PrefixKey, tokens: list[int], row: int, is_ready: bool) -> RadixNode | None:
        """Attach `row` as the snapshot after `tokens` (a live path of its own). Honours the per-path cap by
        evicting the least valuable evictable snapshot above it; returns None (row freed) if the node
        already has a snapshot or the cap cannot be honoured."""
        if not tokens:
            raise ValueError("expected a snapshot after at least one token, got an empty path")
        node = self.insert_path(key, tokens)
        above = []
        parent = node.parent
        while parent is not None:
            if parent.row is not None:
                above.append(parent)
            parent = parent.parent
        if node.row is not None:
            self.release_path(node)
            self._free_rows.append(row)
            return None
        if len(above) >= self.max_snapshots_per_path:
            victim = self._victim(above)
            if victim is None:
                self.release_path(node)
                self._free_rows.append(row)
                return None
            self.evict(victim)
        node.row = row
        node.is_ready = is_ready
        self._clock += 1
        node.last_access = self._clock
        self._snapshots[node] = None
        self.num_saves += 1
        return node

    def discard_rows(self, rows: set[int]) -> list[RadixNode]:
        """Drop the snapshots held in `rows` whatever their state (a failed step may have half written them);
        returns their nodes. Pins on them become harmless: a load is planned only from a node with a row."""
        dropped = [node for node in self._snapshots if node.row in rows]
        for node in dropped:
            self._free_rows.append(node.row)
            node.row = None
            node.is_ready = False
            del self._snapshots[node]
            self.release_path(node)
        return dropped

    def hit_depth(self, key: PrefixKey, tokens: list[int], limit: int) -> int:
        """Depth of the deepest ready snapshot on tokens[:limit] (0: none); reads the tree only."""
        depth = 0
        for node in self.walk(key, tokens, limit):
            if node.row is not None and node.is_ready:
                depth = node.depth
        return depth

    def mark_ready(self, node: RadixNode) -> None:
        node.is_ready = True

    def touch(self, node: RadixNode) -> None:
        """Record a hit (a load of node's row)."""
        self._clock += 1
        node.hits += 1
        node.last_access = self._clock

    def check(self) -> None:
        """Validate the invariants (tests): refs equal live paths, rows partition, no empty leaf."""
        rows = [n.row for n in self._snapshots]
        if len(set(rows)) != len(rows) or set(rows) & set(self._free_rows):
            raise AssertionError("a snapshot row is held twice or is both held and free")
        if len(rows) + len(self._free_rows) != self.num_rows:
            raise AssertionError(f"{len(rows)} held + {len(self._free_rows)} free rows != {self.num_rows}")
        for root in self._roots.values():
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                below = sum(c.ref for c in node.children.values())
                if node.ref < below or node.ref < (1 if node.row is not None else 0) or node.ref == 0:
                    raise AssertionError(f"{node}: ref does not cover its children ({below}) and snapshot")
                for token, child in node.children.items():
                    if child.tokens[0] != token or child.parent is not node:
                        raise AssertionError(f"{child} is linked under the wrong token or parent")
                    if child.depth != node.depth + len(child.tokens):
                        raise AssertionError(f"{child} depth does not add up")
                stack.extend(node.children.values())

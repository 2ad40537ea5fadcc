"""Stored states: a finished request's end state kept under an id, so that a later request continues the
conversation from it in O(1) (the Responses API's previous_response_id; docs/responses.md).

A recurrent model's whole conversation is one constant-size state, plus what continuing it exactly needs: the
tokens so far (positions, penalties, the context bound) and the last sampled token, which was never fed. An
entry lives in one tier at a time, least recently used first out:
- device: a row of the pool's store region (engine/state_pool.py), a row-to-row copy in and out;
- host: CPU tensors, up to `host_bytes`;
- disk: one file per state in `directory` (the export format below), up to `disk_bytes`; also what survives a
  restart (at shutdown every entry not on disk is written there). Without a directory, a state pushed out of
  the host tier is dropped.
A continuation loads its state straight from the device or host tier into the request's rows; a state on disk
is read back into the host tier first, in a worker thread (prefetch), so the engine thread never waits on disk.

Entries are keyed by model (a hash of its config, dtype and conversion), adapter (name and a hash of its files)
and tenant (a hash of the cache salt): an id under another key is "not found", exactly like an unknown one.
A routed request's state holds the layers its route runs (and a second row for each layer it repeats); the
route is stored with it and a continuation runs the same route.

Export format (safetensors): tensors `state.<layer>.<name>` (and `lane.<layer>.<name>` for a repeated layer's
second pass) for every layer the route runs, `token_ids` (int64: every token so far, the last one not fed);
metadata `format` = "linrec_state", `format_version` = "1", `model`, `dtype`, `adapter`, `layer_route` (JSON or
""), `salt` (a hash or ""), `num_fed`, `created_at`, `meta` (JSON). Everything but the store's own bookkeeping
runs on the engine thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from linrec.engine.sampling_params import InvalidRequestError
from linrec.engine.state_pool import Rows, StatePool

logger = logging.getLogger(__name__)

FORMAT = "linrec_state"
FORMAT_VERSION = "1"
STATE_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
SUFFIX = ".safetensors"
# Per layer, name -> a CPU tensor (empty for a layer the route skips): a state out of the pool.
HostState = list[dict[str, torch.Tensor]]


class StateNotFoundError(InvalidRequestError):
    """No stored state under this id for this model, adapter and tenant (unknown, expired, deleted, or another
    key's: the same answer, so ids cannot be probed). HTTP 404."""

    def __init__(self, state_id: str, param: str | None = None):
        super().__init__(f"no stored state {state_id!r} for this model and tenant", param, code="state_not_found")


class InvalidStateError(InvalidRequestError):
    """An imported state that is not a linrec state of this model, dtype and shapes (HTTP 400)."""


@dataclass(frozen=True)
class StateKey:
    """Everything besides the tokens a state depends on; a continuation must present the same."""

    model: str  # hash of the served model (config, dtype, conversion, merged adapter)
    adapter: str  # "" for the base model, else "<name>:<hash of its files>"
    salt: str  # "" without a cache salt, else a hash of it


@dataclass(frozen=True)
class StateInfo:
    state_id: str
    num_tokens: int  # conversation tokens so far: every turn's prompt and output
    lora_name: str | None
    layer_route: tuple[int, ...] | None
    tier: str  # "device" | "host" | "disk"
    num_bytes: int
    created_at: float  # unix time
    meta: dict


@dataclass
class StoredState:
    state_id: str
    key: StateKey
    lora_name: str | None
    layer_route: tuple[int, ...] | None
    num_tokens: int
    num_fed: int  # tokens folded into the state: num_tokens - 1 (the last sampled token is fed next turn)
    created_at: float
    meta: dict
    num_bytes: int
    token_ids: list[int] | None = None  # None while only the file has them
    rows: tuple[int, int] | None = None  # device tier: (store row, second-lane store row or 0)
    host: tuple[HostState, HostState | None] | None = None  # host tier: (state, second lanes or None)
    path: Path | None = None  # a file holds it (the disk tier, or a copy of an entry still in memory)
    pins: int = 0  # waiting continuations: never pushed to disk or dropped while > 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def tier(self) -> str:
        return "device" if self.rows is not None else "host" if self.host is not None else "disk"

    def info(self) -> StateInfo:
        return StateInfo(
            self.state_id,
            self.num_tokens,
            self.lora_name,
            self.layer_route,
            self.tier,
            self.num_bytes,
            self.created_at,
            dict(self.meta),
        )


@dataclass
class StoreStats:
    saves: int = 0  # states stored (finished requests, imports, forks)
    resumes: int = 0  # continuations that found their state
    misses: int = 0  # continuations and lookups that did not
    spills_to_host: int = 0  # device -> host
    spills_to_disk: int = 0  # host -> disk
    restores: int = 0  # disk -> host, for a continuation or an export
    drops: int = 0  # pushed out of the host tier with no directory to go to
    expirations: int = 0
    deletions: int = 0


class StateStore:
    def __init__(
        self,
        pool: StatePool,
        model_key: str,
        dtype: torch.dtype,
        num_layers: int,
        directory: str | None = None,
        host_bytes: int = 1 << 30,
        disk_bytes: int = 8 << 30,
        ttl: float = 30 * 24 * 3600.0,
    ):
        self.pool = pool
        self.model_key = model_key
        self.dtype = dtype
        self.num_layers = num_layers
        self.host_bytes = host_bytes
        self.disk_bytes = disk_bytes
        self.ttl = ttl
        self.directory = Path(directory) if directory is not None else None
        self.stats = StoreStats()
        self._entries: dict[str, StoredState] = {}
        # Least recently used first, per tier (disk: entries whose only copy is their file).
        self._device: OrderedDict[str, StoredState] = OrderedDict()
        self._host: OrderedDict[str, StoredState] = OrderedDict()
        self._disk: OrderedDict[str, StoredState] = OrderedDict()
        self._free_rows = list(reversed(pool.store_rows))
        self._lock = threading.RLock()  # prefetch runs in a worker thread; everything else on the engine's
        if self.directory is not None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                probe = self.directory / f".probe.{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise ValueError(
                    f"expected --state-store to be a directory linrec can write, got {str(directory)!r} "
                    f"({exc.strerror or type(exc).__name__})"
                ) from None
            self._scan()

    # -- keys and lookups ------------------------------------------------------------------------------------------

    def key(self, adapter: str | None, cache_salt: str | None) -> StateKey:
        return StateKey(self.model_key, adapter or "", _salt(cache_salt))

    def get(self, state_id: str, cache_salt: str | None = None, param: str | None = None) -> StoredState:
        """The entry under this id for this model and tenant (any adapter), or StateNotFoundError."""
        with self._lock:
            entry = self._entries.get(state_id) if isinstance(state_id, str) else None
            salt = _salt(cache_salt)
            if entry is None or entry.key.model != self.model_key or entry.key.salt != salt or self._expire(entry):
                self.stats.misses += 1
                raise StateNotFoundError(str(state_id), param)
            return entry

    def resume(self, state_id: str, key: StateKey, param: str | None = None) -> StoredState:
        """A continuation's entry (its key must equal the stored one), pinned until the scheduler loads it."""
        with self._lock:
            entry = self._entries.get(state_id) if isinstance(state_id, str) else None
            if entry is None or entry.key != key or self._expire(entry):
                self.stats.misses += 1
                raise StateNotFoundError(str(state_id), param)
            if entry.tier == "disk":
                self._restore(entry)  # AsyncLLM prefetched it in a worker thread; this is the fallback
            entry.pins += 1
            self._touch(entry)
            self.stats.resumes += 1
            return entry

    def prefetch(self, state_id: str) -> None:
        """Read a state on disk into the host tier (thread-safe: AsyncLLM calls it in a worker thread before the
        continuation reaches the engine thread). Unknown ids are left for the engine's refusal."""
        with self._lock:
            entry = self._entries.get(state_id) if isinstance(state_id, str) else None
            if entry is None or entry.tier != "disk" or entry.path is None:
                return
            path = entry.path
        try:
            data = path.read_bytes()
        except OSError:
            return
        with self._lock:
            if self._entries.get(state_id) is entry and entry.tier == "disk":
                self._load_file_bytes(entry, data)

    def _in_memory(self, state_id: str, cache_salt: str | None) -> StoredState:
        """get(), with a state on disk read back into the host tier."""
        entry = self.get(state_id, cache_salt)
        if entry.tier == "disk":
            self._restore(entry)
        return entry

    def unpin(self, entry: StoredState) -> None:
        with self._lock:
            entry.pins -= 1

    def source(self, entry: StoredState) -> tuple[int | HostState, int | HostState | None]:
        """Where a continuation copies its state from now: (device row or host state, its second lanes or None)."""
        if entry.rows is not None:
            return entry.rows[0], entry.rows[1] or None
        if entry.host is None:
            raise RuntimeError(f"stored state {entry.state_id!r} is on disk only; resume() restores it first")
        return entry.host

    # -- saving ----------------------------------------------------------------------------------------------------

    def save(
        self,
        state_id: str,
        key: StateKey,
        token_ids: list[int],
        num_fed: int,
        rows: Rows,
        lane_rows: Rows | None,
        lora_name: str | None,
        layer_route: tuple[int, ...] | None,
        meta: dict | None,
    ) -> StoredState:
        """Keep the state in a request's rows (engine thread, after the step that finished it and before its rows
        are reused). A state already under this id is replaced."""
        with self._lock:
            self._sweep()
            self._remove(state_id)
            entry = StoredState(
                state_id,
                key,
                lora_name,
                layer_route,
                len(token_ids),
                num_fed,
                time.time(),
                dict(meta or {}),
                self._state_bytes(layer_route),
                token_ids=list(token_ids),
            )
            first, second = self._take_rows(2 if layer_route is not None and 2 in layer_route else 1)
            if first:
                self.pool.copy_rows([(rows, first)])
                if second:
                    self.pool.copy_rows([(lane_rows, second)])
                entry.rows = (first, second)
                self._device[state_id] = entry
            else:  # no device rows at all: straight to the host
                entry.host = self._read(rows, lane_rows, layer_route)
                self._host[state_id] = entry
            self._entries[state_id] = entry
            self.stats.saves += 1
            self._fit_host()
            return entry

    def set_meta(self, state_id: str, meta: dict, cache_salt: str | None = None) -> None:
        with self._lock:
            entry = self._in_memory(state_id, cache_salt)  # the file is rewritten with the new meta when it leaves
            entry.meta = dict(meta)
            if entry.path is not None:
                entry.path.unlink(missing_ok=True)
                entry.path = None

    def delete(self, state_id: str, cache_salt: str | None = None) -> None:
        with self._lock:
            self.get(state_id, cache_salt)
            self._remove(state_id)
            self.stats.deletions += 1

    def fork(self, state_id: str, new_id: str, cache_salt: str | None = None, meta: dict | None = None) -> StateInfo:
        """An independent copy under a new id (two continuations, either deletable alone)."""
        with self._lock:
            check_state_id(new_id)
            if new_id in self._entries:
                raise InvalidRequestError(f"expected a new state id, got {new_id!r}, which is in use", "id")
            entry = self._in_memory(state_id, cache_salt)
            state, lanes = self._host_copy(entry)
            copy = StoredState(
                new_id,
                entry.key,
                entry.lora_name,
                entry.layer_route,
                entry.num_tokens,
                entry.num_fed,
                time.time(),
                dict(entry.meta if meta is None else meta),
                entry.num_bytes,
                token_ids=list(entry.token_ids or []),
                host=(state, lanes),
            )
            self._entries[new_id] = copy
            self._host[new_id] = copy
            self.stats.saves += 1
            self._fit_host()
            return copy.info()

    # -- export and import -----------------------------------------------------------------------------------------

    def export(self, state_id: str, cache_salt: str | None = None) -> bytes:
        with self._lock:
            entry = self._in_memory(state_id, cache_salt)
            self._touch(entry)
            return self._serialize(entry)

    def import_state(
        self,
        data: bytes,
        state_id: str,
        cache_salt: str | None = None,
        meta: dict | None = None,
        adapter_key: Any = None,
    ) -> StateInfo:
        """A state exported by export() (of this model, dtype and state shapes) stored under `state_id`.
        adapter_key(name) gives the key of a loaded adapter (None: not loaded). Raises InvalidStateError."""
        check_state_id(state_id)
        header, tensors = _parse(data)
        entry = self._entry_from(header, tensors, state_id)
        if entry.key.salt != _salt(cache_salt):
            raise InvalidStateError("expected the cache_salt the state was exported with (a state is a tenant's)")
        if entry.lora_name is not None:
            expected = adapter_key(entry.lora_name) if adapter_key is not None else None
            if expected != entry.key.adapter:
                raise InvalidStateError(
                    f"expected adapter {entry.lora_name!r} loaded with the same weights the state was made with"
                )
        if meta is not None:
            entry.meta = dict(meta)
        with self._lock:
            if state_id in self._entries:
                raise InvalidRequestError(f"expected a new state id, got {state_id!r}, which is in use", "id")
            entry.created_at = time.time()
            self._entries[state_id] = entry
            self._host[state_id] = entry
            self.stats.saves += 1
            self._fit_host()
            return entry.info()

    # -- shutdown --------------------------------------------------------------------------------------------------

    def flush(self) -> int:
        """Write every entry held only in memory to the directory (shutdown: a restart finds them). Returns how
        many were written."""
        if self.directory is None:
            return 0
        written = 0
        with self._lock:
            for entry in list(self._entries.values()):
                if entry.path is None and entry.key.model == self.model_key and not self._expire(entry):
                    try:
                        self._write(entry)
                    except OSError as exc:
                        logger.warning("linrec: state store cannot write %s (%s)", entry.state_id, exc)
                        continue
                    written += 1
        return written

    # -- accounting ------------------------------------------------------------------------------------------------

    def tier_counts(self) -> dict[str, tuple[int, int]]:
        """tier -> (states, bytes)."""
        with self._lock:
            return {
                name: (len(tier), sum(e.num_bytes for e in tier.values()))
                for name, tier in (("device", self._device), ("host", self._host), ("disk", self._disk))
            }

    def __len__(self) -> int:
        return len(self._entries)

    # -- internals -------------------------------------------------------------------------------------------------

    def _state_bytes(self, layer_route: tuple[int, ...] | None) -> int:
        counts = layer_route or (1,) * self.num_layers
        return sum(count * size for count, size in zip(counts, self.pool.layer_bytes))

    def _take_rows(self, count: int) -> tuple[int, int]:
        """`count` device rows, pushing least recently used entries to the host for them; (0, 0) when the pool
        has fewer store rows than that."""
        if count > len(self.pool.store_rows):
            return 0, 0
        while len(self._free_rows) < count:
            _, victim = self._device.popitem(last=False)
            self._to_host(victim)
        first = self._free_rows.pop()
        second = self._free_rows.pop() if count == 2 else 0
        return first, second

    def _to_host(self, entry: StoredState) -> None:
        first, second = entry.rows
        entry.host = self._host_copy(entry)
        self._free_rows.extend(r for r in (second, first) if r)
        entry.rows = None
        self._device.pop(entry.state_id, None)
        self._host[entry.state_id] = entry
        self.stats.spills_to_host += 1

    def _read(
        self, rows: Rows, lane_rows: Rows | None, layer_route: tuple[int, ...] | None
    ) -> tuple[HostState, HostState | None]:
        """CPU copies of a state in the pool: the layers the route runs, and the second lanes of those it repeats."""
        state = self.pool.read(_mask(rows, layer_route, 1))
        if lane_rows is None or layer_route is None or 2 not in layer_route:
            return state, None
        return state, self.pool.read(_mask(lane_rows, layer_route, 2))

    def _host_copy(self, entry: StoredState) -> tuple[HostState, HostState | None]:
        """A copy of the entry's state on the host (read out of its rows, or cloned from its host tensors)."""
        if entry.rows is not None:
            first, second = entry.rows
            return self._read(first, second or None, entry.layer_route)
        state, lanes = entry.host
        clone = [{k: t.clone() for k, t in layer.items()} for layer in state]
        return clone, [{k: t.clone() for k, t in layer.items()} for layer in lanes] if lanes is not None else None

    def _fit_host(self) -> None:
        """Push least recently used host entries to disk (or drop them) until the host tier fits its bytes."""
        total = sum(e.num_bytes for e in self._host.values())
        for entry in list(self._host.values()):
            if total <= self.host_bytes:
                break
            if entry.pins:
                continue
            total -= entry.num_bytes
            if self.directory is None:
                self._remove(entry.state_id)
                self.stats.drops += 1
                continue
            if entry.path is None:
                try:
                    self._write(entry)
                except OSError as exc:  # a full or broken disk loses this state, not the engine
                    logger.warning("linrec: state store cannot write %s (%s): dropped", entry.state_id, exc)
                    self._remove(entry.state_id)
                    self.stats.drops += 1
                    continue
            entry.host = None
            self._host.pop(entry.state_id)
            self._disk[entry.state_id] = entry
            entry.token_ids = None
            self.stats.spills_to_disk += 1
        self._fit_disk()

    def _fit_disk(self) -> None:
        if self.directory is None:
            return
        total = sum(e.num_bytes for e in self._disk.values())
        for entry in list(self._disk.values()):
            if total <= self.disk_bytes:
                break
            if entry.pins:
                continue
            total -= entry.num_bytes
            self._remove(entry.state_id)
            self.stats.drops += 1

    def _restore(self, entry: StoredState) -> None:
        try:
            data = entry.path.read_bytes()
        except OSError as exc:
            raise StateNotFoundError(entry.state_id) from exc
        self._load_file_bytes(entry, data)

    def _load_file_bytes(self, entry: StoredState, data: bytes) -> None:
        header, tensors = _parse(data)
        loaded = self._entry_from(header, tensors, entry.state_id)
        entry.host, entry.token_ids = loaded.host, loaded.token_ids
        self._disk.pop(entry.state_id, None)
        self._host[entry.state_id] = entry
        self.stats.restores += 1
        self._fit_host()

    def _touch(self, entry: StoredState) -> None:
        entry.last_used = time.monotonic()
        for tier in (self._device, self._host, self._disk):
            if entry.state_id in tier:
                tier.move_to_end(entry.state_id)

    def _expire(self, entry: StoredState) -> bool:
        if time.time() - entry.created_at <= self.ttl:
            return False
        if not entry.pins:
            self._remove(entry.state_id)
            self.stats.expirations += 1
        return True

    def _sweep(self) -> None:
        now = time.time()
        for entry in [e for e in self._entries.values() if now - e.created_at > self.ttl and not e.pins]:
            self._remove(entry.state_id)
            self.stats.expirations += 1

    def _remove(self, state_id: str) -> None:
        entry = self._entries.pop(state_id, None)
        if entry is None:
            return
        for tier in (self._device, self._host, self._disk):
            tier.pop(state_id, None)
        if entry.rows is not None:
            if entry.pins:  # a waiting continuation loads it later: it keeps a host copy
                entry.host = self._host_copy(entry)
            self._free_rows.extend(r for r in entry.rows if r)
            entry.rows = None
        if entry.path is not None:
            entry.path.unlink(missing_ok=True)
            entry.path = None

    def _write(self, entry: StoredState) -> None:
        if entry.tier == "disk":
            return
        data = self._serialize(entry)
        path = self.directory / f"{entry.state_id}{SUFFIX}"
        staging = self.directory / f".{entry.state_id}.{os.getpid()}.tmp"
        staging.write_bytes(data)
        os.replace(staging, path)
        entry.path = path

    def _serialize(self, entry: StoredState) -> bytes:
        from safetensors.torch import save

        state, lanes = self._host_copy(entry) if entry.rows is not None else entry.host
        tensors: dict[str, torch.Tensor] = {"token_ids": torch.tensor(entry.token_ids, dtype=torch.int64)}
        for prefix, layers in (("state", state), ("lane", lanes or [])):
            for index, layer in enumerate(layers):
                for name, tensor in layer.items():
                    tensors[f"{prefix}.{index}.{name}"] = tensor.contiguous()
        return save(tensors, metadata=self._metadata(entry))

    def _metadata(self, entry: StoredState) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": entry.key.model,
            "dtype": str(self.dtype).removeprefix("torch."),
            "adapter": entry.key.adapter,
            "lora_name": entry.lora_name or "",
            "layer_route": json.dumps(list(entry.layer_route)) if entry.layer_route is not None else "",
            "salt": entry.key.salt,
            "num_fed": str(entry.num_fed),
            "num_tokens": str(entry.num_tokens),
            "created_at": repr(entry.created_at),
            "meta": json.dumps(entry.meta),
        }

    def _entry_from(self, header: dict[str, str], tensors: dict[str, torch.Tensor] | None, state_id: str):
        """An entry from a file's or an import's metadata (and tensors, checked against this model's state)."""
        if header.get("format") != FORMAT:
            raise InvalidStateError(
                f"expected a linrec state (metadata format {FORMAT!r}), got {header.get('format')!r}"
            )
        if header.get("format_version") != FORMAT_VERSION:
            raise InvalidStateError(
                f"expected state format version {FORMAT_VERSION}, got {header.get('format_version')!r}"
            )
        if header.get("model") != self.model_key:
            raise InvalidStateError(
                f"expected a state of this model ({self.model_key}), got one of {header.get('model')!r}"
            )
        dtype = str(self.dtype).removeprefix("torch.")
        if header.get("dtype") != dtype:
            raise InvalidStateError(f"expected a state in {dtype}, got {header.get('dtype')!r}")
        try:
            route = tuple(int(c) for c in json.loads(header["layer_route"])) if header.get("layer_route") else None
            num_fed, num_tokens = int(header["num_fed"]), int(header["num_tokens"])
            created_at = float(header["created_at"])
            meta = json.loads(header.get("meta") or "{}")
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidStateError(f"expected the state's metadata fields, got a broken one ({exc})") from None
        if route is not None and (len(route) != self.num_layers or any(c not in (0, 1, 2) for c in route)):
            raise InvalidStateError(f"expected a layer route of {self.num_layers} counts in {{0, 1, 2}}, got {route}")
        if not isinstance(meta, dict) or num_fed != num_tokens - 1 or num_fed < 0:
            raise InvalidStateError("expected num_fed = num_tokens - 1 and a JSON object as meta")
        key = StateKey(header["model"], header.get("adapter", ""), header.get("salt", ""))
        entry = StoredState(
            state_id,
            key,
            header.get("lora_name") or None,
            route,
            num_tokens,
            num_fed,
            created_at,
            meta,
            self._state_bytes(route),
        )
        if tensors is not None:
            entry.host = self._check_tensors(tensors, route)
            token_ids = tensors.get("token_ids")
            if token_ids is None or token_ids.dtype != torch.int64 or token_ids.shape != (num_tokens,):
                raise InvalidStateError(f"expected token_ids, int64 [{num_tokens}]")
            entry.token_ids = token_ids.tolist()
        return entry

    def _check_tensors(self, tensors: dict[str, torch.Tensor], route) -> tuple[HostState, HostState | None]:
        counts = route or (1,) * self.num_layers
        spec = self.pool.state_spec
        expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"token_ids": ((), torch.int64)}
        for index, (count, layer) in enumerate(zip(counts, spec)):
            for prefix in ("state", "lane")[:count]:
                for name, s in layer.items():
                    expected[f"{prefix}.{index}.{name}"] = (tuple(s.shape), s.dtype)
        for name in tensors:
            if name not in expected:
                raise InvalidStateError(f"expected only this model's state tensors, got {name!r}")
        state: HostState = [{} for _ in counts]
        lanes: HostState = [{} for _ in counts]
        for name, (shape, dtype) in expected.items():
            if name == "token_ids":
                continue
            tensor = tensors.get(name)
            if tensor is None:
                raise InvalidStateError(f"expected tensor {name!r}, which is missing")
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise InvalidStateError(
                    f"expected {name!r} {str(dtype).removeprefix('torch.')} {list(shape)}, got "
                    f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"
                )
            prefix, index, key = name.split(".", 2)
            (state if prefix == "state" else lanes)[int(index)][key] = tensor
        return state, lanes if 2 in counts else None

    def _scan(self) -> None:
        """Index the directory's states (a restart): metadata only; tensors are read when a state is used."""
        for path in sorted(self.directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime):
            state_id = path.name[: -len(SUFFIX)]
            try:
                with path.open("rb") as f:
                    header = _read_header(f.read(8), f)
                entry = self._entry_from(header, None, state_id)
            except (OSError, InvalidStateError, ValueError) as exc:
                logger.warning("linrec: state store skips %s: %s", path, exc)
                continue
            if not STATE_ID.match(state_id):
                continue
            entry.path = path
            entry.num_bytes = path.stat().st_size
            self._entries[state_id] = entry
            self._disk[state_id] = entry
        self._fit_disk()


SAMPLE_BYTES = 1 << 20  # a large file is hashed by its size and its first and last MiB


def fingerprint_files(path: str | Path, names: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> str:
    """A short hash of what a model or adapter directory holds (or one file): config and small files whole,
    weights files by size and their first and last MiB (cheap at start-up, and different weights differ there),
    plus `extra` strings. Names, if given, add these files of the directory to its weights files."""
    path = Path(path)
    digest = hashlib.sha256("\0".join(extra).encode())
    if path.is_file():
        files = [path]
    else:
        wanted = set(names)
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and (p.name in wanted or p.suffix in (".safetensors", ".bin", ".json"))
        )
        if names:
            files = [p for p in files if p.name in wanted or p.suffix in (".safetensors", ".bin")]
    for file in files:
        size = file.stat().st_size
        digest.update(f"\0{file.name}\0{size}\0".encode())
        with file.open("rb") as f:
            if size <= 2 * SAMPLE_BYTES:
                digest.update(f.read())
            else:
                digest.update(f.read(SAMPLE_BYTES))
                f.seek(size - SAMPLE_BYTES)
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:24]


def check_state_id(state_id: str) -> None:
    if not isinstance(state_id, str) or not STATE_ID.match(state_id):
        raise InvalidRequestError(
            f"expected a state id of 1 to 128 letters, digits, '_', '-' or '.', got {state_id!r}", "id"
        )


def _mask(rows: Rows | None, layer_route: tuple[int, ...] | None, at_least: int) -> Rows:
    """Rows restricted to the layers whose count is at least `at_least` (all layers without a route)."""
    if layer_route is None:
        return rows
    return tuple(
        (rows if isinstance(rows, int) else rows[layer]) if count >= at_least else 0
        for layer, count in enumerate(layer_route)
    )


def _salt(cache_salt: str | None) -> str:
    """A tenant's key: a hash of its cache salt ("" without one), so that no salt is stored or exported."""
    return hashlib.sha256(cache_salt.encode()).hexdigest()[:32] if cache_salt is not None else ""


def _read_header(prefix: bytes, stream) -> dict[str, str]:
    if len(prefix) != 8:
        raise InvalidStateError("expected a safetensors file, got fewer than 8 bytes")
    (size,) = struct.unpack("<Q", prefix)
    if size > 100_000_000:
        raise InvalidStateError("expected a safetensors header under 100 MB")
    raw = stream.read(size)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidStateError("expected a safetensors file (its header is not JSON)") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise InvalidStateError("expected a safetensors file with linrec's metadata, got none")
    return metadata


def _parse(data: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    import io

    from safetensors.torch import load

    if not isinstance(data, bytes | bytearray):
        raise InvalidStateError("expected the state as bytes")
    header = _read_header(bytes(data[:8]), io.BytesIO(bytes(data[8:])))
    try:
        tensors = load(bytes(data))
    except Exception as exc:  # safetensors' own errors: a truncated or corrupt body
        raise InvalidStateError(f"expected a readable safetensors body ({type(exc).__name__})") from None
    return header, tensors

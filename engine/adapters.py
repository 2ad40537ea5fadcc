"""Adapters served per request: the registry of known adapters with its host tier, and LoRA's device slots.

One registry serves both kinds; the kind is read from the adapter's adapter_config.json (peft_type LORA, or
SHIRA / LINREC_SPARSE for sparse adapters, which engine/sparse_switch.py scatters into the weights).

Three tiers, as vLLM has them:
- known: every adapter registered by name (--lora-modules, /v1/load_lora_adapter, an LLM's lora_request),
  with its directory; a request names one of these or the base model;
- host: the last `max_cpu_loras` adapters read from disk, placed on the model's projections (LRU). A known
  adapter that fell out is read again by whoever needs it next, in the caller's thread, never the engine's;
- device: `max_loras` adapter slots beside every projection's weight (models/layers.Projection). The
  scheduler owns them (AdapterSlots): a request is admitted only once its adapter holds a slot, pinned
  until it finishes; a slot no running request pins is reused, least recently used first, and the runner
  copies the adapter into it before the step's forward. A request never waits behind another's load: a
  disk read happens in its own caller's thread, and a slot copy is a few small host-to-device copies.

Unloading a name forgets it (new requests for it get 404) but the requests already holding its weights
run to their end on them: a request keeps its LoraWeights, and the slot it pins keeps them resident.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from linrec.models.lora import LoraWeights, place_lora_adapter, read_lora_adapter
from linrec.models.sparse import SparseWeights, adapter_kind, read_sparse_adapter

Adapter = LoraWeights | SparseWeights


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's LoRARequest: an adapter by name and local directory. lora_int_id is accepted for vLLM callers;
    linrec keys adapters by name."""

    lora_name: str
    lora_int_id: int = 0
    lora_path: str = ""


class AdapterNotFoundError(KeyError):
    """A request or an unload named an adapter the engine does not know (HTTP 404)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "adapter not found"


class AdapterExistsError(ValueError):
    """A load named an adapter that is already loaded (HTTP 400, as vLLM answers)."""


@dataclass(frozen=True)
class AdapterInfo:
    """One known adapter, as /v1/models lists it."""

    name: str
    path: str
    uid: int  # registration number: a name unloaded and loaded again is a new adapter
    kind: str = "lora"  # "lora" | "shira" | "sparse_delta"


class AdapterRegistry:
    """Known adapters and the host tier. Thread-safe: server handlers and LLM callers load and read adapters in
    their own threads while the engine thread resolves names."""

    def __init__(self, projections: dict[str, tuple[int, int]], max_rank: int, dtype: torch.dtype, max_cpu_loras: int):
        if max_cpu_loras < 1:
            raise ValueError(f"expected max_cpu_loras >= 1, got {max_cpu_loras}")
        self.projections = projections  # module name -> (in_features, out_features)
        self.max_rank = max_rank
        self.dtype = dtype
        self.max_cpu_loras = max_cpu_loras
        self._known: dict[str, AdapterInfo] = {}
        self._host: OrderedDict[int, Adapter] = OrderedDict()  # uid -> weights, least recently used first
        self._lock = threading.Lock()
        self._next_uid = 1

    def read(self, name: str, path: str | Path, uid: int = 0) -> Adapter:
        """Read and place an adapter directory of either kind (no registration). Raises FileNotFoundError or
        ValueError with one line saying what was expected."""
        if adapter_kind(path) == "lora":
            weights = place_lora_adapter(read_lora_adapter(path), name, self.projections, self.max_rank, self.dtype)
        else:
            weights = read_sparse_adapter(path, name, self.projections)
        return dataclasses.replace(weights, uid=uid)

    def load(self, name: str, path: str | Path) -> AdapterInfo:
        """Register `name` -> `path` after reading it (in the caller's thread). Raises AdapterExistsError for a
        name already loaded, FileNotFoundError / ValueError for a directory that is not a servable adapter."""
        if not name or not isinstance(name, str):
            raise ValueError(f"expected a non-empty adapter name, got {name!r}")
        with self._lock:
            if name in self._known:
                raise AdapterExistsError(f"The lora adapter '{name}' has already been loaded.")
        weights = self.read(name, path)
        with self._lock:
            if name in self._known:  # a concurrent load of the same name won
                raise AdapterExistsError(f"The lora adapter '{name}' has already been loaded.")
            kind = weights.kind if isinstance(weights, SparseWeights) else "lora"
            info = AdapterInfo(name, str(path), self._next_uid, kind)
            self._next_uid += 1
            self._known[name] = info
            self._put_host(dataclasses.replace(weights, uid=info.uid))
        return info

    def unload(self, name: str) -> None:
        """Forget `name`: new requests for it are refused; running ones keep their weights to the end."""
        with self._lock:
            info = self._known.pop(name, None)
            if info is None:
                raise AdapterNotFoundError(f"The lora adapter '{name}' cannot be found.")
            self._host.pop(info.uid, None)

    def get(self, name: str) -> Adapter:
        """The weights of a known adapter: from the host tier, else read again from its directory (in the
        caller's thread) and kept as most recently used. Raises AdapterNotFoundError."""
        with self._lock:
            info = self._known.get(name)
            if info is None:
                raise AdapterNotFoundError(f"The lora adapter '{name}' cannot be found.")
            weights = self._host.get(info.uid)
            if weights is not None:
                self._host.move_to_end(info.uid)
                return weights
        weights = self.read(name, info.path, info.uid)
        with self._lock:
            if self._known.get(name) == info:
                self._put_host(weights)
        return weights

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return list(self._known.values())

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._known

    @property
    def num_host(self) -> int:
        with self._lock:
            return len(self._host)

    def _put_host(self, weights: Adapter) -> None:
        self._host[weights.uid] = weights
        self._host.move_to_end(weights.uid)
        while len(self._host) > self.max_cpu_loras:
            self._host.popitem(last=False)


class AdapterSlots:
    """The scheduler's device adapter slots: which adapter each holds and how many requests pin it."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.uids: list[int | None] = [None] * num_slots  # adapter uid held by each slot (None: empty)
        self.names: list[str | None] = [None] * num_slots
        self.pins: list[int] = [0] * num_slots  # requests (samples) running on each slot's adapter
        self._last_used: list[int] = [0] * num_slots
        self._clock = 0

    def acquire(self, weights: LoraWeights, count: int = 1) -> tuple[int, bool] | None:
        """Pin a slot holding `weights` for `count` samples: (slot, whether the runner must copy it in first),
        or None when every slot is pinned by other adapters (the request waits, holding nothing)."""
        self._clock += 1
        if weights.uid in self.uids:
            slot = self.uids.index(weights.uid)
            self.pins[slot] += count
            self._last_used[slot] = self._clock
            return slot, False
        free = [s for s in range(self.num_slots) if self.pins[s] == 0]
        if not free:
            return None
        slot = min(free, key=lambda s: (self.uids[s] is not None, self._last_used[s]))  # empty, else LRU
        self.uids[slot], self.names[slot] = weights.uid, weights.name
        self.pins[slot] = count
        self._last_used[slot] = self._clock
        return slot, True

    def can_acquire(self, weights: LoraWeights) -> bool:
        return weights.uid in self.uids or any(p == 0 for p in self.pins)

    def release(self, slot: int) -> None:
        if self.pins[slot] <= 0:
            raise ValueError(f"adapter slot {slot} released more often than acquired")
        self.pins[slot] -= 1

    def running_names(self) -> list[str]:
        return sorted({n for n, p in zip(self.names, self.pins) if p > 0 and n is not None})

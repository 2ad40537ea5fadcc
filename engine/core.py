"""EngineCore: owns the model, the state pool, the scheduler and the runner; one step at a time."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

import torch

from linrec.engine.adapters import AdapterRegistry, AdapterSlots
from linrec.engine.config import EngineConfig
from linrec.engine.cuda_graphs import DecodeGraphs
from linrec.engine.output import OutputProcessor, SampleDelta
from linrec.engine.prefix_cache import PrefixCache, PrefixKey
from linrec.engine.request import EngineRequest, Request, RequestStatus
from linrec.engine.runner import Runner
from linrec.engine.sampling_params import InvalidRequestError
from linrec.engine.scheduler import Scheduler
from linrec.engine.sparse_switch import SparseSwitch
from linrec.engine.state_pool import StatePool, num_slots_for_budget
from linrec.engine.state_store import StateInfo, StateStore, check_state_id, fingerprint_files
from linrec.engine.warmup import warm_up
from linrec.kernels.toolchain import current_compile_watch
from linrec.models.lora import LoraWeights
from linrec.models.sparse import SparseWeights

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available")
    return torch.device(device)


def eos_token_ids_of(tokenizer, model) -> tuple[int, ...]:
    """EOS ids from the tokenizer and from the model's config (Llama-3 lists several)."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(model.config, "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, list | tuple):
        ids.update(int(t) for t in config_eos)
    return tuple(sorted(ids))


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics; read from another thread, so each count may be one step stale."""

    num_running: int  # requests holding a slot
    num_waiting: int  # requests queued for a slot
    num_slots_used: int  # requests holding state (a slot, or a routed request's rows)
    num_slots_total: int  # request rows of each layer: requests without a route that can run at once
    state_bytes_per_request: int  # constant in context length
    # Prefix-state cache (zeros when it is off); counters are cumulative.
    prefix_cache_queries: int = 0  # prompts looked up
    prefix_cache_hits: int = 0  # prompts that loaded a snapshot
    prefix_cache_query_tokens: int = 0  # prompt tokens looked up
    prefix_cache_hit_tokens: int = 0  # prompt tokens loaded instead of prefilled (prefill saved)
    prefill_tokens_computed: int = 0  # prompt tokens fed to the model
    prefix_cache_states: int = 0  # snapshots held
    prefix_cache_state_bytes: int = 0  # their bytes
    prefix_cache_rows_total: int = 0  # snapshot rows in the pool
    prefix_cache_saves: int = 0  # snapshots taken
    prefix_cache_evictions: int = 0  # snapshots evicted
    # Fault isolation (cumulative, but num_quarantined): see EngineCore.step.
    num_step_failures: int = 0  # engine steps that raised and were recovered from
    num_failed_requests: int = 0  # samples ended with an error (500) because a failure was traced to them
    num_quarantined: int = 0  # requests whose state is being rebuilt after a failed step (now)
    # Triton kernels compiled after the warm-up (kernels/toolchain.py's watch, process-wide): each one is a
    # request that waited on the compiler, a bug in engine/warmup.py's coverage. 0 where Triton never loaded.
    num_kernel_compilations_after_warmup: int = 0
    # LoRA (vLLM's lora_requests_info): adapter names with running / waiting requests, and the device slots.
    running_lora_adapters: tuple[str, ...] = ()
    waiting_lora_adapters: tuple[str, ...] = ()
    max_lora: int = 0
    # Sparse adapters (cumulative): scatters into and restores of the weights, and steps that mixed a sparse
    # adapter with other weights (its tokens got the per-token add-on).
    num_sparse_switches: int = 0
    num_sparse_mixed_steps: int = 0
    # Layer routes (cumulative, per token fed): layers skipped and layers run a second time.
    num_layer_passes_skipped: int = 0
    num_layer_passes_repeated: int = 0
    # Request rows summed over layers: held (a routed request holds one per layer it executes, two per layer it
    # repeats, none where it skips) and in the pool, and the bytes the held ones take.
    num_state_rows_used: int = 0
    num_state_rows_total: int = 0
    state_bytes_used: int = 0
    # Stored states (engine/state_store.py): per tier (device, host, disk), (states, bytes); and the store's
    # cumulative counters (StoreStats: saves, resumes, misses, spills, restores, drops, expirations, deletions).
    stored_states: dict = field(default_factory=dict)
    state_store_counts: dict = field(default_factory=dict)


# A checkpoint without max_position_embeddings (Mamba2, fla's GLA and Gated DeltaNet) gets this default
# max_model_len. States do not grow with length, but prefill time does: the default bounds one request's
# work, and --max-model-len raises it without limit.
DEFAULT_MAX_MODEL_LEN = 32768


def resolve_max_model_len(configured: int | None, hf_config: dict) -> int:
    """The engine's max_model_len: the configured one, else the checkpoint's max_position_embeddings (what
    it was trained for, vLLM's default too), else DEFAULT_MAX_MODEL_LEN."""
    if configured is not None:
        return configured
    trained = hf_config.get("max_position_embeddings")
    if isinstance(trained, int) and not isinstance(trained, bool) and trained >= 2:
        return trained
    return DEFAULT_MAX_MODEL_LEN


class EngineCore:
    def __init__(self, config: EngineConfig, progress: bool = False):
        from linrec.models.demo import default_model_path
        from linrec.models.loader import load_model, read_hf_config
        from linrec.models.tokenizer import load_tokenizer

        self.config = config
        self.device = resolve_device(config.device)
        self.model_path = str(config.model) if config.model is not None else str(default_model_path())
        self.model = load_model(
            self.model_path,
            dtype=config.dtype,
            device=self.device,
            kernel_backend=config.kernel_backend,
            linearize=config.linearize,
            merge_lora=config.merge_lora,
            progress=progress,
        )
        if config.router is not None:  # routers that decide layer_route "auto" (models/router.py)
            from linrec.models.router import load_routers

            self.model.routers = load_routers(
                config.router, len(self.model.decoder_layers()), self.model.config.hidden_size, self.device
            )
        # Per-request LoRA: device slots beside every projection (zeros until an adapter lands) and the registry.
        self.adapters: AdapterRegistry | None = None
        if config.enable_lora:
            self.model.enable_lora(config.max_loras, config.max_lora_rank)
            self.adapters = AdapterRegistry(
                {name: (m.in_features, m.out_features) for name, m in self.model.projections().items()},
                config.max_lora_rank,
                next(self.model.parameters()).dtype,
                config.max_cpu_loras or config.max_loras,
            )
        self.tokenizer = load_tokenizer(self.model_path)
        self.vocab_size = self.model.config.vocab_size
        self.max_model_len = resolve_max_model_len(config.max_model_len, read_hf_config(self.model_path))
        bytes_per_request = self.bytes_per_request = self.model.state_bytes_per_request()
        # One budget buys rows: running slots first, then prefix snapshot rows, then stored states' rows.
        num_rows = num_slots_for_budget(config.state_memory, bytes_per_request, self.device)
        num_slots = min(config.max_num_seqs, num_rows)
        # Rows beyond one per running request, for the second passes of routes that repeat a layer (docs/routing.md).
        num_slots += min(num_rows - num_slots, config.route_state_rows)
        num_snapshot_rows = min(num_rows - num_slots, config.max_cached_states) if config.enable_prefix_caching else 0
        # Stored states' device rows from what is left (without any, they go straight to host memory).
        num_store_rows = min(num_rows - num_slots - num_snapshot_rows, config.max_device_states)
        self.pool = StatePool(
            self.model, num_slots, self.device, num_snapshot_rows=num_snapshot_rows, num_store_rows=num_store_rows
        )
        self.eos_token_ids = eos_token_ids_of(self.tokenizer, self.model)
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self.model_key = f"{self.model_path}|{dtype}|{config.linearize}|{config.merge_lora}"
        # Stored states outlive the process: their model key hashes what the weights and states are (the config,
        # dtype, conversion, merged adapter's files), not where the checkpoint lies.
        self._adapter_keys: dict[tuple[str, int], str] = {}
        self.states = StateStore(
            self.pool,
            fingerprint_files(self.model_path, ("config.json",), extra=(dtype, str(config.linearize)))
            + (f"+{fingerprint_files(config.merge_lora)}" if config.merge_lora else ""),
            next(self.model.parameters()).dtype,
            len(self.model.decoder_layers()),
            directory=config.state_store,
            host_bytes=config.state_store_host_bytes,
            disk_bytes=config.state_store_max_bytes,
            ttl=config.state_ttl,
        )
        self.num_slots = num_slots
        self.num_step_failures = 0  # steps whose execution raised (each recovered from)
        self.num_failed_requests = 0  # requests ended with an error (traced to them, or lost in a reset)
        self._new_scheduler()
        decode_graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            decode_graphs = DecodeGraphs(
                self.model,
                self.pool,
                self.device,
                min(config.max_num_seqs, num_slots),
                num_adapter_slots=config.max_loras if config.enable_lora else 0,
            )
            decode_graphs.capture()
        self.runner = Runner(
            self.model,
            self.pool,
            self.device,
            self.vocab_size,
            self.eos_token_ids,
            config.seed,
            decode_graphs,
            num_adapter_slots=config.max_loras if config.enable_lora else 0,
            sparse_switch=SparseSwitch(self.model.projections(), self.device, config.max_loras)
            if config.enable_lora
            else None,
        )
        # Every kernel a request can reach is compiled and tuned before the engine reports ready.
        self.warmup_report = warm_up(self, progress=progress)
        logger.info(
            "linrec engine: %s on %s, %d state slots + %d prefix snapshot rows x %d bytes (constant per request)",
            self.model_path,
            self.device,
            num_slots,
            num_snapshot_rows,
            bytes_per_request,
        )

    def _new_scheduler(self) -> None:
        """A scheduler, prefix cache and output processor with nothing in them (start-up, or a reset)."""
        config = self.config
        self.prefix_cache = (
            PrefixCache(self.pool.snapshot_rows, self.bytes_per_request) if config.enable_prefix_caching else None
        )
        self.scheduler = Scheduler(
            num_slots=self.num_slots,
            # Requests without a route are bounded by the slots; routed ones by the rows their routes need.
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_waiting_requests=config.max_waiting_requests,
            eos_token_ids=self.eos_token_ids,
            prefix_cache=self.prefix_cache,
            group_prefixes=config.prefix_grouping,
            long_prefill_token_threshold=config.long_prefill_token_threshold,
            max_long_partial_prefills=config.max_long_partial_prefills,
            adapter_slots=AdapterSlots(config.max_loras) if config.enable_lora else None,
            num_layers=len(self.model.decoder_layers()),
            state_store=self.states,
        )
        self.outputs = OutputProcessor(self.tokenizer)

    def add_request(self, request: EngineRequest) -> None:
        """Validate and queue one prompt (with its n-1 forks). Raises InvalidRequestError, AdapterNotFoundError
        (an unknown adapter name) or QueueFullError; nothing is queued then."""
        prompt = self.validate(request)
        params = request.sampling_params
        adapter = self.resolve_adapter(request.lora_name)
        auto = request.layer_route == "auto"
        route = None if auto else request.layer_route
        route = tuple(int(r) for r in route) if route is not None and any(r != 1 for r in route) else None
        resume = None
        if request.resume_state is not None:
            # A continuation: the stored conversation comes first, its state is loaded at admission, and only the
            # last stored token and the new ones are fed. It runs the stored route ("auto" decided it already).
            resume = self._resume(request, adapter, None if auto else route, prompt)
            route, auto, prompt = resume.layer_route, False, [*resume.token_ids, *prompt]
        key = None
        # A repeated layer's second lane is a state row of its own, which snapshots do not hold, and a route the
        # routers decide is not known before the prompt runs: neither is cached.
        if self.prefix_cache is not None and not auto and (route is None or 2 not in route) and resume is None:
            key = PrefixKey(
                self.model_key,
                adapter=f"{adapter.name}#{adapter.uid}" if adapter is not None else None,
                layer_route=route,  # all-ones is no route: the same states, the same key
                cache_salt=request.cache_salt,
            )
        request_id = request.request_id
        # LoRA adds a term per token; a sparse adapter is scattered into the weights for a step of its requests
        # alone, and added per token otherwise
        kinds = {"sparse": adapter} if isinstance(adapter, SparseWeights) else {"lora": adapter}
        kinds["layer_route"] = route
        kinds["auto_route_bias"] = float(request.route_skip_bias) if auto else None
        parent = Request(request_id, prompt, params, cache_key=key, **kinds)
        parent.resume, parent.store_id, parent.state_meta = resume, request.store_state, request.state_meta
        if request.store_state is not None:
            parent.store_key = self.states.key(self._adapter_key(adapter), request.cache_salt)
        parent.children = [
            Request(f"{request_id}#{i}", prompt, params, sample_index=i, parent_id=request_id, cache_key=key, **kinds)
            for i in range(1, params.n)
        ]
        # Outputs first: a request the scheduler holds always has somewhere to stream to.
        self.outputs.add(parent)
        try:
            self.scheduler.add_request(parent)
        except BaseException:
            self.outputs.abort([parent.request_id, *(c.request_id for c in parent.children)])
            if resume is not None:
                self.states.unpin(resume)
            raise

    def _resume(self, request: EngineRequest, adapter, route: tuple[int, ...] | None, prompt: list[int]):
        """A continuation's stored state, pinned (the caller unpins it if the request is not queued after all),
        checked against the request: the same route (or none given), and the conversation within max_model_len."""
        resume = self.states.resume(
            request.resume_state, self.states.key(self._adapter_key(adapter), request.cache_salt), "resume_state"
        )
        try:
            if request.layer_route not in (None, "auto") and route != resume.layer_route:
                raise InvalidRequestError(
                    f"expected the stored state's layer route {list(resume.layer_route or [])} (or none given), got "
                    f"{list(request.layer_route)}",
                    "layer_route",
                )
            num_tokens = len(resume.token_ids) + len(prompt)
            if num_tokens + request.sampling_params.max_tokens > self.max_model_len:
                raise InvalidRequestError(
                    f"the conversation has {num_tokens} tokens and max_tokens is {request.sampling_params.max_tokens}; "
                    f"this model's maximum context length is {self.max_model_len} tokens (max_model_len)",
                    "max_tokens",
                    code="context_length_exceeded",
                )
        except InvalidRequestError:
            self.states.unpin(resume)
            raise
        return resume

    def _adapter_key(self, adapter: LoraWeights | SparseWeights | None) -> str | None:
        """A stored state's adapter key: its name and a hash of its files (the same after a restart or a reload
        of the same files; another adapter under the same name is another key)."""
        if adapter is None:
            return None
        cached = self._adapter_keys.get((adapter.name, adapter.uid))
        if cached is None:
            info = next((i for i in self.adapters.list() if i.uid == adapter.uid), None)
            digest = fingerprint_files(info.path) if info is not None else f"uid{adapter.uid}"
            cached = self._adapter_keys[(adapter.name, adapter.uid)] = f"{adapter.name}:{digest}"
        return cached

    def adapter_key_by_name(self, lora_name: str) -> str | None:
        """The stored-state key of a loaded adapter by name (None when it is not loaded)."""
        try:
            return self._adapter_key(self.resolve_adapter(lora_name))
        except Exception:  # noqa: BLE001 -- not loaded, or no adapters: no key
            return None

    # -- stored states (engine thread; AsyncLLM runs these through its command queue) -----------------------

    def state_info(self, state_id: str, cache_salt: str | None = None) -> StateInfo:
        return self.states.get(state_id, cache_salt).info()

    def delete_state(self, state_id: str, cache_salt: str | None = None) -> None:
        self.states.delete(state_id, cache_salt)

    def set_state_meta(self, state_id: str, meta: dict, cache_salt: str | None = None) -> None:
        self.states.set_meta(state_id, meta, cache_salt)

    def export_state(self, state_id: str, cache_salt: str | None = None) -> bytes:
        return self.states.export(state_id, cache_salt)

    def import_state(
        self, data: bytes, state_id: str, cache_salt: str | None = None, meta: dict | None = None
    ) -> StateInfo:
        return self.states.import_state(data, state_id, cache_salt, meta, self.adapter_key_by_name)

    def fork_state(
        self, state_id: str, new_state_id: str, cache_salt: str | None = None, meta: dict | None = None
    ) -> StateInfo:
        return self.states.fork(state_id, new_state_id, cache_salt, meta)

    def close(self) -> None:
        """Write every stored state held only in memory to --state-store (shutdown; a restart finds them)."""
        written = self.states.flush()
        if written:
            logger.info("linrec: wrote %d stored state(s) to %s", written, self.config.state_store)

    def _store_states(self) -> None:
        """Keep the end states of the requests that completed with store_state (after a step: their rows are
        not reused before the next schedule())."""
        for request, rows, lane_rows in self.scheduler.take_state_saves():
            tokens = request.prompt_token_ids + request.output_token_ids
            if request.num_computed_tokens != len(tokens) - 1:  # every token but the last sampled one is fed
                logger.error("linrec: not storing %s: its state is not at its last token", request.request_id)
                continue
            adapter = request.lora if request.lora is not None else request.sparse
            try:
                self.states.save(
                    request.store_id,
                    request.store_key,
                    tokens,
                    request.num_computed_tokens,
                    rows,
                    lane_rows,
                    adapter.name if adapter is not None else None,
                    request.layer_route,
                    request.state_meta,
                )
            except Exception:  # noqa: BLE001 -- the request is answered; only its next turn will not find it
                logger.exception("linrec: storing the state of %s failed", request.request_id)

    def resolve_adapter(self, lora_name: str | None) -> LoraWeights | SparseWeights | None:
        """The LoraWeights or SparseWeights of a known adapter name (None for the base model). Thread-safe (the
        registry locks): AsyncLLM calls it in a worker thread first, so that on the engine thread it is a
        host-tier hit and no disk read happens there."""
        if lora_name is None:
            return None
        if self.adapters is None:
            raise InvalidRequestError(
                f"the request names LoRA adapter {lora_name!r}, but this engine serves no adapters (--enable-lora)",
                "model",
            )
        return self.adapters.get(lora_name)

    def validate(self, request: EngineRequest) -> list[int]:
        """Check everything an engine step will index or size for this request, so that no step can fail on
        it later; returns the prompt as a list of ints. The one place these checks live: the server's requests
        reach them too. Raises InvalidRequestError naming the field."""
        params = request.sampling_params
        if request.resume_state is not None and not isinstance(request.resume_state, str):
            raise InvalidRequestError(f"expected a stored state id, got {request.resume_state!r}", "resume_state")
        if not request.prompt_token_ids and request.resume_state is None:  # a continuation may add nothing
            raise InvalidRequestError("expected a non-empty prompt, got 0 tokens", "prompt")
        if request.store_state is not None:
            try:
                check_state_id(request.store_state)
            except InvalidRequestError as exc:
                raise InvalidRequestError(str(exc), "store_state") from None
            if params.n != 1:
                raise InvalidRequestError(
                    f"expected n=1 to store the end state (one state per id), got n={params.n}", "store_state"
                )
        if request.state_meta is not None and not isinstance(request.state_meta, dict):
            raise InvalidRequestError(f"expected state_meta as a dict, got {type(request.state_meta).__name__}")
        prompt = [int(t) for t in request.prompt_token_ids]
        vocab = self.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"expected token ids in [0, {vocab}), got {bad[0]}", "prompt")
        limit = self.max_model_len
        if len(prompt) + params.max_tokens > limit:
            raise InvalidRequestError(
                f"the prompt has {len(prompt)} tokens and max_tokens is {params.max_tokens}; this model's maximum "
                f"context length is {limit} tokens (max_model_len, prompt plus generated tokens)",
                "max_tokens" if len(prompt) < limit else "prompt",
                code="context_length_exceeded",
            )
        for name, what, token_ids in (
            ("logit_bias", "logit_bias keys", params.logit_bias or {}),
            ("stop_token_ids", "stop_token_ids", params.stop_token_ids),
        ):
            bad = [t for t in token_ids if not 0 <= int(t) < vocab]
            if bad:
                raise InvalidRequestError(f"expected {what} in [0, {vocab}) (token ids), got {bad[0]}", name)
        if params.logprobs is not None and params.logprobs > vocab:
            raise InvalidRequestError(f"expected logprobs <= the vocabulary size {vocab}, got {params.logprobs}")
        if request.cache_salt is not None and (not isinstance(request.cache_salt, str) or not request.cache_salt):
            raise InvalidRequestError(
                f"expected a non-empty cache_salt or None, got {request.cache_salt!r}", "cache_salt"
            )
        route = request.layer_route
        bias = request.route_skip_bias
        if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(bias):
            raise InvalidRequestError(f"expected a finite layer_route_skip_bias, got {bias!r}", "layer_route_skip_bias")
        # "auto" may repeat any layer: until its routers decide, it holds two rows of every layer
        repeats = route == "auto" or (isinstance(route, tuple | list) and 2 in route)
        if repeats and self.num_slots < 2:
            raise InvalidRequestError(
                "expected a pool of 2 or more request rows to repeat a layer (its second pass keeps a state row of "
                "its own): this engine's has 1 (raise --route-state-rows, --max-num-seqs or --state-memory)",
                "layer_route",
            )
        if repeats and params.n > 1:
            raise InvalidRequestError(
                f"expected n=1 with a route that repeats a layer, or 'auto' (each sample would need its own second "
                f"state lane), got n={params.n}",
                "layer_route",
            )
        if route == "auto":
            if self.model.routers is None:
                raise InvalidRequestError(
                    "expected layer routers for layer_route 'auto': this engine has none (--router DIR)", "layer_route"
                )
        elif isinstance(route, str):
            raise InvalidRequestError(f"expected layer_route 'auto' or a list of counts, got {route!r}", "layer_route")
        elif route is not None:
            num_layers = len(self.model.decoder_layers())
            if len(route) != num_layers or any(r not in (0, 1, 2) for r in route):
                raise InvalidRequestError(
                    f"expected a layer route of {num_layers} counts in {{0, 1, 2}}, got {list(route)}", "layer_route"
                )
        return prompt

    def abort(self, request_ids: list[str]) -> None:
        """Cancel prompts by id (all their samples); their slots are free before the next step."""
        wanted = set(request_ids)
        # A prompt's samples: the parent and its children, any of which may outlive the parent.
        engine_ids = [rid for rid, r in self.scheduler.requests.items() if rid in wanted or r.parent_id in wanted]
        self.scheduler.abort(engine_ids)
        self.outputs.abort(engine_ids)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def can_replay_cuda_graphs(self) -> bool:
        """Whether decode-only steps replay captured CUDA graphs (on CUDA, unless enforce_eager)."""
        return self.runner.decode_graphs is not None

    def stats(self) -> EngineStats:
        allocator = self.scheduler.allocator
        prefix = self.scheduler.prefix_stats
        cache = self.prefix_cache
        watch = current_compile_watch()
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_slots_used=allocator.num_used,
            num_slots_total=allocator.num_slots,
            state_bytes_per_request=self.bytes_per_request,
            prefix_cache_queries=prefix.num_queries,
            prefix_cache_hits=prefix.num_hits,
            prefix_cache_query_tokens=prefix.num_query_tokens,
            prefix_cache_hit_tokens=prefix.num_hit_tokens,
            prefill_tokens_computed=prefix.num_prefill_tokens,
            prefix_cache_states=cache.num_snapshots if cache else 0,
            prefix_cache_state_bytes=cache.snapshot_bytes if cache else 0,
            prefix_cache_rows_total=cache.num_rows if cache else 0,
            prefix_cache_saves=cache.num_saves if cache else 0,
            prefix_cache_evictions=cache.num_evictions if cache else 0,
            num_step_failures=self.num_step_failures,
            num_failed_requests=self.num_failed_requests,
            num_quarantined=self.scheduler.num_suspects,
            num_kernel_compilations_after_warmup=watch.num_late_compilations if watch is not None else 0,
            running_lora_adapters=tuple(self.scheduler.running_adapters()),
            waiting_lora_adapters=tuple(self.scheduler.waiting_adapters()),
            max_lora=self.config.max_loras if self.adapters is not None else 0,
            num_sparse_switches=switch.num_switches if (switch := self.runner.sparse_switch) is not None else 0,
            num_sparse_mixed_steps=self.scheduler.num_sparse_mixed_steps,
            num_layer_passes_skipped=self.scheduler.num_layer_passes_skipped,
            num_layer_passes_repeated=self.scheduler.num_layer_passes_repeated,
            num_state_rows_used=allocator.num_rows_used,
            num_state_rows_total=allocator.num_rows * allocator.num_layers,
            state_bytes_used=sum(
                allocator.rows_used(layer) * num_bytes for layer, num_bytes in enumerate(self.pool.layer_bytes)
            ),
            stored_states=self.states.tier_counts(),
            state_store_counts=asdict(self.states.stats),
        )

    def step(self) -> list[SampleDelta]:
        """One schedule -> execute -> update. When execute raises, only the requests the failure can be
        traced to end (finish_reason "error"); the others' states are rebuilt and they go on (see
        Scheduler.recover). A raise from the engine's own bookkeeping (schedule, update, outputs) fails
        every unfinished request and resets the engine, which goes on serving."""
        try:
            return self._step()
        except Exception:
            logger.exception("linrec: the engine's bookkeeping failed")
            return self.reset()

    def _step(self) -> list[SampleDelta]:
        out = self.scheduler.schedule()
        try:
            result = self.runner.execute(out)
        except Exception:
            self.num_step_failures += 1
            names = [s.request_id for s in out.sequences]
            logger.exception(
                "linrec: an engine step failed (%s step, %d sequence(s): %s); recovering",
                "quarantine" if out.is_quarantine else "batched",
                len(names),
                ", ".join(names[:16]),
            )
            return self._fail_requests(self.scheduler.recover(out))
        updates = self.scheduler.update(out, result)
        deltas, stopped, failed = self.outputs.process(updates)
        for request, stop_string in stopped:
            self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED, stop_reason=stop_string)
        for request in failed:
            self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
        self._store_states()
        return deltas + self._fail_requests(failed)

    def reset(self) -> list[SampleDelta]:
        """Fail every unfinished request and start over with an empty scheduler and prefix cache (after a
        bug in the engine's own bookkeeping, whose state can no longer be trusted). The model and the pool
        stay: every row is zeroed or overwritten before it is read again."""
        requests = list(self.scheduler.requests.values())
        logger.error("linrec: resetting the engine; %d unfinished request(s) fail", len(requests))
        for request in requests:
            request.status = RequestStatus.FINISHED_ERROR
            if request.resume is not None:  # a continuation that never loaded: its stored state may move again
                self.states.unpin(request.resume)
                request.resume = None
        self.runner.forget([r.request_id for r in requests])
        self._new_scheduler()
        return self._fail_requests(requests)

    def _fail_requests(self, requests: list[Request]) -> list[SampleDelta]:
        """Deltas that end these samples with finish_reason "error" (the server answers 500)."""
        self.num_failed_requests += len(requests)
        self.outputs.abort([r.request_id for r in requests])
        return [
            SampleDelta(r.parent_id or r.request_id, r.sample_index, "", [], [], RequestStatus.FINISHED_ERROR.value)
            for r in requests
        ]

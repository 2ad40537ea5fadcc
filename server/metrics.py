"""Prometheus metrics, named like vLLM's where the meaning matches, under the `linrec:` prefix.

Every app owns its CollectorRegistry (tests build several apps in one process). Engine gauges are
read at scrape time from EngineCore.stats(); request histograms are observed by the handlers from
the deltas they stream, all on one clock (time.monotonic()). Token counters grow as tokens come
(prompt tokens once prefilled), so aborted requests count; the per-request histograms observe
finished requests only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from linrec.engine.core import EngineStats

PREFIX = "linrec:"
# Seconds: from sub-millisecond CPU decode steps to minute-long requests.
LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats], model_name: str):
        self._stats = stats
        self._model_name = model_name

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._stats()
        rows = (
            ("num_requests_running", "Requests holding a state slot (prefilling or decoding).", stats.num_running),
            ("num_requests_waiting", "Requests queued for a state slot.", stats.num_waiting),
            ("state_slots_used", "Requests holding state (a slot, or a routed request's rows).", stats.num_slots_used),
            ("state_slots_total", "State slots in the pool.", stats.num_slots_total),
            (
                "state_bytes_per_request",
                "Bytes of recurrent state per request (constant).",
                stats.state_bytes_per_request,
            ),
            (
                "state_rows_used",
                "Request state rows held, summed over layers: one per layer a request executes, two per layer it "
                "repeats, none where it skips.",
                stats.num_state_rows_used,
            ),
            ("state_rows_total", "Request state rows in the pool, summed over layers.", stats.num_state_rows_total),
            ("state_bytes_used", "Bytes of the request state rows held.", stats.state_bytes_used),
            ("prefix_cache_states", "Prefix-cache state snapshots held.", stats.prefix_cache_states),
            ("prefix_cache_state_bytes", "Bytes held by prefix-cache snapshots.", stats.prefix_cache_state_bytes),
            ("prefix_cache_rows_total", "Snapshot rows the prefix cache may use.", stats.prefix_cache_rows_total),
            (
                "num_requests_quarantined",
                "Requests rebuilding their states after a failed engine step.",
                stats.num_quarantined,
            ),
        )
        for name, doc, value in rows:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self._model_name], value)
            yield family
        # Stored states (docs/responses.md), per tier: pool rows, host memory, --state-store.
        for name, doc, index in (
            ("stored_states", "Stored states (conversation end states kept for continuations), per tier.", 0),
            ("stored_state_bytes", "Bytes of stored states, per tier.", 1),
        ):
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name", "tier"])
            for tier, counts in stats.stored_states.items():
                family.add_metric([self._model_name, tier], counts[index])
            yield family
        # Cumulative counters (exposed with the _total suffix); vLLM counts queries and hits in tokens.
        counters = (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", stats.prefix_cache_query_tokens),
            ("prefix_cache_hits", "Prompt tokens loaded from prefix-cache snapshots.", stats.prefix_cache_hit_tokens),
            ("prefix_cache_request_queries", "Prompts looked up in the prefix cache.", stats.prefix_cache_queries),
            ("prefix_cache_request_hits", "Prompts that loaded a prefix-cache snapshot.", stats.prefix_cache_hits),
            (
                "prefix_cache_prefill_tokens_saved",
                "Prompt tokens not prefilled thanks to the prefix cache.",
                stats.prefix_cache_hit_tokens,
            ),
            ("prefill_tokens_computed", "Prompt tokens fed to the model.", stats.prefill_tokens_computed),
            ("prefix_cache_saves", "Prefix-cache snapshots taken.", stats.prefix_cache_saves),
            ("prefix_cache_evictions", "Prefix-cache snapshots evicted.", stats.prefix_cache_evictions),
            ("engine_step_failures", "Engine steps that raised and were recovered from.", stats.num_step_failures),
            (
                "request_failures",
                "Samples ended with an error (500) because a failed step was traced to them.",
                stats.num_failed_requests,
            ),
            (
                "sparse_adapter_switches",
                "Sparse (SHiRA) adapters scattered into the weights or restored out of them.",
                stats.num_sparse_switches,
            ),
            (
                "layers_skipped",
                "Layers skipped by requests' layer routes, counted per token fed.",
                stats.num_layer_passes_skipped,
            ),
            (
                "layers_repeated",
                "Second passes of layers repeated by requests' layer routes, counted per token fed.",
                stats.num_layer_passes_repeated,
            ),
            (
                "sparse_adapter_mixed_steps",
                "Engine steps that ran sparse adapters' tokens beside other weights, with the per-token add-on.",
                stats.num_sparse_mixed_steps,
            ),
            (
                "kernel_compilations_after_warmup",
                "Triton kernels compiled after the start-up warm-up: each one a request that waited on the compiler "
                "(a bug: see the warning log line naming the kernel).",
                stats.num_kernel_compilations_after_warmup,
            ),
        )
        store = stats.state_store_counts
        counters += tuple(
            (f"stored_state_{key}", doc, store.get(key, 0))
            for key, doc in (
                ("saves", "States stored: requests that completed with store, imports and forks."),
                ("resumes", "Continuations that found their stored state (hits)."),
                ("misses", "Continuations and lookups of a state id not found for that model and tenant."),
                ("spills_to_host", "Stored states moved from pool rows to host memory."),
                ("spills_to_disk", "Stored states moved from host memory to --state-store."),
                ("restores", "Stored states read back from --state-store."),
                ("drops", "Stored states dropped for room (host memory full without --state-store, or its bound)."),
                ("expirations", "Stored states removed past --state-ttl."),
                ("deletions", "Stored states deleted by request."),
            )
        )
        for name, doc, value in counters:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self._model_name], value)
            yield family
        if stats.max_lora:
            # vLLM's lora_requests_info: the adapters in use as labels (comma-separated names), the value the
            # time of the snapshot, so that dashboards built for vLLM read it as they do there.
            info = GaugeMetricFamily(
                PREFIX + "lora_requests_info",
                "LoRA adapters with running and waiting requests (labels), and the device adapter slots.",
                labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            )
            info.add_metric(
                [str(stats.max_lora), ",".join(stats.running_lora_adapters), ",".join(stats.waiting_lora_adapters)],
                time.time(),
            )
            yield info


class Metrics:
    def __init__(self, model_name: str, engine_stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, m = self.registry, ["model_name"]
        self.registry.register(_EngineCollector(engine_stats, model_name))
        # process_resident_memory_bytes, open fds, CPU seconds (Linux): what a soak watches for leaks.
        ProcessCollector(registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prefilled prompt tokens.", m, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", m, registry=r)
        self.request_success = Counter(
            PREFIX + "request_success", "Finished samples by finish reason.", [*m, "finished_reason"], registry=r
        )

        def latency(name: str, doc: str) -> Histogram:
            return Histogram(PREFIX + name, doc, m, buckets=LATENCY_BUCKETS, registry=r)

        self.time_to_first_token = latency("time_to_first_token_seconds", "Arrival to first generated token.")
        self.inter_token_latency = latency("inter_token_latency_seconds", "Time between tokens of one sample.")
        self.e2e_request_latency = latency("e2e_request_latency_seconds", "Arrival to last token.")
        self.request_queue_time = latency("request_queue_time_seconds", "Arrival to getting a state slot.")
        self.request_prefill_time = latency("request_prefill_time_seconds", "Getting a slot to first token.")
        self.request_decode_time = latency("request_decode_time_seconds", "First token to last token.")
        self.request_prompt_tokens = Histogram(
            PREFIX + "request_prompt_tokens", "Prompt tokens per request.", m, buckets=TOKEN_BUCKETS, registry=r
        )
        self.request_generation_tokens = Histogram(
            PREFIX + "request_generation_tokens",
            "Generated tokens per request (all n samples).",
            m,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.http_requests = Counter(
            PREFIX + "http_requests", "HTTP requests by route and status.", ["method", "route", "status"], registry=r
        )
        self.http_request_duration = Histogram(
            PREFIX + "http_request_duration_seconds",
            "HTTP request latency (to the last byte sent) by route.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """One prompt's timeline, fed with its deltas; observes the request histograms when it ends."""

    def __init__(self, metrics: Metrics, arrival_time: float, num_prompt_tokens: int):
        self.metrics = metrics
        self.arrival_time = arrival_time
        self.num_prompt_tokens = num_prompt_tokens
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: dict[int, float] = {}  # sample index -> when its last token came
        self.num_generated = 0

    def on_delta(self, now: float, index: int, num_tokens: int, first_scheduled_time: float | None) -> None:
        labels = self.metrics.model_name
        if first_scheduled_time is not None and self.first_scheduled_time is None:
            self.first_scheduled_time = first_scheduled_time
        if num_tokens:
            if self.first_token_time is None:
                self.first_token_time = now
                self.metrics.time_to_first_token.labels(labels).observe(now - self.arrival_time)
                # Counted once prefilled, so that a request aborted later (client gone) still counts.
                self.metrics.prompt_tokens.labels(labels).inc(self.num_prompt_tokens)
            previous = self.last_token_time.get(index)
            if previous is not None:
                # One observation per token (as vLLM), so the count is the number of token gaps.
                for _ in range(num_tokens):
                    self.metrics.inter_token_latency.labels(labels).observe((now - previous) / num_tokens)
            self.last_token_time[index] = now
            self.num_generated += num_tokens
            self.metrics.generation_tokens.labels(labels).inc(num_tokens)

    def on_sample_finished(self, finish_reason: str) -> None:
        self.metrics.request_success.labels(self.metrics.model_name, finish_reason).inc()

    def on_finished(self, now: float) -> None:
        m, labels = self.metrics, self.metrics.model_name
        m.request_prompt_tokens.labels(labels).observe(self.num_prompt_tokens)
        m.request_generation_tokens.labels(labels).observe(self.num_generated)
        m.e2e_request_latency.labels(labels).observe(now - self.arrival_time)
        if self.first_scheduled_time is not None:
            m.request_queue_time.labels(labels).observe(max(0.0, self.first_scheduled_time - self.arrival_time))
            if self.first_token_time is not None:
                m.request_prefill_time.labels(labels).observe(
                    max(0.0, self.first_token_time - self.first_scheduled_time)
                )
        if self.first_token_time is not None:
            m.request_decode_time.labels(labels).observe(now - self.first_token_time)

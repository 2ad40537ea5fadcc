"""`linrec bench routing`: throughput against the fraction of layers a route skips (and repeats), and the overhead
of routing itself, in one process on one engine.

Model: the seeded bench checkpoint of `family` with `num_layers` decoder layers (8 by default, so that a route
can skip an eighth of them), or a local checkpoint. Workload: `num_requests` prompts of `prompt_len` seeded
random tokens, `output_len` greedy tokens each (EOS ignored), all queued at once, every request in one batch,
the prefix cache off. Configurations (run interleaved `repeats` times after one warm-up each, each round
starting one configuration later; medians):
- none: no route;
- ones: the all-ones route on every request (what a router that executes everything costs: the engine serves
  it as no route, so this is the overhead of carrying a route through the API and the scheduler);
- skip-F: every request skips a fraction F of the layers (evenly spaced, the first layer always kept);
- alt-skip: even requests skip the odd layers, odd requests the even ones but the first: most layers run on
  half the rows (the per-layer sub-batches of a mixed batch);
- repeat-25: every request runs a quarter of the layers twice (second lanes).
Each reports output tokens/s and its ratio to `none`; skip-F should approach 1 / (1 - F) where the layers
dominate a step. Checks: `ones` gives `none`'s tokens bit for bit; every skip route changes them.

Then the same workload under a state-memory budget of `budget_slots` slots (a quarter of the requests by
default), where state memory, not compute, bounds the batch, each configuration with the most requests any step
ran: none; skip-50; and halves (even requests run the first half of the layers, odd ones the second half). A
routed request holds only the rows of the layers it runs (engine/state_pool.py), but the pool has the same rows
in every layer, so the requests that fit are bounded by the layer the most requests run: skip-50 (the same
layers for everyone) fits no more requests than none, halves fits twice as many. A configuration's ratio to
`none` under the budget over its ratio without it is what the memory its route leaves is worth in tokens/s.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_NUM_LAYERS = 8
TARGET_ONES_OVERHEAD = 0.03  # the issue's: routing with all-ones routes costs at most 3%


@dataclass
class RouteConfig:
    name: str
    layer_fraction: float  # layer passes per token over the model's layers (1.0: every layer once)
    seconds: float  # median wall time of a run
    output_tokens_per_s: float
    seconds_runs: list[float]
    token_ids: list[list[int]] = field(default_factory=list, repr=False)
    peak_running: int = 0  # the most requests one step ran


@dataclass
class RoutingBenchResult:
    model: str
    family: str
    num_layers: int
    device: str
    dtype: str
    num_requests: int
    prompt_len: int
    output_len: int
    repeats: int
    num_threads: int
    torch_version: str
    configs: list[RouteConfig]
    ones_equal_none: bool
    skips_differ: bool
    budget_slots: int = 0
    bounded: list[RouteConfig] = field(default_factory=list)  # under the budget

    def ratios(self) -> dict[str, float]:
        base = self.configs[0].output_tokens_per_s
        return {f"{c.name} / none": c.output_tokens_per_s / base for c in self.configs[1:]}

    def bounded_ratios(self) -> dict[str, float]:
        base = self.bounded[0].output_tokens_per_s
        return {f"{c.name} / none": c.output_tokens_per_s / base for c in self.bounded[1:]}

    @property
    def ones_overhead(self) -> float:
        return 1.0 - self.ratios()["ones / none"]

    def to_json(self) -> str:
        data = asdict(self)
        for config in data["configs"] + data["bounded"]:
            config.pop("token_ids")
        data["ratios"] = self.ratios()
        data["bounded_ratios"] = self.bounded_ratios()
        data["ones_overhead"] = self.ones_overhead
        return json.dumps(data, indent=2)

    def format(self) -> str:
        rows = [
            f"model: {self.model} ({self.family}, {self.num_layers} layers, {self.dtype} on {self.device}), torch "
            f"{self.torch_version}, {self.num_threads} threads",
            f"workload: {self.num_requests} requests x {self.prompt_len} prompt + {self.output_len} output tokens "
            f"(greedy, ignore_eos), all queued at once; median of {self.repeats} interleaved runs",
        ]
        rows += _table(self.configs, self.ratios())
        rows.append(f"under a state budget of {self.budget_slots} slots (every layer's rows for that many requests):")
        rows += _table(self.bounded, self.bounded_ratios())
        met = self.ones_overhead <= TARGET_ONES_OVERHEAD
        rows += [
            f"all-ones overhead: {self.ones_overhead:+.1%} (target <= {TARGET_ONES_OVERHEAD:.0%}: "
            f"{'met' if met else 'NOT met'})",
            f"checks: ones == none bit for bit: {'yes' if self.ones_equal_none else 'NO'}; "
            f"skip routes change tokens: {'yes' if self.skips_differ else 'NO'}",
        ]
        return "\n".join(rows)


def _table(configs: list[RouteConfig], ratios: dict[str, float]) -> list[str]:
    rows = [
        f"{'route':<13} {'layer passes':>12} {'seconds':>8} {'output tok/s':>13} {'vs none':>8} {'most running':>13}"
    ]
    for c in configs:
        ratio = ratios.get(f"{c.name} / none", 1.0)
        rows.append(
            f"{c.name:<13} {c.layer_fraction:>12.3f} {c.seconds:>8.2f} {c.output_tokens_per_s:>13.1f} "
            f"{ratio:>7.2f}x {c.peak_running:>13}"
        )
    return rows


def skip_route(num_layers: int, fraction: float) -> tuple[int, ...]:
    """Skip round(fraction * L) layers, evenly spaced, never the first."""
    candidates = list(range(1, num_layers))
    num_skipped = min(len(candidates), round(fraction * num_layers))
    spacing = len(candidates) / max(1, num_skipped)
    skipped = {candidates[len(candidates) - 1 - round(i * spacing)] for i in range(num_skipped)}
    return tuple(0 if i in skipped else 1 for i in range(num_layers))


def routes_for(num_layers: int, num_requests: int) -> dict[str, list[tuple[int, ...] | None]]:
    """{configuration: the route of each request}, in run order."""
    ones = tuple([1] * num_layers)
    configs: dict[str, list[tuple[int, ...] | None]] = {"none": [None] * num_requests, "ones": [ones] * num_requests}
    for fraction in (0.25, 0.5, 0.75):
        configs[f"skip-{round(fraction * 100)}"] = [skip_route(num_layers, fraction)] * num_requests
    odd = tuple(0 if i % 2 else 1 for i in range(num_layers))
    even = tuple(1 if i % 2 or i == 0 else 0 for i in range(num_layers))
    configs["alt-skip"] = [odd if r % 2 == 0 else even for r in range(num_requests)]
    repeat = tuple(2 if i % 4 == 1 else 1 for i in range(num_layers))
    configs["repeat-25"] = [repeat] * num_requests
    return configs


def run_routing_bench(
    model: str | None = None,
    *,
    family: str = "liger_gla",
    num_layers: int = DEFAULT_NUM_LAYERS,
    num_requests: int = 64,
    prompt_len: int = 32,
    output_len: int = 32,
    device: str = "auto",
    kernel_backend: str = "auto",
    repeats: int = 3,
    seed: int = 0,
    threads: int | None = None,
    budget_slots: int | None = None,
) -> RoutingBenchResult:
    import torch

    from linrec.bench.common import cached_bench_model, served_model_type
    from linrec.bench.lora import adapter_engine_setup
    from linrec.engine.llm import LLM

    for name, value in (("num_layers", num_layers), ("output_len", output_len), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"expected {name} >= 1, got {value}")
    budget_slots = max(1, num_requests // 4) if budget_slots is None else budget_slots
    if budget_slots < 1:
        raise ValueError(f"expected budget_slots >= 1, got {budget_slots}")
    if num_layers < 4 and model is None:
        raise ValueError(f"expected num_layers >= 4 (a quarter of the layers is a route's unit), got {num_layers}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        if model is not None:
            path = Path(model)
        else:
            path = cached_bench_model(
                f"bench-routing-{family}-{num_layers}l", family, {"num_hidden_layers": num_layers}
            )
        hf_config, linearize, torch_device, dtype, prompts, engine_args = adapter_engine_setup(
            path, device, kernel_backend, num_requests, prompt_len, num_requests, seed
        )
        # Unbounded: every request's rows fit, repeats' second rows included (--route-state-rows), so compute alone
        # sets the pace; the budgeted engine below has none.
        engine = LLM(str(path), **engine_args, route_state_rows=num_requests).engine
        layers = len(engine.model.decoder_layers())
        configs = routes_for(layers, num_requests)
        results = _measure(engine, configs, prompts, output_len, repeats, layers)
        budget = budget_slots * engine.bytes_per_request
        engine = LLM(str(path), **{**engine_args, "state_memory": budget}).engine
        half = layers // 2
        first, second = tuple([1] * half + [0] * (layers - half)), tuple([0] * half + [1] * (layers - half))
        halves = [first if r % 2 == 0 else second for r in range(num_requests)]
        bounded_configs = {"none": configs["none"], "skip-50": configs["skip-50"], "halves": halves}
        bounded = _measure(engine, bounded_configs, prompts, output_len, repeats, layers)
        by = {c.name: c for c in results}
        return RoutingBenchResult(
            model=str(model) if model is not None else f"bench {family}, {layers} layers (seeded random)",
            family=str(served_model_type(hf_config, linearize)),
            num_layers=layers,
            device=str(torch_device),
            dtype=dtype,
            num_requests=num_requests,
            prompt_len=prompt_len,
            output_len=output_len,
            repeats=repeats,
            num_threads=torch.get_num_threads(),
            torch_version=torch.__version__,
            configs=results,
            ones_equal_none=by["ones"].token_ids == by["none"].token_ids,
            skips_differ=all(by[n].token_ids != by["none"].token_ids for n in by if n.startswith("skip")),
            budget_slots=budget_slots,
            bounded=bounded,
        )
    finally:
        torch.set_num_threads(previous)


def _measure(engine, configs: dict, prompts, output_len: int, repeats: int, layers: int) -> list[RouteConfig]:
    """Each configuration's median run on `engine` (one warm-up each; rounds interleaved, each starting one
    configuration later), with the most requests one step ran."""
    from linrec.bench.lora import serve

    num_requests = len(prompts)
    scheduler = engine.scheduler
    original = scheduler.schedule
    peak = {"running": 0}

    def watch():
        out = original()
        peak["running"] = max(peak["running"], len(out.sequences))
        return out

    for routes in configs.values():  # warm-up: a few requests of each configuration
        serve(engine, prompts[:4], 2, [None] * 4, layer_routes=routes[:4])
    runs: dict[str, list] = {name: [] for name in configs}
    peaks = dict.fromkeys(configs, 0)
    names = list(configs)
    scheduler.schedule = watch
    try:
        for r in range(repeats):  # interleaved, each round starting one configuration later (no fixed order)
            for name in names[r % len(names) :] + names[: r % len(names)]:
                peak["running"] = 0
                runs[name].append(serve(engine, prompts, output_len, [None] * num_requests, layer_routes=configs[name]))
                peaks[name] = max(peaks[name], peak["running"])
    finally:
        scheduler.schedule = original
    results = []
    for name, served in runs.items():
        seconds = statistics.median(s.seconds for s in served)
        routes = configs[name]
        passes = sum(sum(r) if r is not None else layers for r in routes) / (len(routes) * layers)
        results.append(
            RouteConfig(
                name,
                passes,
                seconds,
                num_requests * output_len / seconds,
                [s.seconds for s in served],
                served[-1].token_ids,
                peaks[name],
            )
        )
    return results

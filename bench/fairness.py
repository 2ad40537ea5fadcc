"""`linrec bench fairness`: short requests arriving while very long prompts prefill, with fair admission
(the default) and with strict arrival order, side by side in one run.

Workload (open loop, on the wall clock): `num_long` prompts of `long_len` tokens (100k by default) all
arrive at t = 0 and generate `long_output` tokens; `num_short` prompts of `short_len` tokens arrive one
every `short_interval` seconds from `short_start` on and generate `short_output` tokens. Greedy, EOS ignored.
A request's time to first token runs from its scheduled arrival to the end of the engine step that gave
its first token, so it includes waiting for a step already under way.

Contenders (a fresh engine each, same weights and limits):
- fifo: long_prefill_token_threshold=0: every prompt is short, admission in arrival order, the oldest
  prefill taking all the budget (linrec before fair admission, and what a server without a long-prefill
  policy does): a short request waits for the long prompts ahead of it.
- fair: the default policy (engine/scheduler.py): a long prefill takes at most the threshold per step
  before short prompts had theirs, at most max_long_partial_prefills long prompts prefill at once.

Reported per contender: short TTFT p50/p90/p99/max, long TTFT each (what fairness costs the long prompts),
the run's wall time, and whether greedy outputs agree across contenders.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field

from linrec.bench.common import bench_model_dir, percentile
from linrec.engine.config import EngineConfig
from linrec.engine.request import EngineRequest

MODES = ("fifo", "fair")


@dataclass(frozen=True)
class Arrival:
    at_s: float  # scheduled arrival, seconds after the run starts
    prompt: list[int]
    max_tokens: int
    is_long: bool


def make_fairness_workload(
    num_long: int,
    long_len: int,
    long_output: int,
    num_short: int,
    short_len: int,
    short_output: int,
    short_start: float,
    short_interval: float,
    vocab: int,
    seed: int,
) -> list[Arrival]:
    for name, value in (
        ("num_long", num_long),
        ("long_len", long_len),
        ("long_output", long_output),
        ("num_short", num_short),
        ("short_len", short_len),
        ("short_output", short_output),
    ):
        if value < 1:
            raise ValueError(f"expected {name} >= 1, got {value}")
    if short_start < 0 or short_interval < 0:
        raise ValueError(f"expected short_start and short_interval >= 0, got {short_start} and {short_interval}")
    rng = random.Random(seed)
    arrivals = [
        Arrival(0.0, [rng.randrange(vocab) for _ in range(long_len)], long_output, True) for _ in range(num_long)
    ]
    arrivals += [
        Arrival(short_start + i * short_interval, [rng.randrange(vocab) for _ in range(short_len)], short_output, False)
        for i in range(num_short)
    ]
    return arrivals


@dataclass
class ModeResult:
    mode: str
    long_prefill_token_threshold: int  # 0: off
    seconds: float  # from t = 0 until every request finished
    short_ttft_p50_s: float
    short_ttft_p90_s: float
    short_ttft_p99_s: float
    short_ttft_max_s: float
    long_ttft_s: list[float]  # per long prompt, in arrival order
    num_steps: int
    token_ids: list[list[int]] = field(default_factory=list, repr=False)


@dataclass
class FairnessBenchResult:
    model: str
    family: str
    num_long: int
    long_len: int
    num_short: int
    short_len: int
    short_interval: float
    max_num_seqs: int
    max_num_batched_tokens: int
    num_threads: int
    outputs_identical: bool  # greedy tokens equal across the contenders
    modes: list[ModeResult]

    def by_mode(self) -> dict[str, ModeResult]:
        return {m.mode: m for m in self.modes}

    def short_p99_ratio(self) -> float | None:
        """fifo's short-request p99 TTFT over fair's (how much longer short requests wait without the policy)."""
        by = self.by_mode()
        if "fifo" not in by or "fair" not in by:
            return None
        return by["fifo"].short_ttft_p99_s / by["fair"].short_ttft_p99_s

    def to_json(self) -> str:
        data = asdict(self)
        for mode in data["modes"]:
            mode.pop("token_ids", None)
        data["short_ttft_p99_fifo_over_fair"] = self.short_p99_ratio()
        return json.dumps(data, indent=2)

    def format(self) -> str:
        rows = [
            f"model: {self.model} ({self.family}), torch threads: {self.num_threads}",
            f"workload: {self.num_long} x {self.long_len}-token prompts at t=0, {self.num_short} x "
            f"{self.short_len}-token prompts one every {self.short_interval}s (greedy, ignore_eos)",
            f"engine: max_num_seqs={self.max_num_seqs}, max_num_batched_tokens={self.max_num_batched_tokens}; "
            f"greedy outputs identical across modes: {'yes' if self.outputs_identical else 'NO'}",
            "",
            f"{'mode':<6} {'threshold':>9} {'short TTFT p50':>15} {'p90':>8} {'p99':>8} {'max':>8} "
            f"{'long TTFT':>18} {'all done':>9}",
        ]
        for m in self.modes:
            longs = ", ".join(f"{t:.1f}" for t in m.long_ttft_s)
            rows.append(
                f"{m.mode:<6} {m.long_prefill_token_threshold:>9} {m.short_ttft_p50_s:>14.3f}s "
                f"{m.short_ttft_p90_s:>7.3f}s {m.short_ttft_p99_s:>7.3f}s {m.short_ttft_max_s:>7.3f}s "
                f"{longs + ' s':>18} {m.seconds:>8.1f}s"
            )
        ratio = self.short_p99_ratio()
        if ratio is not None:
            by = self.by_mode()
            rows.append(
                f"short-request p99 TTFT, fifo / fair: {ratio:.1f}x; the last long prompt's TTFT (what fairness "
                f"costs it), fair / fifo: {by['fair'].long_ttft_s[-1] / by['fifo'].long_ttft_s[-1]:.2f}x"
            )
        return "\n".join(rows)


def run_arrivals(engine, arrivals: list[Arrival]) -> tuple[float, list[float], list[list[int]], int]:
    """Feed `arrivals` on the wall clock and step the engine until all finish; returns (seconds, TTFT per
    arrival, tokens per arrival, steps)."""
    from linrec.engine.sampling_params import SamplingParams

    order = sorted(range(len(arrivals)), key=lambda i: arrivals[i].at_s)
    first_token: dict[str, float] = {}
    token_ids: dict[str, list[int]] = {str(i): [] for i in range(len(arrivals))}
    num_added = num_steps = 0
    start = time.perf_counter()
    while num_added < len(order) or engine.has_unfinished():
        now = time.perf_counter() - start
        while num_added < len(order) and arrivals[order[num_added]].at_s <= now:
            index = order[num_added]
            params = SamplingParams(temperature=0.0, max_tokens=arrivals[index].max_tokens, ignore_eos=True)
            engine.add_request(EngineRequest(str(index), arrivals[index].prompt, params))
            num_added += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, arrivals[order[num_added]].at_s - now))
            continue
        deltas = engine.step()
        num_steps += 1
        done = time.perf_counter() - start
        for delta in deltas:
            if delta.token_ids and delta.request_id not in first_token:
                first_token[delta.request_id] = done - arrivals[int(delta.request_id)].at_s
            token_ids[delta.request_id].extend(delta.token_ids)
    seconds = time.perf_counter() - start
    indices = [str(i) for i in range(len(arrivals))]
    return seconds, [first_token[i] for i in indices], [token_ids[i] for i in indices], num_steps


def run_fairness_bench(
    model: str | None = None,
    *,
    family: str = "mamba2",
    num_long: int = 2,
    long_len: int = 100_000,
    long_output: int = 4,
    num_short: int = 64,
    short_len: int = 16,
    short_output: int = 8,
    short_start: float = 0.1,
    short_interval: float = 0.1,
    max_num_seqs: int = EngineConfig.max_num_seqs,
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens,
    device: str = "auto",
    kernel_backend: str = "auto",
    seed: int = 0,
    modes: tuple[str, ...] = MODES,
) -> FairnessBenchResult:
    """Run the workload under each mode (see the module docstring). model: a local checkpoint (Llama,
    Qwen2 or Mistral are linearized to Liger-GLA); None writes the tiny demo model of `family`."""
    import torch

    from linrec.engine.core import EngineCore
    from linrec.engine.scheduler import default_long_prefill_threshold

    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"expected modes among {MODES}, got {mode!r}")
    with tempfile.TemporaryDirectory(prefix="linrec-bench-fairness-") as tmp:
        path, hf_config, linearize = bench_model_dir(model, family, tmp)
        model_type = hf_config.get("model_type")
        vocab = int(hf_config["vocab_size"])
        arrivals = make_fairness_workload(
            num_long,
            long_len,
            long_output,
            num_short,
            short_len,
            short_output,
            short_start,
            short_interval,
            vocab,
            seed,
        )
        warm_rng = random.Random(seed + 1)
        warm = [Arrival(0.0, [warm_rng.randrange(vocab) for _ in range(max_num_batched_tokens)], 2, False)]
        results = []
        for mode in modes:
            threshold = 0 if mode == "fifo" else default_long_prefill_threshold(max_num_batched_tokens)
            config = EngineConfig(
                model=str(path),
                device=device,
                kernel_backend=kernel_backend,
                linearize=linearize,
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=max(long_len + long_output, short_len + short_output),
                long_prefill_token_threshold=threshold,
                # Nothing is shared between prompts: the cache would only copy rows.
                enable_prefix_caching=False,
                seed=seed,
            )
            engine = EngineCore(config)
            run_arrivals(engine, warm)
            seconds, ttft, token_ids, num_steps = run_arrivals(engine, arrivals)
            short = [t for t, a in zip(ttft, arrivals) if not a.is_long]
            results.append(
                ModeResult(
                    mode=mode,
                    long_prefill_token_threshold=threshold,
                    seconds=seconds,
                    short_ttft_p50_s=percentile(short, 50),
                    short_ttft_p90_s=percentile(short, 90),
                    short_ttft_p99_s=percentile(short, 99),
                    short_ttft_max_s=max(short),
                    long_ttft_s=[t for t, a in zip(ttft, arrivals) if a.is_long],
                    num_steps=num_steps,
                    token_ids=token_ids,
                )
            )
    return FairnessBenchResult(
        model=str(model) if model is not None else f"demo {family} (tiny, seeded random)",
        family=str(model_type),
        num_long=num_long,
        long_len=long_len,
        num_short=num_short,
        short_len=short_len,
        short_interval=short_interval,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        num_threads=torch.get_num_threads(),
        outputs_identical=all(r.token_ids == results[0].token_ids for r in results),
        modes=results,
    )

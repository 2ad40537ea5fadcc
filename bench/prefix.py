"""`linrec bench prefix`: a shared-prefix workload with the prefix cache off, as an LRU-style radix cache,
and with global prefix grouping, side by side in one run.

The workload is SGLang's generated-shared-prefix shape: `num_groups` groups of `prompts_per_group` prompts;
the prompts of a group share a long system prompt (`prefix_len` random tokens) and each ends in its own
short question (`question_len` tokens); outputs are short (`output_len` tokens, greedy, EOS ignored).
The requests are shuffled and all queued at once (offline), as a batch job would be.

Contenders (one engine each, same weights, same limits):
- off: enable_prefix_caching=False; every prompt is prefilled whole.
- radix: the cache without grouping: arrival order, hits only on what earlier requests already left in
  the cache (their chunk ends, prompt ends, end states and branch points): what an LRU prefix cache does.
- global: the cache with global grouping (BatchLLM on states): each shared prefix prefilled once, its
  group run right after from the snapshot.

Reported per contender: wall time, throughput (prompt + output tokens per second), prefill tokens
computed (against the workload's distinct tokens), and time to first token p50/p99 from the moment all
requests are queued. Greedy outputs must agree across contenders.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from linrec.bench.common import bench_model_dir, percentile
from linrec.engine.config import EngineConfig
from linrec.engine.request import EngineRequest

MODES = ("off", "radix", "global")


@dataclass(frozen=True)
class PrefixWorkload:
    prompts: list[list[int]]  # in submission order (shuffled)
    output_len: int
    num_distinct_tokens: int  # distinct prefixes of the prompt set: the least prefill any engine can do

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def make_prefix_workload(
    num_groups: int, prompts_per_group: int, prefix_len: int, question_len: int, output_len: int, vocab: int, seed: int
) -> PrefixWorkload:
    for name, value in (
        ("num_groups", num_groups),
        ("prompts_per_group", prompts_per_group),
        ("prefix_len", prefix_len),
        ("question_len", question_len),
        ("output_len", output_len),
    ):
        if value < 1:
            raise ValueError(f"expected {name} >= 1, got {value}")
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_groups):
        system = [rng.randrange(vocab) for _ in range(prefix_len)]
        prompts += [system + [rng.randrange(vocab) for _ in range(question_len)] for _ in range(prompts_per_group)]
    rng.shuffle(prompts)
    return PrefixWorkload(prompts, output_len, count_distinct_tokens(prompts))


def count_distinct_tokens(prompts: list[list[int]]) -> int:
    """Nodes of the token trie of the prompts: every token minus what sorted neighbours share."""
    ordered = sorted(prompts)
    shared = 0
    for a, b in zip(ordered, ordered[1:]):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        shared += n
    return sum(len(p) for p in prompts) - shared


@dataclass
class ModeResult:
    mode: str
    seconds: float
    tokens_per_s: float  # (prompt + output tokens) / seconds
    requests_per_s: float
    prefill_tokens_computed: int
    prefill_over_distinct: float  # prefill_tokens_computed / the workload's distinct tokens
    cache_hit_tokens: int
    ttft_p50_s: float
    ttft_p99_s: float
    token_ids: list[list[int]] = field(default_factory=list, repr=False)


@dataclass
class PrefixBenchResult:
    model: str
    family: str
    num_groups: int
    prompts_per_group: int
    prefix_len: int
    question_len: int
    output_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    repeats: int  # runs per mode (fresh engine each); the fastest is reported
    num_distinct_tokens: int
    num_prompt_tokens: int
    num_threads: int
    outputs_identical: bool  # greedy tokens equal across the contenders
    modes: list[ModeResult]

    def ratio(self, mode: str, base: str = "off") -> float:
        by = {m.mode: m for m in self.modes}
        return by[mode].tokens_per_s / by[base].tokens_per_s

    def to_json(self) -> str:
        data = asdict(self)
        for mode in data["modes"]:
            mode.pop("token_ids", None)
        data["throughput_ratio_vs_off"] = {m.mode: self.ratio(m.mode) for m in self.modes}
        return json.dumps(data, indent=2)

    def format(self) -> str:
        rows = [
            f"model: {self.model} ({self.family}), torch threads: {self.num_threads}",
            f"workload: {self.num_groups} groups x {self.prompts_per_group} prompts, shared prefix {self.prefix_len} "
            f"+ question {self.question_len} tokens, output {self.output_len} (greedy, ignore_eos), shuffled, all "
            f"queued at once; {self.num_prompt_tokens} prompt tokens, {self.num_distinct_tokens} distinct",
            f"engine: max_num_seqs={self.max_num_seqs}, max_num_batched_tokens={self.max_num_batched_tokens}; "
            f"best of {self.repeats} interleaved runs per mode; "
            f"greedy outputs identical across modes: {'yes' if self.outputs_identical else 'NO'}",
            "",
            f"{'mode':<8} {'seconds':>8} {'tok/s':>9} {'vs off':>7} {'prefill tok':>12} {'/distinct':>10} "
            f"{'TTFT p50':>9} {'TTFT p99':>9}",
        ]
        for m in self.modes:
            rows.append(
                f"{m.mode:<8} {m.seconds:>8.2f} {m.tokens_per_s:>9.1f} {self.ratio(m.mode):>6.2f}x "
                f"{m.prefill_tokens_computed:>12} {m.prefill_over_distinct:>9.2f}x {m.ttft_p50_s:>8.2f}s "
                f"{m.ttft_p99_s:>8.2f}s"
            )
        return "\n".join(rows)


def run_mode(llm, workload: PrefixWorkload) -> tuple[float, list[float], list[list[int]]]:
    """Queue every prompt, step the engine to the end; (seconds, TTFT per request, tokens per request)."""
    from linrec.engine.sampling_params import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=workload.output_len, ignore_eos=True)
    first_token: dict[str, float] = {}
    token_ids: dict[str, list[int]] = {str(i): [] for i in range(len(workload.prompts))}
    start = time.perf_counter()
    for i, prompt in enumerate(workload.prompts):
        engine.add_request(EngineRequest(str(i), prompt, params))
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.token_ids and delta.request_id not in first_token:
                first_token[delta.request_id] = time.perf_counter() - start
            token_ids[delta.request_id].extend(delta.token_ids)
    seconds = time.perf_counter() - start
    order = [str(i) for i in range(len(workload.prompts))]
    return seconds, [first_token[r] for r in order], [token_ids[r] for r in order]


def run_prefix_bench(
    model: str | None = None,
    *,
    family: str = "mamba2",
    num_groups: int = 2,
    prompts_per_group: int = 8,
    prefix_len: int = 2048,
    question_len: int = 32,
    output_len: int = 8,
    max_num_seqs: int = EngineConfig.max_num_seqs,
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens,
    device: str = "auto",
    kernel_backend: str = "auto",
    seed: int = 0,
    modes: tuple[str, ...] = MODES,
    repeats: int = 3,
) -> PrefixBenchResult:
    """Run the shared-prefix workload under each mode (see the module docstring).

    model: a local checkpoint (a Llama/Qwen2/Mistral one is linearized to Liger-GLA); None writes the
    tiny demo model of `family` to a temporary directory.
    """
    import torch

    if repeats < 1:
        raise ValueError(f"expected repeats >= 1, got {repeats}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"expected modes among {MODES}, got {mode!r}")
    with tempfile.TemporaryDirectory(prefix="linrec-bench-prefix-") as tmp:
        path, hf_config, linearize = bench_model_dir(model, family, tmp)
        model_type = hf_config.get("model_type")
        workload = make_prefix_workload(
            num_groups, prompts_per_group, prefix_len, question_len, output_len, int(hf_config["vocab_size"]), seed
        )
        # Warm-up: one prompt of the workload's length whose tokens nothing shares, so that every mode
        # (the first one too) meets long prefills warm.
        warm_rng = random.Random(seed + 1)
        warm = [[warm_rng.randrange(int(hf_config["vocab_size"])) for _ in range(prefix_len + question_len)]]
        # Each repeat runs every mode once on a fresh engine (a cold cache), modes interleaved so that
        # load from other processes on a shared machine hits them alike; each mode keeps its fastest run.
        best: dict[str, ModeResult] = {}
        for _ in range(repeats):
            for mode in modes:
                result = _run_one(path, linearize, mode, workload, warm, device, kernel_backend, max_num_seqs,
                                  max_num_batched_tokens, seed)  # fmt: skip
                if mode not in best or result.seconds < best[mode].seconds:
                    best[mode] = result
        results = [best[mode] for mode in modes]
    return PrefixBenchResult(
        model=str(model) if model is not None else f"demo {family} (tiny, seeded random)",
        family=str(model_type),
        num_groups=num_groups,
        prompts_per_group=prompts_per_group,
        prefix_len=prefix_len,
        question_len=question_len,
        output_len=output_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        repeats=repeats,
        num_distinct_tokens=workload.num_distinct_tokens,
        num_prompt_tokens=workload.num_prompt_tokens,
        num_threads=torch.get_num_threads(),
        outputs_identical=all(r.token_ids == results[0].token_ids for r in results),
        modes=results,
    )


def _run_one(
    path: Path,
    linearize: str | None,
    mode: str,
    workload: PrefixWorkload,
    warm: list[list[int]],
    device: str,
    kernel_backend: str,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    seed: int,
) -> ModeResult:
    """One timed run of `mode` on a fresh engine, after a warm-up on tokens the workload does not share."""
    from linrec.engine.llm import LLM

    llm = LLM(
        str(path),
        device=device,
        kernel_backend=kernel_backend,
        linearize=linearize,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_prefix_caching=mode != "off",
        prefix_grouping=mode == "global",
        seed=seed,
    )
    run_mode(llm, PrefixWorkload(warm, 2, 0))
    before = llm.engine.stats()
    seconds, ttft, token_ids = run_mode(llm, workload)
    after = llm.engine.stats()
    computed = after.prefill_tokens_computed - before.prefill_tokens_computed
    num_tokens = workload.num_prompt_tokens + len(workload.prompts) * workload.output_len
    return ModeResult(
        mode=mode,
        seconds=seconds,
        tokens_per_s=num_tokens / seconds,
        requests_per_s=len(workload.prompts) / seconds,
        prefill_tokens_computed=computed,
        prefill_over_distinct=computed / workload.num_distinct_tokens,
        cache_hit_tokens=after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens,
        ttft_p50_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        token_ids=token_ids,
    )

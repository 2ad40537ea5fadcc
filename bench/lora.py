"""`linrec bench lora`: one workload served by the base model, by per-request LoRA over k adapters, and by
the merge-switching peer, side by side in one process.

The workload: `num_requests` prompts of `prompt_len` seeded random tokens, `output_len` tokens each (greedy,
EOS ignored), all queued at once; request i uses adapter i % k. The adapters are written by this bench into a
temporary directory: PEFT LoRA directories of rank `rank` on every projection of the model, seeded random A
and B (both nonzero, so every adapter changes the outputs).

Configurations (greedy, same prompts):
- base: the engine without LoRA, every request on the base model: the reference;
- lora base: the engine with LoRA enabled (max_loras device slots of rank `rank`), every request on the base
  model: what enabling LoRA costs requests that use none;
- lora-k: the same engine, the requests spread round-robin over k adapters, all in one continuous batch;
- merge-k: what a user without per-request LoRA does, on the engine without LoRA: adapter by adapter, merge
  its delta into the projection weights in place (W += scaling * B @ A, A and B already on the device), run
  its requests as one batch, restore the weights from a copy saved at the start (bit for bit). The
  merges and restores are counted in its time (and reported on their own).

Both engines serve every request of a run at once (max_num_seqs = num_requests) and have the prefix cache
off: repeats send the same prompts again, and the peer's in-place merge changes weights under a cache key
that would not change. Each configuration is warmed up once (its first few requests, 2 tokens, every
adapter touched), then the configurations run interleaved `repeats` times; each reports its median.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_ADAPTER_COUNTS = (1, 4, 16)
DEFAULT_RANK = 8
# Adapter init: A and B entries ~ N(0, ADAPTER_STD^2), lora_alpha = 2 * rank (scaling 2): delta entries of std
# 2 * sqrt(rank) * 0.02^2 (2.3e-3 at rank 8), about a tenth of the bench models' weights (std 0.02): enough
# to change every request's greedy tokens, as the bench checks.
ADAPTER_STD = 0.02
ADAPTER_SEED = 1000
# The targets: per-request LoRA over 16 adapters against the base alone and against merge-switching.
TARGET_OVER_BASE = 0.8
TARGET_OVER_MERGE = 3.0
WARMUP_TOKENS = 2


@dataclass
class ConfigResult:
    """One configuration over the whole workload (median of the repeats)."""

    name: str  # "base", "lora base", "lora-k" or "merge-k"
    num_adapters: int  # k (0: base requests)
    seconds: float  # median wall time of a run
    cpu_seconds: float  # median CPU time of this process (all threads) in a run: robust to other load at 1 thread
    merge_seconds: float  # merge-k: median wall seconds spent merging and restoring weights within a run; else 0
    output_tokens_per_s: float  # generated tokens / seconds
    requests_per_s: float
    seconds_runs: list[float]  # wall time of every timed run, in order
    cpu_seconds_runs: list[float]
    token_ids: list[list[int]] = field(default_factory=list, repr=False)  # per request, from the last run


@dataclass
class LoraBenchResult:
    model: str
    family: str  # the model_type linrec serves
    dtype: str
    device: str
    kernel_backend: str
    num_requests: int
    prompt_len: int
    output_len: int
    rank: int
    adapter_counts: list[int]
    max_loras: int
    repeats: int
    num_threads: int  # torch.get_num_threads() during the run
    torch_version: str
    configs: list[ConfigResult]
    lora_base_equals_base: bool  # greedy tokens of "lora base" == "base" (a base request costs LoRA nothing)
    # k -> requests whose greedy tokens under merge-k equal those under lora-k (of num_requests)
    merge_equals_lora: dict[int, int]
    # k -> requests whose greedy tokens under lora-k differ from base (the adapters do something)
    adapted_differ_from_base: dict[int, int]
    weights_restored: bool  # the base engine's weights after every merge-k run are its original bits

    def by_name(self) -> dict[str, ConfigResult]:
        return {c.name: c for c in self.configs}

    def ratios(self, cpu_time: bool = False) -> dict[str, float]:
        """Throughput ratios (same workload: the inverse ratio of times), wall or CPU time: every LoRA
        configuration over base, and lora-k over merge-k."""
        by = self.by_name()

        def over(a: str, b: str) -> float:
            time_of = (lambda c: c.cpu_seconds) if cpu_time else (lambda c: c.seconds)
            return time_of(by[b]) / time_of(by[a])

        out = {"lora base / base": over("lora base", "base")}
        out.update({f"lora-{k} / base": over(f"lora-{k}", "base") for k in self.adapter_counts})
        out.update({f"lora-{k} / merge-{k}": over(f"lora-{k}", f"merge-{k}") for k in self.adapter_counts})
        return out

    def to_json(self) -> str:
        data = asdict(self)
        for config in data["configs"]:
            config.pop("token_ids", None)
        data["ratios"] = self.ratios()
        data["ratios_cpu_time"] = self.ratios(cpu_time=True)
        return json.dumps(data, indent=2)

    def format(self) -> str:
        n = self.num_requests
        rows = [
            f"model: {self.model} ({self.family}, {self.dtype} on {self.device}, kernel backend "
            f"{self.kernel_backend}), torch {self.torch_version}, {self.num_threads} threads",
            f"workload: {n} requests x {self.prompt_len} prompt + {self.output_len} output tokens (greedy, "
            f"ignore_eos), all queued at once; adapters of rank {self.rank} on every projection, round-robin; "
            f"max_loras {self.max_loras}; median of {self.repeats} interleaved runs",
            "",
            f"{'configuration':<13} {'seconds':>8} {'CPU s':>8} {'merge s':>8} {'output tok/s':>13} {'req/s':>8}",
        ]
        for c in self.configs:
            merge = f"{c.merge_seconds:>8.3f}" if c.name.startswith("merge") else f"{'':>8}"
            rows.append(
                f"{c.name:<13} {c.seconds:>8.2f} {c.cpu_seconds:>8.2f} {merge} {c.output_tokens_per_s:>13.1f} "
                f"{c.requests_per_s:>8.2f}"
            )
        rows += ["", f"{'throughput ratio':<22} {'wall':>7} {'CPU time':>9}"]
        targets = {"lora-16 / base": TARGET_OVER_BASE, "lora-16 / merge-16": TARGET_OVER_MERGE}
        cpu_ratios = self.ratios(cpu_time=True)
        for name, ratio in self.ratios().items():
            target = targets.get(name)
            verdict = f"   target >= {target}x: {'met' if ratio >= target else 'NOT met'} (wall)" if target else ""
            rows.append(f"{name:<22} {ratio:>6.2f}x {cpu_ratios[name]:>8.2f}x{verdict}")
        rows.append("")
        rows.append(f"greedy tokens, lora base == base: {'yes' if self.lora_base_equals_base else 'NO'}")
        for k in self.adapter_counts:
            rows.append(
                f"greedy tokens, merge-{k} == lora-{k}: {self.merge_equals_lora[k]}/{n} requests; "
                f"lora-{k} != base: {self.adapted_differ_from_base[k]}/{n}"
            )
        restored = "yes" if self.weights_restored else "NO"
        rows.append(f"base weights restored bit for bit after merge-switching: {restored}")
        return "\n".join(rows)


def make_prompts(num_requests: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """num_requests prompts of prompt_len token ids uniform in [0, vocab_size)."""
    for name, value in (("num_requests", num_requests), ("prompt_len", prompt_len)):
        if value < 1:
            raise ValueError(f"expected {name} >= 1, got {value}")
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(prompt_len)] for _ in range(num_requests)]


def write_lora_adapter(
    dst: str | Path, projections: dict[str, tuple[int, int]], rank: int = DEFAULT_RANK, seed: int = 0
) -> Path:
    """A PEFT LoRA directory of rank `rank` on every projection ({module name: (in_features, out_features)}):
    lora_A [r, in] and lora_B [out, r] seeded N(0, ADAPTER_STD^2) in fp32, lora_alpha = 2 * rank."""
    import torch
    from safetensors.torch import save_file

    if rank < 1:
        raise ValueError(f"expected rank >= 1, got {rank}")
    if not projections:
        raise ValueError("expected at least one projection to adapt, got none")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (in_features, out_features) in sorted(projections.items()):
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * ADAPTER_STD
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * ADAPTER_STD
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in projections}),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (dst / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


@dataclass(frozen=True)
class Served:
    """One pass of a workload through the engine."""

    seconds: float  # first arrival to the last token
    latencies: list[float]  # per request: arrival to the end of the step that returned its last token
    token_ids: list[list[int]]


def serve(
    engine,
    prompts: list[list[int]],
    output_len: int,
    lora_names: Sequence[str | None],
    rate: float | None = None,
    layer_routes: Sequence[tuple[int, ...] | None] | None = None,
) -> Served:
    """Submit prompt i (with adapter lora_names[i] and layer route layer_routes[i]) at i / rate seconds (all at 0
    without a rate) while stepping the engine, until every request has its output_len tokens."""
    from linrec.engine.request import EngineRequest
    from linrec.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    n = len(prompts)
    arrivals = [0.0] * n if rate is None else [i / rate for i in range(n)]
    token_ids: list[list[int]] = [[] for _ in range(n)]
    finished: list[float | None] = [None] * n
    submitted = 0
    start = time.perf_counter()
    while submitted < n or engine.has_unfinished():
        now = time.perf_counter() - start
        while submitted < n and arrivals[submitted] <= now:
            route = layer_routes[submitted] if layer_routes is not None else None
            request = EngineRequest(
                str(submitted), prompts[submitted], params, lora_name=lora_names[submitted], layer_route=route
            )
            engine.add_request(request)
            submitted += 1
        if not engine.has_unfinished():  # idle until the next arrival
            time.sleep(max(0.0, arrivals[submitted] - (time.perf_counter() - start)))
            continue
        deltas = engine.step()
        now = time.perf_counter() - start
        for delta in deltas:
            i = int(delta.request_id)
            token_ids[i].extend(delta.token_ids)
            if delta.finish_reason is not None:
                finished[i] = now
    seconds = time.perf_counter() - start
    for i, ids in enumerate(token_ids):
        if len(ids) != output_len:
            raise RuntimeError(f"request {i} generated {len(ids)} tokens, expected {output_len}")
    return Served(seconds, [end - arrival for end, arrival in zip(finished, arrivals, strict=True)], token_ids)


class MergeSwitching:
    """The peer: one model, one adapter merged at a time, in place. Keeps a copy of every projection weight an
    adapter touches (taken once, before any merge) and each adapter's A, B and scaling on the model's device."""

    def __init__(self, model, adapter_dirs: dict[str, Path]):
        import torch

        from linrec.models.lora import read_lora_adapter

        self.projections = model.projections()
        device = next(model.parameters()).device
        # adapter name -> [(projection, A [r, in] fp32, B [out, r] fp32, scaling)]
        self.adapters: dict[str, list[tuple[object, torch.Tensor, torch.Tensor, float]]] = {}
        touched: set[str] = set()
        for name, path in adapter_dirs.items():
            adapter = read_lora_adapter(path)
            terms = []
            for weight_name, delta in sorted(adapter.deltas.items()):
                module = weight_name.removesuffix(".weight")
                if module not in self.projections:
                    raise ValueError(f"adapter {name!r} targets {module!r}, which is not a projection of this model")
                lora_a = delta.lora_a.to(device=device, dtype=torch.float32)
                lora_b = delta.lora_b.to(device=device, dtype=torch.float32)
                terms.append((self.projections[module], lora_a, lora_b, delta.scaling))
                touched.add(module)
            self.adapters[name] = terms
        self.saved = {module: self.projections[module].weight.detach().clone() for module in sorted(touched)}
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def merge(self, name: str) -> float:
        """W += scaling * B @ A on every projection the adapter targets (fp32 product, one rounding); seconds."""
        import torch

        start = time.perf_counter()
        with torch.no_grad():
            for projection, lora_a, lora_b, scaling in self.adapters[name]:
                projection.weight.add_((lora_b @ lora_a).mul_(scaling))
        self._sync()
        return time.perf_counter() - start

    def restore(self) -> float:
        """Every touched weight back to its saved original, bit for bit; seconds."""
        import torch

        start = time.perf_counter()
        with torch.no_grad():
            for module, original in self.saved.items():
                self.projections[module].weight.copy_(original)
        self._sync()
        return time.perf_counter() - start

    def is_restored(self) -> bool:
        """Whether every touched weight holds exactly its saved bits (compared as bytes: -0.0 and NaN too)."""
        import torch

        return all(
            torch.equal(as_bytes(self.projections[module].weight.detach()), as_bytes(original))
            for module, original in self.saved.items()
        )

    def serve(
        self, engine, prompts: list[list[int]], output_len: int, adapter_of: Sequence[str]
    ) -> tuple[float, list[list[int]]]:
        """Adapter by adapter (in order of first use): merge, run its requests as one batch, restore. Returns
        the seconds spent merging and restoring, and each request's tokens in workload order."""
        order = list(dict.fromkeys(adapter_of))
        token_ids: list[list[int] | None] = [None] * len(prompts)
        merge_seconds = 0.0
        for name in order:
            rows = [i for i, a in enumerate(adapter_of) if a == name]
            merge_seconds += self.merge(name)
            try:
                outputs = serve(engine, [prompts[i] for i in rows], output_len, [None] * len(rows)).token_ids
            finally:
                merge_seconds += self.restore()
            for i, ids in zip(rows, outputs):
                token_ids[i] = ids
        return merge_seconds, token_ids  # type: ignore[return-value]


def as_bytes(t):
    """A tensor's bits as bytes: torch.equal on them is bitwise (-0.0 and NaN included)."""
    import torch

    return t.contiguous().view(torch.uint8)


def adapter_engine_setup(path: Path, device: str, kernel_backend: str, num_requests: int, prompt_len: int,
                         max_num_seqs: int, seed: int):  # fmt: skip
    """What the adapter benches (lora, sparse) serve with: (hf_config, linearize, torch device, dtype, the
    seeded prompts, the engine arguments). Llama/Qwen2/Mistral are served as Liger-GLA; fp32 on the CPU, bf16
    on CUDA; every request in one batch's token budget; the prefix cache off (repeats resend the prompts)."""
    from linrec.bench.common import LINEARIZABLE
    from linrec.engine.core import resolve_device
    from linrec.models.loader import read_hf_config

    hf_config = read_hf_config(path)
    linearize = "liger-gla" if hf_config.get("model_type") in LINEARIZABLE else None
    torch_device = resolve_device(device)
    dtype = "bfloat16" if torch_device.type == "cuda" else "float32"
    prompts = make_prompts(num_requests, prompt_len, int(hf_config["vocab_size"]), seed)
    engine_args = dict(
        dtype=dtype,
        device=device,
        kernel_backend=kernel_backend,
        linearize=linearize,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(2048, num_requests),
        enable_prefix_caching=False,
        seed=seed,
    )
    return hf_config, linearize, torch_device, dtype, prompts, engine_args


def run_lora_bench(
    model: str | None = None,
    *,
    family: str = "liger_gla",
    num_requests: int = 256,
    prompt_len: int = 128,
    output_len: int = 128,
    adapter_counts: Sequence[int] = DEFAULT_ADAPTER_COUNTS,
    rank: int = DEFAULT_RANK,
    max_loras: int | None = None,
    device: str = "auto",
    kernel_backend: str = "auto",
    repeats: int = 3,
    seed: int = 0,
    threads: int | None = None,
) -> LoraBenchResult:
    """Run every configuration (see the module docstring) and compare.

    model: a local checkpoint (Llama/Qwen2/Mistral are served linearized as Liger-GLA); None builds (once)
    the seeded bench model of `family`. dtype: float32 on the CPU, bfloat16 on CUDA. max_loras: device
    adapter slots (default: the largest adapter count). threads: torch CPU threads (None keeps torch's
    default); on a shared machine 1 thread and the CPU-time ratios measure the work rather than the load.
    """
    import torch

    counts = sorted({int(k) for k in adapter_counts})
    if not counts or counts[0] < 1:
        raise ValueError(f"expected adapter counts >= 1, got {list(adapter_counts)}")
    if counts[-1] > num_requests:
        raise ValueError(f"expected at most num_requests={num_requests} adapters, got {counts[-1]}")
    max_loras = counts[-1] if max_loras is None else max_loras
    if max_loras < counts[-1]:
        raise ValueError(f"expected max_loras >= the largest adapter count {counts[-1]}, got {max_loras}")
    if output_len < 1 or repeats < 1:
        raise ValueError(f"expected output_len >= 1 and repeats >= 1, got {output_len} and {repeats}")
    if threads is not None and threads < 1:
        raise ValueError(f"expected threads >= 1, got {threads}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        return _bench(
            model, family, num_requests, prompt_len, output_len, counts, rank, max_loras, device, kernel_backend,
            repeats, seed,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)


def _bench(
    model, family, num_requests, prompt_len, output_len, counts, rank, max_loras, device, kernel_backend, repeats, seed
) -> LoraBenchResult:
    """run_lora_bench's body, under its thread setting, with its arguments checked."""
    import torch

    from linrec.bench.common import served_model_type
    from linrec.bench.throughput import bench_model_path
    from linrec.engine.llm import LLM
    from linrec.kernels.backend import resolve_backend

    path = Path(model) if model is not None else bench_model_path(family)
    hf_config, linearize, torch_device, dtype, prompts, engine_args = adapter_engine_setup(
        path, device, kernel_backend, num_requests, prompt_len, num_requests, seed
    )
    base_llm = LLM(str(path), **engine_args)
    lora_llm = LLM(str(path), enable_lora=True, max_loras=max_loras, max_lora_rank=rank, **engine_args)
    base, lora = base_llm.engine, lora_llm.engine
    projections = {name: (m.in_features, m.out_features) for name, m in base.model.projections().items()}

    with tempfile.TemporaryDirectory(prefix="linrec-bench-lora-") as tmp:
        adapter_dirs = {
            f"adapter-{j}": write_lora_adapter(Path(tmp) / f"adapter-{j}", projections, rank, ADAPTER_SEED + j)
            for j in range(counts[-1])
        }
        for name, adapter_dir in adapter_dirs.items():  # into the host tier, as a server's --lora-modules
            lora.adapters.load(name, adapter_dir)
        peer = MergeSwitching(base.model, adapter_dirs)
        runs = _measure(base, lora, peer, prompts, output_len, counts, repeats)
    # Restored: equal to the copy the peer saved, and to the same checkpoint loaded by the other engine.
    lora_projections = lora.model.projections()
    weights_restored = peer.is_restored() and all(
        torch.equal(as_bytes(m.weight.detach()), as_bytes(lora_projections[name].weight.detach()))
        for name, m in base.model.projections().items()
    )

    results = []
    num_output_tokens = num_requests * output_len
    for name, (k, config_runs) in runs.items():
        seconds = statistics.median(r.seconds for r in config_runs)
        results.append(
            ConfigResult(
                name=name,
                num_adapters=k,
                seconds=seconds,
                cpu_seconds=statistics.median(r.cpu_seconds for r in config_runs),
                merge_seconds=statistics.median(r.merge_seconds for r in config_runs),
                output_tokens_per_s=num_output_tokens / seconds,
                requests_per_s=num_requests / seconds,
                seconds_runs=[r.seconds for r in config_runs],
                cpu_seconds_runs=[r.cpu_seconds for r in config_runs],
                token_ids=config_runs[-1].token_ids,
            )
        )
    tokens = {c.name: c.token_ids for c in results}
    return LoraBenchResult(
        model=str(path) if model is not None else f"bench {family} (seeded random, {path.name})",
        family=str(served_model_type(hf_config, linearize)),
        dtype=dtype,
        device=str(torch_device),
        kernel_backend=resolve_backend(kernel_backend, torch_device),
        num_requests=num_requests,
        prompt_len=prompt_len,
        output_len=output_len,
        rank=rank,
        adapter_counts=counts,
        max_loras=max_loras,
        repeats=repeats,
        num_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        configs=results,
        lora_base_equals_base=tokens["lora base"] == tokens["base"],
        merge_equals_lora={k: sum(a == b for a, b in zip(tokens[f"merge-{k}"], tokens[f"lora-{k}"])) for k in counts},
        adapted_differ_from_base={k: sum(a != b for a, b in zip(tokens[f"lora-{k}"], tokens["base"])) for k in counts},
        weights_restored=weights_restored,
    )


@dataclass(frozen=True)
class _Run:
    """One timed run of one configuration."""

    seconds: float
    cpu_seconds: float
    merge_seconds: float
    token_ids: list[list[int]]


def _measure(
    base, lora, peer: MergeSwitching, prompts: list[list[int]], output_len: int, counts: list[int], repeats: int
) -> dict[str, tuple[int, list[_Run]]]:
    """Warm up every configuration once, then run them interleaved `repeats` times: {name: (k, runs)}."""

    def adapters_of(k: int, n: int) -> list[str]:
        return [f"adapter-{i % k}" for i in range(n)]

    # name -> (k, run(prompts, output_len) -> (merge seconds, token ids))
    configs = {
        "base": (0, lambda p, n: (0.0, serve(base, p, n, [None] * len(p)).token_ids)),
        "lora base": (0, lambda p, n: (0.0, serve(lora, p, n, [None] * len(p)).token_ids)),
    }
    for k in counts:
        configs[f"lora-{k}"] = (k, lambda p, n, k=k: (0.0, serve(lora, p, n, adapters_of(k, len(p))).token_ids))
        configs[f"merge-{k}"] = (k, lambda p, n, k=k: peer.serve(base, p, n, adapters_of(k, len(p))))

    for k, run in configs.values():  # a few requests, every adapter of the configuration among them
        run(prompts[: min(len(prompts), max(k, 4))], WARMUP_TOKENS)
    runs: dict[str, tuple[int, list[_Run]]] = {name: (k, []) for name, (k, _run) in configs.items()}
    for _ in range(repeats):
        for name, (_k, run) in configs.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            merge_seconds, token_ids = run(prompts, output_len)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            runs[name][1].append(_Run(seconds, cpu_seconds, merge_seconds, token_ids))
    return runs

"""`linrec bench sparse`: sparse (SHiRA) adapters served per request, beside LoRA adapters of the same parameter
count and the base model, in one process; and the time to switch a sparse adapter in and out against merging
and unmerging the equivalent LoRA.

Adapters, written by this bench into a temporary directory:
- sparse: linrec's LINREC_SPARSE format, `density` (1%, SHiRA's budget) of the entries of every projection
  weight, at seeded uniform random positions (no repeats), values ~ N(0, SPARSE_STD^2) in fp32;
- LoRA: PEFT LoRA on every projection with the same parameter count: rank r = round(nnz / (in + out)) per
  projection (at least 1; rank_pattern), A and B ~ N(0, ADAPTER_STD^2), lora_alpha = 2r (scaling 2).

1. Switch time, on the served engine's weights (median over `switch_repeats`, synchronized on CUDA):
   - sparse: the runner's SparseSwitch, `switch_to(slot)` then `switch_to(BASE)` (scatter, restore), the
     adapter placed in a device slot as the scheduler places a request's;
   - LoRA merge + unmerge, as peft's merge/unmerge do: W += scaling * B @ A on every projection, then
     W -= the same (A and B already on the device, in fp32);
   - LoRA merge + restore: the same merge, then every weight copied back from a saved copy.
   Checks: after scatter + restore the weights are the saved copy bit for bit; after merge + unmerge, whether
   they are, and the largest difference (the weights are restored from the copy after each pair).
   `switch_only` stops here (a 1.3B-class model's weights are timed this way on a CPU, where serving it would
   take hours).
2. Throughput and latency: `num_requests` prompts of `prompt_len` seeded random tokens, `output_len` tokens
   each (greedy, EOS ignored), arriving all at once (`arrival="burst"`) or at `rate` requests per second
   (submitted by wall clock while the engine steps). Configurations, on one engine (enable_lora, max_loras =
   the largest k, max_num_seqs = num_requests unless given, prefix cache off: repeats send the same prompts
   again):
   - base: every request on the base model;
   - sparse-k: request i on sparse adapter i % k;
   - lora-k: request i on LoRA adapter i % k;
   - mixed-m: even requests on the base model, odd ones round-robin over m sparse adapters: what base (and
     LoRA) requests pay for sharing their steps with sparse adapters' tokens (the per-token add-on).
   Each reports output tok/s, requests/s, p50/p99 latency (arrival to the step that returned the last token;
   a request arriving during a step waits for it, as it would in a server), the engine's mixed steps (sparse
   tokens beside other weights: the add-on) and its scatters and restores. Each configuration is warmed up
   once (a few requests, 2 tokens, every adapter touched), then all run interleaved `repeats` times; each
   figure is the median over the runs.
   Checks: for the first few requests of each sparse-k, the greedy tokens equal those of a second engine
   (no adapters) whose weights the bench merged by hand from the indices and values it wrote
   (W = (W.float() + dense delta).to(dtype)); base tokens equal that engine's; the base half of the mixed run
   equals base; the adapters change tokens; the served weights are the checkpoint's bit for bit after
   every run (the engine leaves the last step's adapter scattered until its next other step, so the bench
   calls `switch_to(BASE)` before comparing).
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from linrec.bench.lora import ADAPTER_STD, MergeSwitching, Served, adapter_engine_setup, as_bytes, serve

if TYPE_CHECKING:
    import torch

DEFAULT_ADAPTER_COUNTS = (1, 4, 16)
DEFAULT_DENSITY = 0.01  # SHiRA's budget: 1-2% of a weight's entries
# Sparse delta values ~ N(0, SPARSE_STD^2): at 1% density the delta's Frobenius norm is about that of the LoRA
# bench's rank-8 delta (std 2.3e-3 over every entry), enough to change greedy tokens, as the bench checks.
SPARSE_STD = 0.02
ADAPTER_SEED = 2000
DEFAULT_MIXED_ADAPTERS = 4
NUM_CHECKED = 4  # requests per sparse-k compared with the hand-merged reference engine
WARMUP_TOKENS = 2
# The targets.
TARGET_SWITCH_SPEEDUP = 10.0  # LoRA merge + unmerge over sparse scatter + restore
TARGET_SPARSE_4_OVER_1 = 0.8  # throughput of sparse-4 over sparse-1
ARRIVALS = ("burst", "rate")
MODEL_SIZES = ("bench", "1.3b")  # the seeded random model without a checkpoint: throughput's, or decode's 1.3B


@dataclass
class SwitchResult:
    """Switching one adapter in and out of the weights: sparse scatter/restore against LoRA merge/unmerge."""

    sparse_params: int  # nnz over every projection
    lora_params: int  # sum of r * (in + out) over every projection
    repeats: int
    # medians over the repeats, seconds
    activate_s: float  # SparseSwitch.switch_to(slot): scatter
    deactivate_s: float  # SparseSwitch.switch_to(BASE): restore
    switch_s: float  # the pair
    merge_s: float  # W += scaling * B @ A, every projection
    unmerge_s: float  # W -= scaling * B @ A
    merge_unmerge_s: float
    restore_copy_s: float  # every weight copied back from a saved copy
    merge_restore_s: float
    sparse_restored_bitwise: bool  # after every scatter + restore, the weights are the saved copy's bits
    unmerge_restored_bitwise: bool  # after every merge + unmerge, the same
    unmerge_max_abs_diff: float  # the largest |W after merge + unmerge - W before| over the repeats

    def ratios(self) -> dict[str, float]:
        return {
            "merge+unmerge / sparse switch": self.merge_unmerge_s / self.switch_s,
            "merge+restore / sparse switch": self.merge_restore_s / self.switch_s,
        }


@dataclass
class ConfigResult:
    """One configuration over the whole workload (medians over the runs)."""

    name: str  # "base", "sparse-k", "lora-k" or "mixed-m"
    num_adapters: int  # k (m for mixed; 0 for base)
    seconds: float  # wall time of a run: first arrival to the last token
    cpu_seconds: float  # CPU time of this process (all threads) in a run
    output_tokens_per_s: float  # generated tokens / seconds
    requests_per_s: float
    p50_latency_s: float  # arrival to last token, every request
    p99_latency_s: float
    base_p50_latency_s: float | None  # the base-model requests' alone (base and mixed; else None)
    base_p99_latency_s: float | None
    mixed_steps: float  # steps whose sparse tokens took the per-token add-on in a run
    sparse_switches: float  # SparseSwitch activations + deactivations in a run
    seconds_runs: list[float]  # every timed run, in order
    token_ids: list[list[int]] = field(default_factory=list, repr=False)  # per request, from the last run


@dataclass
class SparseBenchResult:
    """Both parts; a switch-only run (part 1 alone) has no configurations, and None for the workload's checks."""

    model: str
    family: str  # the model_type linrec serves
    dtype: str
    device: str
    kernel_backend: str
    num_requests: int
    prompt_len: int
    output_len: int
    arrival: str  # "burst" | "rate"
    rate: float | None  # requests per second (arrival "rate")
    density: float
    adapter_counts: list[int]
    mixed_adapters: int
    lora_ranks: dict[str, int]  # projection leaf name ("q_proj", ...) -> the equivalent LoRA rank
    max_loras: int
    max_num_seqs: int  # requests running at once (the rest wait, as admission allows)
    repeats: int
    num_threads: int
    torch_version: str
    switch: SwitchResult
    configs: list[ConfigResult]
    # k -> (requests whose greedy tokens under sparse-k equal the hand-merged reference engine's, checked)
    sparse_equals_reference: dict[int, tuple[int, int]]
    base_equals_reference: bool | None  # the checked requests' base tokens == the reference engine's
    # k -> requests whose greedy tokens under sparse-k (lora-k) differ from base (the adapters do something)
    sparse_differ_from_base: dict[int, int]
    lora_differ_from_base: dict[int, int]
    mixed_base_equals_base: bool | None  # the mixed run's base requests generate exactly base's tokens
    weights_restored: bool | None  # served weights == the checkpoint's bits after every run (and the reference's)

    def by_name(self) -> dict[str, ConfigResult]:
        return {c.name: c for c in self.configs}

    def ratios(self, cpu_time: bool = False) -> dict[str, float]:
        """Throughput ratios (same workload: the inverse ratio of times), wall or CPU time: sparse-k / sparse-1,
        sparse-k / lora-k, and each over base; and the base requests' p99 latency in the mixed run over base
        alone's (wall time either way)."""
        by = self.by_name()
        if not by:  # switch only
            return {}

        def over(a: str, b: str) -> float:
            time_of = (lambda c: c.cpu_seconds) if cpu_time else (lambda c: c.seconds)
            return time_of(by[b]) / time_of(by[a])

        out = {}
        if 1 in self.adapter_counts:
            out.update({f"sparse-{k} / sparse-1": over(f"sparse-{k}", "sparse-1") for k in self.adapter_counts[1:]})
        out.update({f"sparse-{k} / lora-{k}": over(f"sparse-{k}", f"lora-{k}") for k in self.adapter_counts})
        out.update({f"sparse-{k} / base": over(f"sparse-{k}", "base") for k in self.adapter_counts})
        out.update({f"lora-{k} / base": over(f"lora-{k}", "base") for k in self.adapter_counts})
        mixed, base = by[f"mixed-{self.mixed_adapters}"], by["base"]
        out[f"mixed-{self.mixed_adapters} base p99 / base p99"] = mixed.base_p99_latency_s / base.base_p99_latency_s
        return out

    def targets_met(self) -> dict[str, bool]:
        met = {"switch": self.switch.ratios()["merge+unmerge / sparse switch"] >= TARGET_SWITCH_SPEEDUP}
        ratio = self.ratios().get("sparse-4 / sparse-1")
        if ratio is not None:
            met["sparse-4 / sparse-1"] = ratio >= TARGET_SPARSE_4_OVER_1
        return met

    def checks_passed(self) -> bool:
        """Every self-check of the run (those of the workload count only when it ran)."""
        workload = (self.base_equals_reference, self.mixed_base_equals_base, self.weights_restored)
        return (
            all(same == checked for same, checked in self.sparse_equals_reference.values())
            and all(check is not False for check in workload)
            and self.switch.sparse_restored_bitwise
        )

    def to_json(self) -> str:
        data = asdict(self)
        for config in data["configs"]:
            config.pop("token_ids", None)
        data["switch_ratios"] = self.switch.ratios()
        data["ratios"] = self.ratios()
        data["ratios_cpu_time"] = self.ratios(cpu_time=True)
        data["targets_met"] = self.targets_met()
        data["checks_passed"] = self.checks_passed()
        return json.dumps(data, indent=2)

    def format(self) -> str:
        s = self.switch
        ranks = ", ".join(f"{leaf} {r}" for leaf, r in self.lora_ranks.items())
        rows = [
            f"model: {self.model} ({self.family}, {self.dtype} on {self.device}, kernel backend "
            f"{self.kernel_backend}), torch {self.torch_version}, {self.num_threads} threads",
            f"adapters on every projection: sparse {self.density:.2%} of the entries ({s.sparse_params:,} params); "
            f"LoRA of equal size, rank {ranks} ({s.lora_params:,} params)",
            "",
            f"switch (median of {s.repeats}):  sparse scatter {_ms(s.activate_s)} + restore {_ms(s.deactivate_s)} = "
            f"{_ms(s.switch_s)}",
            f"  LoRA merge {_ms(s.merge_s)} + unmerge {_ms(s.unmerge_s)} = {_ms(s.merge_unmerge_s)}   "
            f"merge + restore copy {_ms(s.restore_copy_s)} = {_ms(s.merge_restore_s)}",
        ]
        for name, ratio in s.ratios().items():
            target = TARGET_SWITCH_SPEEDUP if name.startswith("merge+unmerge") else None
            verdict = f"   target >= {target:g}x: {'met' if ratio >= target else 'NOT met'}" if target else ""
            rows.append(f"  {name}: {ratio:.1f}x{verdict}")
        rows += [
            f"  weights after scatter + restore == saved copy bit for bit: {_yes(s.sparse_restored_bitwise)}; after "
            f"merge + unmerge: {_yes(s.unmerge_restored_bitwise)} (max |diff| {s.unmerge_max_abs_diff:.3g})",
        ]
        if self.configs:
            rows += self._format_workload()
        rows.append(f"self-checks: {'passed' if self.checks_passed() else 'FAILED'}")
        return "\n".join(rows)

    def _format_workload(self) -> list[str]:
        n = self.num_requests
        arrival = "all queued at once" if self.arrival == "burst" else f"arriving at {self.rate:g} req/s"
        rows = [
            "",
            f"workload: {n} requests x {self.prompt_len} prompt + {self.output_len} output tokens (greedy, "
            f"ignore_eos), {arrival}, round-robin over the adapters; max_loras {self.max_loras}, max_num_seqs "
            f"{self.max_num_seqs}; median of "
            f"{self.repeats} interleaved runs",
            f"{'configuration':<13} {'seconds':>8} {'CPU s':>8} {'output tok/s':>13} {'req/s':>8} {'p50 s':>8} "
            f"{'p99 s':>8} {'base p99':>9} {'mixed':>6} {'switches':>9}",
        ]
        for c in self.configs:
            base_p99 = f"{c.base_p99_latency_s:>9.3f}" if c.base_p99_latency_s is not None else f"{'':>9}"
            rows.append(
                f"{c.name:<13} {c.seconds:>8.2f} {c.cpu_seconds:>8.2f} {c.output_tokens_per_s:>13.1f} "
                f"{c.requests_per_s:>8.2f} {c.p50_latency_s:>8.3f} {c.p99_latency_s:>8.3f} {base_p99} "
                f"{c.mixed_steps:>6g} {c.sparse_switches:>9g}"
            )
        rows += ["", f"{'ratio (throughput; the mixed run: latency)':<44} {'wall':>7} {'CPU time':>9}"]
        cpu_ratios = self.ratios(cpu_time=True)
        for name, ratio in self.ratios().items():
            verdict = ""
            if name == "sparse-4 / sparse-1":
                met = ratio >= TARGET_SPARSE_4_OVER_1
                verdict = f"   target >= {TARGET_SPARSE_4_OVER_1}x: {'met' if met else 'NOT met'} (wall)"
            cpu = f"{cpu_ratios[name]:>8.2f}x" if "p99" not in name else f"{'':>9}"
            rows.append(f"  {name:<42} {ratio:>6.2f}x {cpu}{verdict}")
        rows.append("")
        for k in self.adapter_counts:
            same, checked = self.sparse_equals_reference[k]
            rows.append(
                f"greedy tokens, sparse-{k} == hand-merged reference: {same}/{checked} requests; sparse-{k} != base: "
                f"{self.sparse_differ_from_base[k]}/{n}; lora-{k} != base: {self.lora_differ_from_base[k]}/{n}"
            )
        rows.append(
            f"greedy tokens, base == reference engine: {_yes(self.base_equals_reference)}; mixed-{self.mixed_adapters}"
            f" base requests == base: {_yes(self.mixed_base_equals_base)}"
        )
        rows.append(f"base weights bit for bit after every run: {_yes(self.weights_restored)}")
        return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def equivalent_rank(in_features: int, out_features: int, density: float) -> int:
    """The LoRA rank with about as many parameters as `density` of an [out, in] weight: r * (in + out) ~= nnz."""
    return max(1, round(_nnz(in_features, out_features, density) / (in_features + out_features)))


def _nnz(in_features: int, out_features: int, density: float) -> int:
    return max(1, round(density * in_features * out_features))


def sparse_deltas(
    projections: dict[str, tuple[int, int]], density: float, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (indices [2, nnz] (row, col), values [nnz] fp32)}: `density` of every projection's entries at
    seeded uniform random positions, without repeats; values ~ N(0, SPARSE_STD^2)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, (in_features, out_features) in sorted(projections.items()):
        numel, nnz = in_features * out_features, _nnz(in_features, out_features, density)
        # draws with replacement, deduplicated, then nnz of them in random order: no numel-sized permutation
        flat = torch.empty(0, dtype=torch.int64)
        while flat.numel() < nnz:
            draw = torch.randint(numel, (nnz + nnz // 8 + 16,), generator=generator)
            flat = torch.unique(torch.cat([flat, draw]))
        flat = flat[torch.randperm(flat.numel(), generator=generator)[:nnz]]
        indices = torch.stack([flat // in_features, flat % in_features])
        out[name] = (indices, torch.randn(nnz, generator=generator) * SPARSE_STD)
    return out


def write_equivalent_lora(dst: str | Path, projections: dict[str, tuple[int, int]], density: float, seed: int) -> Path:
    """A PEFT LoRA directory on every projection with rank equivalent_rank(in, out, density) each (rank_pattern),
    A [r, in] and B [out, r] seeded N(0, ADAPTER_STD^2) in fp32, lora_alpha = 2r (alpha_pattern: scaling 2)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors, ranks = {}, {}
    for name, (in_features, out_features) in sorted(projections.items()):
        rank = ranks[name] = equivalent_rank(in_features, out_features, density)
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * ADAPTER_STD
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * ADAPTER_STD
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    default_rank = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "r": default_rank,
        "lora_alpha": 2 * default_rank,
        # peft matches a key as the tail of a module name, a regex: the escaped full name matches exactly one
        "rank_pattern": {re.escape(name): r for name, r in ranks.items()},
        "alpha_pattern": {re.escape(name): 2 * r for name, r in ranks.items()},
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in projections}),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (dst / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


class MergeUnmerge(MergeSwitching):
    """The LoRA peer of the switch timing: MergeSwitching's merge and restore-from-copy, plus peft's unmerge."""

    def unmerge(self, name: str) -> float:
        """W -= scaling * B @ A on every projection the adapter targets (as peft's unmerge); seconds."""
        import torch

        start = time.perf_counter()
        with torch.no_grad():
            for projection, lora_a, lora_b, scaling in self.adapters[name]:
                projection.weight.sub_((lora_b @ lora_a).mul_(scaling))
        self._sync()
        return time.perf_counter() - start

    def max_abs_diff(self) -> float:
        """The largest |W - saved| over every touched weight, in fp32."""
        return max(
            (self.projections[m].weight.detach().float() - saved.float()).abs().max().item()
            for m, saved in self.saved.items()
        )


def run_sparse_bench(
    model: str | None = None,
    *,
    family: str = "liger_gla",
    size: str = "bench",
    num_requests: int = 256,
    prompt_len: int = 128,
    output_len: int = 128,
    adapter_counts: Sequence[int] = DEFAULT_ADAPTER_COUNTS,
    density: float = DEFAULT_DENSITY,
    arrival: str = "burst",
    rate: float | None = None,
    mixed_adapters: int | None = None,
    max_num_seqs: int | None = None,
    device: str = "auto",
    kernel_backend: str = "auto",
    repeats: int = 3,
    switch_repeats: int = 20,
    switch_only: bool = False,
    seed: int = 0,
    threads: int | None = None,
) -> SparseBenchResult:
    """Run the switch timing and every configuration (see the module docstring) and compare.

    model: a local checkpoint (Llama/Qwen2/Mistral are served linearized as Liger-GLA); None builds (once) the
    seeded random model of `family` at `size`: "bench" (hidden 512, 4 layers) or "1.3b" (`linrec bench decode`'s).
    switch_only: part 1 alone (no workload, no reference engine), for models too large to serve on a CPU.
    dtype: float32 on the CPU, bfloat16 on CUDA. mixed_adapters: the sparse adapters of the mixed run (default:
    4, at most the largest k). max_num_seqs: requests running at once (default: all of them; fewer leaves a
    queue). threads: torch CPU threads (None keeps torch's default).
    """
    import torch

    counts = sorted({int(k) for k in adapter_counts})
    if not counts or counts[0] < 1:
        raise ValueError(f"expected adapter counts >= 1, got {list(adapter_counts)}")
    if num_requests < 2 or counts[-1] > num_requests:
        raise ValueError(f"expected num_requests >= max(2, the largest adapter count {counts[-1]}), got {num_requests}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"expected 0 < density <= 1, got {density}")
    if arrival not in ARRIVALS:
        raise ValueError(f"expected arrival in {ARRIVALS}, got {arrival!r}")
    if (arrival == "rate") != (rate is not None) or (rate is not None and not rate > 0):
        raise ValueError(f"expected a rate > 0 exactly with arrival 'rate', got arrival {arrival!r} and rate {rate}")
    mixed_adapters = min(DEFAULT_MIXED_ADAPTERS, counts[-1]) if mixed_adapters is None else mixed_adapters
    if not 1 <= mixed_adapters <= counts[-1]:
        raise ValueError(
            f"expected 1 <= mixed_adapters <= the largest adapter count {counts[-1]}, got {mixed_adapters}"
        )
    if output_len < 1 or repeats < 1 or switch_repeats < 1:
        raise ValueError(
            f"expected output_len, repeats and switch_repeats >= 1, got {output_len}, {repeats}, {switch_repeats}"
        )
    if threads is not None and threads < 1:
        raise ValueError(f"expected threads >= 1, got {threads}")
    max_num_seqs = num_requests if max_num_seqs is None else max_num_seqs
    if max_num_seqs < 1:
        raise ValueError(f"expected max_num_seqs >= 1, got {max_num_seqs}")
    if size not in MODEL_SIZES:
        raise ValueError(f"expected size in {MODEL_SIZES}, got {size!r}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        return _bench(
            model, family, size, num_requests, prompt_len, output_len, counts, density, rate, mixed_adapters,
            max_num_seqs, device,
            kernel_backend, repeats, switch_repeats, switch_only, seed,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)


def _bench(
    model, family, size, num_requests, prompt_len, output_len, counts, density, rate, mixed_adapters, max_num_seqs,
    device,
    kernel_backend, repeats, switch_repeats, switch_only, seed,
) -> SparseBenchResult:  # fmt: skip
    """run_sparse_bench's body, under its thread setting, with its arguments checked."""
    import torch

    from linrec.bench.common import served_model_type
    from linrec.bench.decode import decode_model_path
    from linrec.bench.throughput import bench_model_path
    from linrec.engine.llm import LLM
    from linrec.kernels.backend import resolve_backend
    from linrec.models.sparse import write_sparse_delta

    if model is not None:
        path, model_name = Path(model), model
    else:
        path = bench_model_path(family) if size == "bench" else decode_model_path(family, size)
        model_name = f"{size} {family} (seeded random, {path.name})"
    hf_config, linearize, torch_device, dtype, prompts, engine_args = adapter_engine_setup(
        path, device, kernel_backend, num_requests, prompt_len, max_num_seqs, seed
    )
    if switch_only:
        return _switch_only(
            path, model_name, hf_config, linearize, torch_device, dtype, engine_args, density, switch_repeats
        )
    # The reference engine (no adapters) is built first: its projections give the adapters' shapes.
    reference = LLM(str(path), **engine_args).engine
    projections = {name: (m.in_features, m.out_features) for name, m in reference.model.projections().items()}
    ranks = {name: equivalent_rank(i, o, density) for name, (i, o) in projections.items()}
    num_adapters = counts[-1]
    served = LLM(
        str(path),
        enable_lora=True,
        max_loras=num_adapters,
        max_lora_rank=max(ranks.values()),
        max_cpu_loras=2 * num_adapters,  # every adapter of both kinds in the host tier: no disk read while timed
        **engine_args,
    ).engine

    with tempfile.TemporaryDirectory(prefix="linrec-bench-sparse-") as tmp:
        deltas = {f"sparse-{j}": sparse_deltas(projections, density, ADAPTER_SEED + j) for j in range(num_adapters)}
        lora_dirs = {}
        for j in range(num_adapters):
            served.adapters.load(f"sparse-{j}", write_sparse_delta(Path(tmp) / f"sparse-{j}", deltas[f"sparse-{j}"]))
            lora_dirs[f"lora-{j}"] = write_equivalent_lora(Path(tmp) / f"lora-{j}", projections, density, seed=j)
            served.adapters.load(f"lora-{j}", lora_dirs[f"lora-{j}"])
        peer = MergeUnmerge(served.model, {"lora-0": lora_dirs["lora-0"]})
        switch = _time_switch(served, peer, switch_repeats)
    original = {name: m.weight.detach().clone() for name, m in served.model.projections().items()}
    configs = _configs(counts, mixed_adapters, num_requests)
    runs, weights_restored = _measure(served, configs, prompts, output_len, rate, repeats, original)
    weights_restored = weights_restored and _same_bits(reference.model.projections(), original)

    results = []
    num_output_tokens = num_requests * output_len
    for name, (k, names) in configs.items():
        config_runs = runs[name]
        seconds = statistics.median(r.served.seconds for r in config_runs)
        base_rows = [i for i, a in enumerate(names) if a is None]
        results.append(
            ConfigResult(
                name=name,
                num_adapters=k,
                seconds=seconds,
                cpu_seconds=statistics.median(r.cpu_seconds for r in config_runs),
                output_tokens_per_s=num_output_tokens / seconds,
                requests_per_s=num_requests / seconds,
                p50_latency_s=_median_percentile(config_runs, range(num_requests), 50),
                p99_latency_s=_median_percentile(config_runs, range(num_requests), 99),
                base_p50_latency_s=_median_percentile(config_runs, base_rows, 50) if base_rows else None,
                base_p99_latency_s=_median_percentile(config_runs, base_rows, 99) if base_rows else None,
                mixed_steps=statistics.median(r.mixed_steps for r in config_runs),
                sparse_switches=statistics.median(r.sparse_switches for r in config_runs),
                seconds_runs=[r.served.seconds for r in config_runs],
                token_ids=config_runs[-1].served.token_ids,
            )
        )
    tokens = {c.name: c.token_ids for c in results}
    checked = list(range(min(NUM_CHECKED, num_requests)))
    reference_tokens = _hand_merged_tokens(reference, deltas, prompts, output_len, counts, checked)
    mixed_names = configs[f"mixed-{mixed_adapters}"][1]

    def differ(name: str) -> int:
        return sum(a != b for a, b in zip(tokens[name], tokens["base"]))

    return SparseBenchResult(
        model=model_name,
        family=str(served_model_type(hf_config, linearize)),
        dtype=dtype,
        device=str(torch_device),
        kernel_backend=resolve_backend(kernel_backend, torch_device),
        num_requests=num_requests,
        prompt_len=prompt_len,
        output_len=output_len,
        arrival="burst" if rate is None else "rate",
        rate=rate,
        density=density,
        adapter_counts=counts,
        mixed_adapters=mixed_adapters,
        lora_ranks=_leaf_ranks(projections, density),
        max_loras=num_adapters,
        max_num_seqs=max_num_seqs,
        repeats=repeats,
        num_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        switch=switch,
        configs=results,
        sparse_equals_reference={
            k: (sum(tokens[f"sparse-{k}"][i] == reference_tokens[k][i] for i in checked), len(checked)) for k in counts
        },
        base_equals_reference=all(tokens["base"][i] == reference_tokens[0][i] for i in checked),
        sparse_differ_from_base={k: differ(f"sparse-{k}") for k in counts},
        lora_differ_from_base={k: differ(f"lora-{k}") for k in counts},
        mixed_base_equals_base=all(
            tokens[f"mixed-{mixed_adapters}"][i] == tokens["base"][i] for i, a in enumerate(mixed_names) if a is None
        ),
        weights_restored=weights_restored,
    )


def _switch_only(
    path, model_name, hf_config, linearize, torch_device, dtype, engine_args, density, repeats
) -> SparseBenchResult:
    """Part 1 alone: one engine, one sparse adapter in its registry, the LoRA peer read from its directory."""
    import torch

    from linrec.bench.common import served_model_type
    from linrec.engine.llm import LLM
    from linrec.kernels.backend import resolve_backend
    from linrec.models.sparse import write_sparse_delta

    # max_loras 1: the sparse adapter's device copy; the LoRA peer merges into the weights and needs no slot
    served = LLM(str(path), enable_lora=True, max_loras=1, **engine_args).engine
    projections = {name: (m.in_features, m.out_features) for name, m in served.model.projections().items()}
    with tempfile.TemporaryDirectory(prefix="linrec-bench-sparse-") as tmp:
        deltas = sparse_deltas(projections, density, ADAPTER_SEED)
        served.adapters.load("sparse-0", write_sparse_delta(Path(tmp) / "sparse-0", deltas))
        lora_dir = write_equivalent_lora(Path(tmp) / "lora-0", projections, density, seed=0)
        switch = _time_switch(served, MergeUnmerge(served.model, {"lora-0": lora_dir}), repeats)
    return SparseBenchResult(
        model=model_name,
        family=str(served_model_type(hf_config, linearize)),
        dtype=dtype,
        device=str(torch_device),
        kernel_backend=resolve_backend(engine_args["kernel_backend"], torch_device),
        num_requests=0,
        prompt_len=0,
        output_len=0,
        arrival="burst",
        rate=None,
        density=density,
        adapter_counts=[],
        mixed_adapters=0,
        lora_ranks=_leaf_ranks(projections, density),
        max_loras=1,
        max_num_seqs=engine_args["max_num_seqs"],
        repeats=0,
        num_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        switch=switch,
        configs=[],
        sparse_equals_reference={},
        base_equals_reference=None,
        sparse_differ_from_base={},
        lora_differ_from_base={},
        mixed_base_equals_base=None,
        weights_restored=None,
    )


def _time_switch(engine, peer: MergeUnmerge, repeats: int) -> SwitchResult:
    """Part 1 on the served engine's weights: the runner's SparseSwitch against peer's merge/unmerge/restore,
    interleaved, each timed alone; the weights end as they began."""
    import torch

    from linrec.engine.sparse_switch import BASE

    switch = engine.runner.sparse_switch
    adapter = engine.adapters.get("sparse-0")
    slots = engine.scheduler.adapter_slots  # a device slot holding it, placed as a request's would be
    slot, needs_load = slots.acquire(adapter)
    if needs_load:
        engine.runner.load_adapter(slot, adapter)
    slots.release(slot)
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    # once untimed: the deltas' device copies, the allocator, the kernels
    switch.switch_to(slot)
    switch.switch_to(BASE)
    peer.merge("lora-0")
    peer.unmerge("lora-0")
    peer.restore()
    times: dict[str, list[float]] = {k: [] for k in ("activate", "deactivate", "merge", "unmerge", "merge2", "copy")}
    sparse_bitwise = unmerge_bitwise = True
    max_diff = 0.0
    for _ in range(repeats):
        times["activate"].append(timed(lambda: switch.switch_to(slot)))
        times["deactivate"].append(timed(lambda: switch.switch_to(BASE)))
        sparse_bitwise &= peer.is_restored()
        times["merge"].append(peer.merge("lora-0"))
        times["unmerge"].append(peer.unmerge("lora-0"))
        unmerge_bitwise &= peer.is_restored()
        max_diff = max(max_diff, peer.max_abs_diff())
        peer.restore()  # untimed: the next pair starts from the original bits
        times["merge2"].append(peer.merge("lora-0"))
        times["copy"].append(peer.restore())
    median = {k: statistics.median(v) for k, v in times.items()}

    def pair(first: str, second: str) -> float:
        return statistics.median(x + y for x, y in zip(times[first], times[second]))

    return SwitchResult(
        sparse_params=adapter.num_params,
        lora_params=sum(a.numel() + b.numel() for _p, a, b, _s in peer.adapters["lora-0"]),
        repeats=repeats,
        activate_s=median["activate"],
        deactivate_s=median["deactivate"],
        switch_s=pair("activate", "deactivate"),
        merge_s=median["merge"],
        unmerge_s=median["unmerge"],
        merge_unmerge_s=pair("merge", "unmerge"),
        restore_copy_s=median["copy"],
        merge_restore_s=pair("merge2", "copy"),
        sparse_restored_bitwise=sparse_bitwise and peer.is_restored(),
        unmerge_restored_bitwise=unmerge_bitwise,
        unmerge_max_abs_diff=max_diff,
    )


def _configs(counts: list[int], mixed_adapters: int, n: int) -> dict[str, tuple[int, list[str | None]]]:
    """{name: (k, the adapter of each request)}, in run order."""
    configs: dict[str, tuple[int, list[str | None]]] = {"base": (0, [None] * n)}
    for kind in ("sparse", "lora"):
        for k in counts:
            configs[f"{kind}-{k}"] = (k, [f"{kind}-{i % k}" for i in range(n)])
    mixed = [None if i % 2 == 0 else f"sparse-{(i // 2) % mixed_adapters}" for i in range(n)]
    configs[f"mixed-{mixed_adapters}"] = (mixed_adapters, mixed)
    return configs


@dataclass(frozen=True)
class _Run:
    """One timed run of one configuration."""

    served: Served
    cpu_seconds: float
    mixed_steps: int
    sparse_switches: int


def _measure(engine, configs, prompts, output_len, rate, repeats, original) -> tuple[dict[str, list[_Run]], bool]:
    """Warm up every configuration once, then run them interleaved `repeats` times. Returns {name: runs} and
    whether the projection weights were `original`'s bits after every run."""
    from linrec.engine.sparse_switch import BASE

    for k, names in configs.values():  # a few requests, every adapter of the configuration among them
        m = min(len(prompts), max(2 * k, 4))
        serve(engine, prompts[:m], WARMUP_TOKENS, names[:m])
    runs: dict[str, list[_Run]] = {name: [] for name in configs}
    restored = True
    for _ in range(repeats):
        for name, (_k, names) in configs.items():
            mixed, switches = engine.scheduler.num_sparse_mixed_steps, engine.runner.sparse_switch.num_switches
            cpu_start = time.process_time()
            result = serve(engine, prompts, output_len, names, rate)
            cpu_seconds = time.process_time() - cpu_start
            runs[name].append(
                _Run(
                    result,
                    cpu_seconds,
                    engine.scheduler.num_sparse_mixed_steps - mixed,
                    engine.runner.sparse_switch.num_switches - switches,
                )
            )
            # the last step may leave an adapter scattered (the engine restores at its next other step): compare
            # with the base weights in place, as that step would see them
            engine.runner.sparse_switch.switch_to(BASE)
            restored &= _same_bits(engine.model.projections(), original)
    return runs, restored


def _hand_merged_tokens(engine, deltas, prompts, output_len, counts, checked) -> dict[int, list[list[int] | None]]:
    """{0: base tokens, k: sparse-k's} of the `checked` requests on the reference engine: for each adapter, its
    written deltas merged into the weights by hand (W = (W.float() + dense delta).to(dtype)), its requests served,
    the weights copied back."""
    import torch

    projections = engine.model.projections()
    saved = {name: m.weight.detach().clone() for name, m in projections.items()}
    out: dict[int, list[list[int] | None]] = {0: [None] * len(prompts)}
    base = serve(engine, [prompts[i] for i in checked], output_len, [None] * len(checked))
    for i, ids in zip(checked, base.token_ids):
        out[0][i] = ids
    by_adapter: dict[str, list[list[int]]] = {}
    for k in counts:
        out[k] = [None] * len(prompts)
        for name in sorted({f"sparse-{i % k}" for i in checked}):
            if name not in by_adapter:
                with torch.no_grad():
                    for module, (indices, values) in deltas[name].items():
                        weight = projections[module].weight
                        dense = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                        dense[indices[0], indices[1]] = values.to(weight.device)
                        weight.copy_((weight.float() + dense).to(weight.dtype))
                try:
                    by_adapter[name] = serve(engine, [prompts[i] for i in checked], output_len, [None] * len(checked))
                finally:
                    with torch.no_grad():
                        for module, weight in saved.items():
                            projections[module].weight.copy_(weight)
            for i, ids in zip(checked, by_adapter[name].token_ids):
                if f"sparse-{i % k}" == name:
                    out[k][i] = ids
    return out


def _leaf_ranks(projections: dict[str, tuple[int, int]], density: float) -> dict[str, int]:
    """{projection leaf name ("q_proj", ...): its equivalent LoRA rank} (every layer has the same shapes)."""
    return {name.rsplit(".", 1)[-1]: equivalent_rank(i, o, density) for name, (i, o) in sorted(projections.items())}


def _same_bits(projections, original) -> bool:
    """Whether every projection weight holds exactly `original`'s bits (as bytes: -0.0 and NaN too)."""
    import torch

    return all(torch.equal(as_bytes(m.weight.detach()), as_bytes(original[name])) for name, m in projections.items())


def _median_percentile(runs: list[_Run], rows, q: float) -> float:
    """The median over runs of the q-th percentile of the latencies of `rows`."""
    from linrec.bench.common import percentile

    rows = list(rows)
    return statistics.median(percentile([r.served.latencies[i] for i in rows], q) for r in runs)

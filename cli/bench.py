"""`linrec bench ...`: the workloads of bench/ (and `bench serve`, the load test of loadtest/), each
measuring linrec beside a peer in one run."""

from __future__ import annotations

import argparse
import sys

from linrec.bench.common import BENCH_FAMILIES, SIZES
from linrec.bench.decode import DECODE_FAMILIES
from linrec.bench.throughput import THROUGHPUT_MAX_NUM_SEQS
from linrec.cli.common import add_config_args
from linrec.engine.config import EngineConfig
from linrec.models.registry import DEMO_FAMILIES

# The engine flags of the benches are EngineConfig's (same defaults and choices) unless a bench says otherwise.
SCHEDULING_FIELDS = ("max_num_seqs", "max_num_batched_tokens")


def add_parser(commands) -> None:
    """`linrec bench throughput`, `kernels`, `decode`, `prefix`, `fairness`, `stop-strings`, `startup`, `lora`,
    `sparse`, `routing`, `multiturn` and `serve`: contenders side by side, in one run."""
    bench = commands.add_parser(
        "bench", help="measure linrec beside a peer in one run", description="Benchmarks; each prints ratios."
    )
    kinds = bench.add_subparsers(dest="bench", metavar="BENCH")
    for add in (
        _add_throughput,
        _add_prefix,
        _add_lora,
        _add_sparse,
        _add_routing,
        _add_multiturn,
        _add_stop_strings,
        _add_fairness,
        _add_kernels,
        _add_decode,
        _add_gpu_check,
        _add_startup,
        _add_ready,
        _add_serve,
    ):
        add(kinds)
    bench.set_defaults(handler=lambda args: (bench.print_help(sys.stderr), 2)[1])


def _add_throughput(kinds) -> None:
    throughput = kinds.add_parser(
        "throughput",
        help="offline throughput: linrec LLM.generate vs HF transformers generate on one mixed workload",
        description="Many prompts with seeded mixed prompt and output lengths (greedy, EOS ignored) through "
        "linrec and through HF generate (batched, left-padded, same weights and dtype). HF batches generate "
        "their longest request; only requested tokens count as useful output.",
    )
    throughput.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="Llama/Qwen2/Mistral (served as Liger-GLA; peer: the original under HF generate), Liger, LoLCATs "
        "(peer: its base Llama/Mistral) or mamba2 checkpoint (default: a seeded random bench model of --family, "
        "written once under the cache dir)",
    )
    throughput.add_argument("--family", default="liger_gla", choices=BENCH_FAMILIES, help="bench model without --model")
    add_config_args(
        throughput,
        EngineConfig,
        ("dtype", "device", "kernel_backend"),
        helps={"dtype": "both sides load in this dtype", "device": "auto, cpu, cuda, cuda:N (both sides)"},
    )
    throughput.add_argument("--num-prompts", dest="num_prompts", type=int, default=128)
    throughput.add_argument("--prompt-len", dest="prompt_len", default="16:256", metavar="MIN:MAX")
    throughput.add_argument("--output-len", dest="output_len", default="16:256", metavar="MIN:MAX")
    throughput.add_argument(
        "--hf-batch-size",
        dest="hf_batch_size",
        default="32",
        metavar="N[,N...]",
        help="rows per HF batch; several sizes run one after another and the fastest is the peer",
    )
    add_config_args(
        throughput,
        EngineConfig,
        SCHEDULING_FIELDS,
        # Deliberately wider than EngineConfig's default: linrec's throughput comes from wide continuous
        # batches, and the figures in docs/benchmarks.md were measured with it.
        defaults={"max_num_seqs": THROUGHPUT_MAX_NUM_SEQS},
        helps={
            "max_num_seqs": f"linrec's requests running at once; {THROUGHPUT_MAX_NUM_SEQS} here, not EngineConfig's "
            f"{EngineConfig.max_num_seqs}: throughput comes from wide batches (docs/benchmarks.md)"
        },
    )
    throughput.add_argument("--seed", type=int, default=0, help="workload RNG")
    throughput.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads for both sides (default: torch's choice)"
    )
    throughput.add_argument("--json", action="store_true", help="print the result as JSON")
    throughput.set_defaults(handler=_run_bench_throughput)


def _run_bench_throughput(args: argparse.Namespace) -> int:
    from linrec.bench.common import parse_batch_sizes
    from linrec.bench.throughput import parse_range, run_throughput

    result = run_throughput(
        args.model,
        family=args.family,
        dtype=args.dtype,
        device=args.device,
        kernel_backend=args.kernel_backend,
        num_prompts=args.num_prompts,
        prompt_len=parse_range(args.prompt_len),
        output_len=parse_range(args.output_len),
        hf_batch_size=parse_batch_sizes(args.hf_batch_size),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
        threads=args.threads,
    )
    print(result.to_json() if args.json else result.format())
    return 0


def _add_prefix(kinds) -> None:
    prefix = kinds.add_parser(
        "prefix",
        help="shared-prefix workload: prefix cache off vs radix cache vs global grouping",
        description="Groups of prompts sharing a long system prompt with short unique questions and short "
        "outputs (greedy), all queued at once, run with the prefix cache off, as an LRU-style radix cache "
        "(no grouping) and with global prefix grouping: throughput, prefill tokens computed, TTFT p50/p99.",
    )
    prefix.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="local checkpoint (Llama/Qwen2/Mistral are linearized to Liger-GLA); default: the tiny demo model "
        "of --family",
    )
    prefix.add_argument("--family", default="mamba2", choices=DEMO_FAMILIES, help="demo model without --model")
    prefix.add_argument("--num-groups", dest="num_groups", type=int, default=2)
    prefix.add_argument("--prompts-per-group", dest="prompts_per_group", type=int, default=8)
    prefix.add_argument("--prefix-len", dest="prefix_len", type=int, default=2048, help="shared system prompt tokens")
    prefix.add_argument("--question-len", dest="question_len", type=int, default=32, help="unique tokens per prompt")
    prefix.add_argument("--output-len", dest="output_len", type=int, default=8)
    add_config_args(prefix, EngineConfig, (*SCHEDULING_FIELDS, "device", "kernel_backend"))
    prefix.add_argument(
        "--modes", default="off,radix,global", help="comma-separated subset of off, radix, global (in this order)"
    )
    prefix.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved runs per mode (per policy with --replicas); the fastest is reported (default 3; 1 with "
        "--replicas)",
    )
    prefix.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="N >= 2: the workload through N engine replicas on a local Ray instance, affinity routing vs Ray's "
        "power-of-two choice (fresh replicas each, engine defaults: prefix cache and grouping on; --modes does not "
        "apply); needs pip install 'linrec[ray]'",
    )
    prefix.add_argument("--seed", type=int, default=0, help="workload RNG")
    prefix.add_argument("--json", action="store_true", help="print the result as JSON")
    prefix.add_argument("--out", default=None, metavar="FILE", help="also write the result as JSON to FILE")
    prefix.set_defaults(handler=_run_bench_prefix)


def _run_bench_prefix(args: argparse.Namespace) -> int:

    from linrec.bench.prefix import run_prefix_bench, run_prefix_replicas_bench

    if args.replicas != 1:
        names = ("family", "num_groups", "prompts_per_group", "prefix_len", "question_len", "output_len")
        names += ("max_num_seqs", "max_num_batched_tokens", "device", "kernel_backend", "seed")
        try:
            replicated = run_prefix_replicas_bench(
                args.model,
                num_replicas=args.replicas,
                repeats=1 if args.repeats is None else args.repeats,
                **{name: getattr(args, name) for name in names},
            )
        except ValueError as exc:  # a flag out of range, or no Ray: one line, no traceback
            print(f"linrec: error: {exc}", file=sys.stderr)
            return 2
        _report(replicated, args, as_json=args.json)
        return 0 if replicated.checks_passed() else 1
    result = run_prefix_bench(
        args.model,
        family=args.family,
        num_groups=args.num_groups,
        prompts_per_group=args.prompts_per_group,
        prefix_len=args.prefix_len,
        question_len=args.question_len,
        output_len=args.output_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        device=args.device,
        kernel_backend=args.kernel_backend,
        seed=args.seed,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        repeats=3 if args.repeats is None else args.repeats,
    )
    _report(result, args, as_json=args.json)
    return 0


def _add_adapter_bench_args(
    parser: argparse.ArgumentParser,
    num_requests: int = 256,
    prompt_len: int = 128,
    output_len: int = 128,
    adapters: bool = True,
) -> None:
    """The flags the workload benches (lora, sparse, routing) share: the model, the workload, the device, the
    repeats, the RNG, the threads and the JSON output; the adapter counts where `adapters`."""
    parser.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="a checkpoint (Llama/Qwen2/Mistral are served as Liger-GLA); default: the seeded bench model of "
        "--family, written once under the cache dir",
    )
    parser.add_argument("--family", default="liger_gla", choices=BENCH_FAMILIES, help="bench model without --model")
    parser.add_argument("--num-requests", dest="num_requests", type=int, default=num_requests)
    parser.add_argument("--prompt-len", dest="prompt_len", type=int, default=prompt_len, help="tokens per prompt")
    parser.add_argument(
        "--output-len", dest="output_len", type=int, default=output_len, help="tokens generated per request"
    )
    if adapters:
        parser.add_argument(
            "--adapters", type=int, nargs="+", default=[1, 4, 16], metavar="K", help="adapter counts to serve (1 4 16)"
        )
    add_config_args(
        parser,
        EngineConfig,
        ("device", "kernel_backend"),
        helps={"device": "auto, cpu, cuda, cuda:N (float32 on the CPU, bfloat16 on CUDA)"},
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per configuration; the median counts")
    parser.add_argument("--seed", type=int, default=0, help="prompt RNG")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the result as JSON to FILE")


def _add_lora(kinds) -> None:
    lora = kinds.add_parser(
        "lora",
        help="per-request LoRA over 1/4/16 adapters vs the base model alone vs merging one adapter at a time",
        description="One workload (all requests queued at once, greedy) served by the base model without LoRA, by "
        "the LoRA engine with base requests and with the requests spread round-robin over k adapters, and by the "
        "merge-switching peer (the engine without LoRA; adapter by adapter: merge its delta into the weights in "
        "place, run its requests as one batch, restore the weights; merge time counted). Adapters: PEFT LoRA of "
        "--rank on every projection, seeded random, written to a temporary directory. Median of --repeats "
        "interleaved runs; ratios lora-k / base and lora-k / merge-k.",
    )
    _add_adapter_bench_args(lora)
    lora.add_argument("--rank", type=int, default=8, help="rank of the written adapters (and of the LoRA slots)")
    lora.add_argument(
        "--max-loras", dest="max_loras", type=int, default=None, help="LoRA device slots (default: the largest K)"
    )
    lora.set_defaults(handler=_run_bench_lora)


def _run_bench_lora(args: argparse.Namespace) -> int:

    from linrec.bench.lora import run_lora_bench

    result = run_lora_bench(
        args.model,
        family=args.family,
        num_requests=args.num_requests,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        adapter_counts=args.adapters,
        rank=args.rank,
        max_loras=args.max_loras,
        device=args.device,
        kernel_backend=args.kernel_backend,
        repeats=args.repeats,
        seed=args.seed,
        threads=args.threads,
    )
    _report(result, args)
    return 0


def _add_routing(kinds) -> None:
    routing = kinds.add_parser(
        "routing",
        help="layer routes: throughput against the fraction of layers skipped, and the all-ones overhead",
        description="One engine serves the same workload with no route, all-ones routes, routes skipping 25/50/75%% "
        "of the layers, alternating skips, and repeats; output tok/s and ratios to no route; then no route, skip-50 "
        "and complementary halves under a state-memory budget (bench/routing.py).",
    )
    _add_adapter_bench_args(routing, num_requests=64, prompt_len=32, output_len=32, adapters=False)
    routing.add_argument("--num-layers", dest="num_layers", type=int, default=8, help="bench model's layers")
    routing.add_argument(
        "--budget-slots",
        dest="budget_slots",
        type=int,
        default=None,
        help="state memory of the budgeted runs, in slots (default: a quarter of --num-requests)",
    )
    routing.set_defaults(handler=_run_bench_routing)


def _run_bench_routing(args: argparse.Namespace) -> int:

    from linrec.bench.routing import run_routing_bench

    result = run_routing_bench(
        args.model,
        family=args.family,
        num_layers=args.num_layers,
        num_requests=args.num_requests,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        device=args.device,
        kernel_backend=args.kernel_backend,
        repeats=args.repeats,
        seed=args.seed,
        threads=args.threads,
        budget_slots=args.budget_slots,
    )
    _report(result, args)
    return 0


def _add_multiturn(kinds) -> None:
    multiturn = kinds.add_parser(
        "multiturn",
        help="multi-turn conversations: continuing from the stored state vs resending the whole conversation",
        description="Many conversations of many turns (seeded random user tokens, greedy replies, EOS ignored), each "
        "turn sent when the previous one finished, on two engines with the prefix cache on: responses (each turn "
        "resumes the state the previous turn stored and sends only the new tokens) and resend (each turn sends the "
        "whole conversation again). Per turn: TTFT (median over conversations and --repeats interleaved rounds) and "
        "the prompt tokens prefilled; targets: responses' last-turn TTFT <= 1.2x its first turn's, and its prefill the "
        "new input + 1 (bench/multiturn.py).",
    )
    multiturn.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="a checkpoint (Llama/Qwen2/Mistral are served as Liger-GLA); default: the seeded bench model of "
        "--family, written once under the cache dir",
    )
    multiturn.add_argument("--family", default="liger_gla", choices=BENCH_FAMILIES, help="bench model without --model")
    multiturn.add_argument("--num-conversations", dest="num_conversations", type=int, default=16)
    multiturn.add_argument("--num-turns", dest="num_turns", type=int, default=20, help="turns per conversation")
    multiturn.add_argument("--user-len", dest="user_len", type=int, default=32, help="new user tokens per turn")
    multiturn.add_argument("--output-len", dest="output_len", type=int, default=16, help="reply tokens per turn")
    add_config_args(
        multiturn,
        EngineConfig,
        ("device", "kernel_backend", "max_device_states"),
        helps={
            "device": "auto, cpu, cuda, cuda:N (float32 on the CPU, bfloat16 on CUDA)",
            "max_device_states": "stored states kept in pool rows (both engines); fewer than --num-conversations "
            "resumes some turns from host memory",
        },
    )
    multiturn.add_argument("--repeats", type=int, default=3, help="interleaved rounds per contender; medians count")
    multiturn.add_argument("--seed", type=int, default=0, help="user-token RNG (round r uses seed + r)")
    multiturn.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    multiturn.add_argument("--out", default=None, metavar="FILE", help="also write the result as JSON to FILE")
    multiturn.set_defaults(handler=_run_bench_multiturn)


def _run_bench_multiturn(args: argparse.Namespace) -> int:

    from linrec.bench.multiturn import run_multiturn_bench

    names = ("family", "num_conversations", "num_turns", "user_len", "output_len", "device", "kernel_backend")
    names += ("max_device_states",)
    try:
        result = run_multiturn_bench(
            args.model,
            repeats=args.repeats,
            seed=args.seed,
            threads=args.threads,
            **{name: getattr(args, name) for name in names},
        )
    except ValueError as exc:  # a flag out of range: one line, no traceback
        print(f"linrec: error: {exc}", file=sys.stderr)
        return 2
    _report(result, args)
    return 0 if result.checks_passed() else 1


def _add_sparse(kinds) -> None:
    sparse = kinds.add_parser(
        "sparse",
        help="sparse (SHiRA) adapters: switch time vs LoRA merge/unmerge; sparse-k vs lora-k vs base under load",
        description="Switch time: the runner's SparseSwitch scattering one sparse adapter (--density of every "
        "projection's entries) into the weights and restoring them, against merging and unmerging a LoRA of the same "
        "parameter count (W += / -= scaling * B @ A) and against merge + restore from a saved copy; weights checked "
        "bit for bit. Then one workload (greedy, EOS ignored), requests round-robin over k adapters, all queued at "
        "once or arriving at --rate: base, sparse-k, lora-k, and a mixed run (half base, half sparse); output tok/s, "
        "req/s, p50/p99 latency, weight-group switches, median of --repeats interleaved runs. Self-checks: sparse-k "
        "tokens equal an engine with the adapter merged by hand, base weights bit for bit after every run. "
        "--switch-only times the switch alone (e.g. on --size 1.3b, too large to serve on a CPU).",
    )
    _add_adapter_bench_args(sparse)
    sparse.add_argument(
        "--size",
        default="bench",
        choices=("bench", "1.3b"),
        help="model without --model: throughput's bench model (hidden 512) or decode's 1.3B-class one",
    )
    sparse.add_argument(
        "--density", type=float, default=0.01, help="share of every projection's entries a sparse adapter changes"
    )
    sparse.add_argument(
        "--arrival", default="burst", choices=("burst", "rate"), help="all queued at once, or at --rate req/s"
    )
    sparse.add_argument("--rate", type=float, default=None, help="requests per second (with --arrival rate)")
    sparse.add_argument(
        "--mixed-adapters",
        dest="mixed_adapters",
        type=int,
        default=None,
        help="sparse adapters of the mixed run's sparse half (default: 4, at most the largest K)",
    )
    sparse.add_argument(
        "--max-num-seqs",
        dest="max_num_seqs",
        type=int,
        default=None,
        help="requests running at once (default: --num-requests; fewer leaves a queue)",
    )
    sparse.add_argument(
        "--switch-repeats", dest="switch_repeats", type=int, default=20, help="timed switches; the median counts"
    )
    sparse.add_argument(
        "--switch-only", dest="switch_only", action="store_true", help="time the switch alone (no workload)"
    )
    sparse.set_defaults(handler=_run_bench_sparse)


def _run_bench_sparse(args: argparse.Namespace) -> int:

    from linrec.bench.sparse import run_sparse_bench

    try:
        result = run_sparse_bench(
            args.model,
            family=args.family,
            size=args.size,
            num_requests=args.num_requests,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            adapter_counts=args.adapters,
            density=args.density,
            arrival=args.arrival,
            rate=args.rate,
            mixed_adapters=args.mixed_adapters,
            max_num_seqs=args.max_num_seqs,
            device=args.device,
            kernel_backend=args.kernel_backend,
            repeats=args.repeats,
            switch_repeats=args.switch_repeats,
            switch_only=args.switch_only,
            seed=args.seed,
            threads=args.threads,
        )
    except ValueError as exc:  # a flag out of range: one line, no traceback
        print(f"linrec: error: {exc}", file=sys.stderr)
        return 2
    _report(result, args)
    return 0 if result.checks_passed() else 1


def _add_stop_strings(kinds) -> None:
    stop_strings = kinds.add_parser(
        "stop-strings",
        help="stop-string matching per token: no stop strings vs the automaton vs the old (naive) algorithm",
        description="Generated text token by token through the detokenizer (demo byte tokenizer) with no stop "
        "strings, with many long stop strings matched by the Aho-Corasick automaton, and by the naive reference "
        "(the algorithm before it), for stop strings that overlap the text and for unrelated ones: CPU time per "
        "token and the ratios. Not capped like the server (64 strings of 1,024 characters).",
    )
    stop_strings.add_argument("--num-stops", dest="num_stops", type=int, default=1000, help="stop strings per set")
    stop_strings.add_argument("--stop-len", dest="stop_len", type=int, default=1000, help="characters per stop string")
    stop_strings.add_argument("--num-tokens", dest="num_tokens", type=int, default=2000, help="generated tokens")
    stop_strings.add_argument("--repeats", type=int, default=3, help="interleaved passes; the fastest counts")
    stop_strings.add_argument("--seed", type=int, default=0, help="workload RNG")
    stop_strings.add_argument("--json", action="store_true", help="print the result as JSON")
    stop_strings.set_defaults(handler=_run_bench_stop_strings)


def _run_bench_stop_strings(args: argparse.Namespace) -> int:
    from linrec.bench.stop_strings import run_stop_string_bench

    result = run_stop_string_bench(
        num_stops=args.num_stops,
        stop_len=args.stop_len,
        num_tokens=args.num_tokens,
        repeats=args.repeats,
        seed=args.seed,
    )
    print(result.to_json() if args.json else result.format())
    return 0


def _add_fairness(kinds) -> None:
    fairness = kinds.add_parser(
        "fairness",
        help="short requests arriving while 100k-token prompts prefill: fair admission vs arrival order",
        description="Long prompts arrive at t=0 and short ones at a steady rate while they prefill (open loop, "
        "greedy); the same workload runs with fair admission (the default) and with strict arrival order "
        "(--long-prefill-token-threshold 0): short-request TTFT p50/p90/p99/max, the long prompts' TTFT, wall time.",
    )
    fairness.add_argument("--model", default=None, metavar="DIR", help="a checkpoint instead of the demo model")
    fairness.add_argument("--family", default="mamba2", choices=DEMO_FAMILIES, help="demo model without --model")
    fairness.add_argument("--num-long", dest="num_long", type=int, default=2, help="long prompts, all at t=0")
    fairness.add_argument("--long-len", dest="long_len", type=int, default=100_000, help="tokens per long prompt")
    fairness.add_argument("--long-output", dest="long_output", type=int, default=4)
    fairness.add_argument("--num-short", dest="num_short", type=int, default=64, help="short prompts")
    fairness.add_argument("--short-len", dest="short_len", type=int, default=16, help="tokens per short prompt")
    fairness.add_argument("--short-output", dest="short_output", type=int, default=8)
    fairness.add_argument("--short-start", dest="short_start", type=float, default=0.1, help="first short arrival (s)")
    fairness.add_argument(
        "--short-interval", dest="short_interval", type=float, default=0.1, help="seconds between short arrivals"
    )
    add_config_args(fairness, EngineConfig, (*SCHEDULING_FIELDS, "device", "kernel_backend"))
    fairness.add_argument("--modes", default="fifo,fair", help="comma-separated subset of fifo, fair (in this order)")
    fairness.add_argument("--seed", type=int, default=0, help="workload RNG")
    fairness.add_argument("--json", action="store_true", help="print the result as JSON")
    fairness.set_defaults(handler=_run_bench_fairness)


def _run_bench_fairness(args: argparse.Namespace) -> int:
    from linrec.bench.fairness import run_fairness_bench

    names = ("family", "num_long", "long_len", "long_output", "num_short", "short_len", "short_output", "short_start")
    names += ("short_interval", "max_num_seqs", "max_num_batched_tokens", "device", "kernel_backend", "seed")
    result = run_fairness_bench(
        args.model,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        **{name: getattr(args, name) for name in names},
    )
    print(result.to_json() if args.json else result.format())
    return 0


def _add_startup(kinds) -> None:
    startup = kinds.add_parser(
        "startup",
        help="import, load and first-token time of the shipped default model beside the random demo it replaced",
        description="Fresh processes, taking turns: importing the engine, loading the model, the first chat "
        "token (cold and warm) and decode time per token, for models/default and for a random Liger-GLA demo "
        "model with a byte tokenizer (the default before it); medians and ratios default / demo.",
    )
    startup.add_argument("--repeats", type=int, default=3, help="rounds; each contender runs once per round")
    startup.add_argument("--max-tokens", dest="max_tokens", type=int, default=32, help="tokens of the decode request")
    startup.add_argument("--json", action="store_true", help="print the result as JSON")
    startup.set_defaults(handler=_run_bench_startup)


def _run_bench_startup(args: argparse.Namespace) -> int:
    from linrec.bench.startup import run_startup_bench

    result = run_startup_bench(repeats=args.repeats, max_tokens=args.max_tokens)
    print(result.to_json() if args.json else result.format())
    return 0


def _add_ready(kinds) -> None:
    ready = kinds.add_parser(
        "ready",
        help="seconds from starting `linrec serve` to /health 200, Triton cache cold and warm",
        description="Starts `linrec serve` twice per round with one fresh TRITON_CACHE_DIR: empty (cold: every "
        "kernel compiled and tuned at warm-up) and then as the first start left it (warm: a restart). Reports the "
        "median seconds to the first /health 200 and the Triton compilations at start-up (from the warm-up's "
        "summary; the warm-up runs on CUDA, or on the CPU with --server-arg=--warmup=on).",
    )
    ready.add_argument("--model", default=None, metavar="DIR", help="model to serve (default: linrec's default)")
    ready.add_argument(
        "--server-arg",
        dest="server_args",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for `linrec serve`, e.g. --server-arg=--kernel-backend=triton (repeatable)",
    )
    ready.add_argument("--repeats", type=int, default=1, help="rounds of a cold then a warm start")
    ready.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for /health per start")
    ready.add_argument("--json", action="store_true", help="print the result as JSON")
    ready.set_defaults(handler=_run_bench_ready)


def _run_bench_ready(args: argparse.Namespace) -> int:
    from linrec.bench.ready import run_ready_bench
    from linrec.loadtest.run import LoadTestError

    try:
        result = run_ready_bench(args.model, args.server_args, args.repeats, args.startup_timeout)
    except LoadTestError as exc:  # the server would not start: its log tail, no traceback
        print(f"linrec: error: {exc}", file=sys.stderr)
        return 2
    print(result.to_json() if args.json else result.format())
    return 0


def _add_kernels(kinds) -> None:
    kernels = kinds.add_parser(
        "kernels",
        help="decode kernels: time and achieved bandwidth vs measured copy bandwidth, beside their peers",
        description="Each decode kernel (gated delta rule, Mamba2 SSD, GLA with per-head and grouped states, "
        "Liger's window ring, the fused Liger step, the LoLCATs step, the short-conv update) on a 1.3B-class layer "
        "shape at each batch size: time per step, bytes moved (states and rings read + written, inputs, outputs) "
        "and the achieved bandwidth as a share of a large tensor copy's, beside linrec's torch path, fla-core's "
        "fused_recurrent (CUDA) and transformers' torch step, each with the gather/scatter of states the in-place "
        "kernel avoids.",
    )
    kernels.add_argument("--size", default="1.3b", choices=SIZES, help="small: a tiny CPU smoke test")
    kernels.add_argument("--batch-sizes", dest="batch_sizes", default=None, help="comma-separated (1,8,64,256)")
    add_config_args(kernels, EngineConfig, ("device",), helps={"device": "auto, cpu, cuda, cuda:N"})
    kernels.add_argument("--repeats", type=int, default=None, help="timed calls per point (50 on CUDA, 2 on CPU)")
    kernels.add_argument("--kernels", default=None, help="comma-separated subset of the kernels (all by default)")
    kernels.add_argument(
        "--impls", default=None, help="only contenders whose name contains one of these ('triton,fla')"
    )
    kernels.add_argument("--eager", action="store_true", help="time eager calls only (no CUDA-graph replay)")
    kernels.add_argument("--json", action="store_true", help="print the result as JSON")
    kernels.set_defaults(handler=_run_bench_kernels)


def _run_bench_kernels(args: argparse.Namespace) -> int:
    from linrec.bench.common import parse_batch_sizes
    from linrec.bench.kernels import run_kernels

    result = run_kernels(
        size=args.size,
        batch_sizes=parse_batch_sizes(args.batch_sizes) if args.batch_sizes else None,
        device=args.device,
        repeats=args.repeats,
        kernels=args.kernels.split(",") if args.kernels else None,
        impls=args.impls.split(",") if args.impls else None,
        use_graphs=not args.eager,
    )
    print(result.to_json() if args.json else result.format())
    return 1 if result.errors else 0  # a contender raised: the result lists it in `errors`


def _add_decode(kinds) -> None:
    decode = kinds.add_parser(
        "decode",
        help="end-to-end decode tokens/s vs HF transformers generate at batch 1, 8, 64, 256",
        description="A 1.3B-class seeded random model (no download) through linrec's engine and through HF "
        "generate on the same weights and dtype (Liger-GLA and LoLCATs: the original Llama with its KV cache). "
        "Decode is timed by difference: a run of 1 + N output tokens minus a run of 1.",
    )
    decode.add_argument("--model", default=None, metavar="DIR", help="a checkpoint instead of the random model")
    decode.add_argument("--family", default="liger_gla", choices=DECODE_FAMILIES, help="random model without --model")
    decode.add_argument("--size", default="1.3b", choices=SIZES, help="small: a tiny CPU smoke test")
    decode.add_argument("--batch-sizes", dest="batch_sizes", default=None, help="comma-separated (1,8,64,256)")
    decode.add_argument("--prompt-len", dest="prompt_len", type=int, default=16)
    decode.add_argument("--output-len", dest="output_len", type=int, default=64, help="timed decode tokens/request")
    decode.add_argument(
        "--prefill-len",
        dest="prefill_len",
        type=int,
        default=None,
        help="prefill timing: tokens a prompt (512; small: 32)",
    )
    decode.add_argument(
        "--prefill-batch", dest="prefill_batch", type=int, default=None, help="prefill timing: prompts (8; small: 2)"
    )
    add_config_args(
        decode,
        EngineConfig,
        ("dtype", "device", "kernel_backend", "enforce_eager"),
        helps={
            "dtype": "auto: bfloat16 on CUDA, else float32 (both sides)",
            "device": "auto, cpu, cuda, cuda:N (both sides)",
            "enforce_eager": "linrec without CUDA graphs",
        },
    )
    decode.add_argument("--seed", type=int, default=0, help="prompt RNG")
    decode.add_argument("--repeats", type=int, default=3, help="runs per timing; the fastest counts")
    decode.add_argument("--json", action="store_true", help="print the result as JSON")
    decode.set_defaults(handler=_run_bench_decode)


def _run_bench_decode(args: argparse.Namespace) -> int:
    from linrec.bench.common import parse_batch_sizes
    from linrec.bench.decode import run_decode

    result = run_decode(
        args.model,
        family=args.family,
        size=args.size,
        batch_sizes=parse_batch_sizes(args.batch_sizes) if args.batch_sizes else None,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        dtype=args.dtype,
        device=args.device,
        kernel_backend=args.kernel_backend,
        enforce_eager=args.enforce_eager,
        seed=args.seed,
        repeats=args.repeats,
        prefill_len=args.prefill_len,
        prefill_batch=args.prefill_batch,
        progress=None if args.json else lambda line: print(f"progress: {line}", flush=True),
    )
    print(result.to_json() if args.json else result.format())
    return 0


def _add_serve(kinds) -> None:
    """The locust load test of loadtest/ (its flags live in linrec.loadtest.run)."""
    from linrec.loadtest.run import add_arguments  # stdlib only: parsing stays light

    serve = kinds.add_parser(
        "serve",
        help="HTTP load test: start `linrec serve`, run locust users headless, summarize",
        description="Start `linrec serve` (the default model unless --model), drive it with locust users (completions "
        "and chat, streamed and not) for --run-time, then print requests/s, output tokens/s, TTFT and latency "
        "percentiles and failures, and write them as JSON with --out. Needs locust (pip install 'linrec[loadtest]').",
    )
    add_arguments(serve)
    serve.set_defaults(handler=_run_bench_serve)


def _run_bench_serve(args: argparse.Namespace) -> int:
    from linrec.loadtest.run import LoadTestError, run

    try:
        return run(args)
    except LoadTestError as exc:  # the server or locust would not run: its log tail, no traceback
        print(f"linrec: error: {exc}", file=sys.stderr)
        return 2


def _add_gpu_check(kinds) -> None:
    """Every GPU check in one run and one report (bench/gpu_check.py, stdlib only at import)."""
    from linrec.bench.gpu_check import DESCRIPTION, add_arguments

    gpu_check = kinds.add_parser(
        "gpu-check", help="every GPU check (tests, benches, greedy equality) into one report", description=DESCRIPTION
    )
    add_arguments(gpu_check)
    gpu_check.set_defaults(handler=_run_bench_gpu_check)


def _run_bench_gpu_check(args: argparse.Namespace) -> int:
    from linrec.bench.gpu_check import run_checks

    argv = sys.argv[sys.argv.index("gpu-check") + 1 :] if "gpu-check" in sys.argv else []
    return run_checks(args, argv)


def _report(result, args: argparse.Namespace, as_json: bool = False) -> None:
    """A bench result on stdout (its table, or its JSON), and its JSON in --out when given."""
    from pathlib import Path

    print(result.to_json() if as_json else result.format())
    if args.out:
        Path(args.out).write_text(result.to_json() + "\n")

"""The `linrec` command line.

Subcommands register in `build_parser`; those that run a model take the shared model flags of
`add_model_args`, whose destinations are the field names of EngineConfig (model, dtype, device,
kernel_backend, linearize, merge_lora). Heavy imports (torch, transformers) happen inside the
handlers so that `linrec --help` stays fast. Bad input ends in one line on stderr and exit code 2
(argparse usage errors) or 1 (everything else), never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

import linrec

# Literal copies so that parsing imports no torch; tests check them against their sources
# (models.loader.DTYPE_CHOICES, kernels.backend.BACKENDS, models.registry.DEMO_FAMILIES).
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
KERNEL_BACKENDS = ("auto", "triton", "torch")
DEMO_FAMILIES = ("liger_gla", "gla", "gated_deltanet", "mamba2")
LINEARIZE_CHOICES = ("liger-gla",)
MODEL_ARG_FIELDS = ("model", "dtype", "device", "kernel_backend", "linearize", "merge_lora")

# Exceptions that mean "the input is wrong", reported as one line; anything else is a bug and
# keeps its traceback.
_USER_ERRORS = (ValueError, OSError)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags every model-running subcommand shares; dest names equal EngineConfig's fields."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="local HF-format model directory (default: a tiny demo Liger-GLA model, created on first use "
        "under $LINREC_CACHE_DIR or ~/.cache/linrec)",
    )
    group.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto = config.json's torch_dtype")
    group.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    group.add_argument(
        "--kernel-backend", dest="kernel_backend", default="auto", choices=KERNEL_BACKENDS, help="op implementation"
    )
    group.add_argument(
        "--linearize",
        default=None,
        choices=LINEARIZE_CHOICES,
        help="load a Llama/Qwen2/Mistral checkpoint as Liger-GLA (same weights, new config)",
    )
    group.add_argument(
        "--merge-lora", dest="merge_lora", default=None, metavar="DIR", help="merge a PEFT LoRA adapter at load"
    )


def parse_state_memory(text: str) -> int | float:
    """'0.5' -> a fraction of free memory; '2GiB', '512MiB', '1e9' or '123456' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
    lowered = text.strip().lower()
    factor = 1
    for suffix, unit in units.items():
        if lowered.endswith(suffix):
            lowered, factor = lowered[: -len(suffix)], unit
            break
    try:
        value = float(lowered) * factor
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # 'lots', 'inf', 'nan', '1e400GiB'
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] or a byte count such as 2GiB, got {text!r}")
    return value if factor == 1 and value <= 1.0 else int(value)


ENGINE_ARG_FIELDS = (
    "max_num_seqs",
    "max_num_batched_tokens",
    "state_memory",
    "max_waiting_requests",
    "max_model_len",
    "long_prefill_token_threshold",
    "max_long_partial_prefills",
    "enable_prefix_caching",
    "prefix_grouping",
    "max_cached_states",
    "seed",
    "enforce_eager",
)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Scheduling and memory flags; dest names equal EngineConfig's fields (defaults are its defaults)."""
    group = parser.add_argument_group("engine")
    group.add_argument("--max-num-seqs", dest="max_num_seqs", type=int, default=64, help="requests running at once")
    group.add_argument(
        "--max-num-batched-tokens",
        dest="max_num_batched_tokens",
        type=int,
        default=2048,
        help="token budget per step (decode tokens first, then prefill chunks)",
    )
    group.add_argument(
        "--state-memory",
        dest="state_memory",
        type=parse_state_memory,
        default=0.5,
        help="memory for request states: a fraction of free memory (0.5) or bytes (2GiB)",
    )
    group.add_argument("--max-waiting-requests", dest="max_waiting_requests", type=int, default=4096)
    group.add_argument(
        "--max-model-len",
        dest="max_model_len",
        type=int,
        default=None,
        help="prompt + output tokens at most (default: the checkpoint's max_position_embeddings, else 32768; "
        "states do not grow, so raise it as far as time allows)",
    )
    group.add_argument(
        "--long-prefill-token-threshold",
        dest="long_prefill_token_threshold",
        type=int,
        default=None,
        help="a prompt with more tokens left to prefill is long: it takes at most this many tokens a step before "
        "short prompts had theirs (default: max-num-batched-tokens / 4; 0: strict arrival order)",
    )
    group.add_argument(
        "--max-long-partial-prefills",
        dest="max_long_partial_prefills",
        type=int,
        default=1,
        help="long prompts prefilling at once; others wait while short prompts pass them",
    )
    group.add_argument(
        "--enable-prefix-caching",
        dest="enable_prefix_caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prefix-state cache: reuse state snapshots of shared prompt prefixes (exact; on by default)",
    )
    group.add_argument(
        "--prefix-grouping",
        dest="prefix_grouping",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prefill each prefix shared by waiting prompts once and run its group together (BatchLLM-style)",
    )
    group.add_argument(
        "--max-cached-states",
        dest="max_cached_states",
        type=int,
        default=256,
        help="prefix snapshot rows at most (taken from --state-memory after the running slots)",
    )
    group.add_argument("--seed", type=int, default=0, help="the engine generator's seed (requests may carry their own)")
    group.add_argument(
        "--enforce-eager",
        dest="enforce_eager",
        action="store_true",
        help="no CUDA graphs: run decode steps eagerly (graphs are captured only on CUDA)",
    )


def engine_config_from_args(args: argparse.Namespace):
    from linrec.engine.config import EngineConfig

    return EngineConfig(**model_kwargs(args), **{name: getattr(args, name) for name in ENGINE_ARG_FIELDS})


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The model flags of parsed `args` as EngineConfig keyword arguments."""
    return {name: getattr(args, name) for name in MODEL_ARG_FIELDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linrec",
        description="Serve linearized and recurrent LLMs: one constant-size state per request instead of a KV cache.",
    )
    parser.add_argument("--version", action="version", version=f"linrec {linrec.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    convert = commands.add_parser(
        "convert",
        help="write a Liger-GLA checkpoint from a Llama/Qwen2/Mistral one",
        description="Copy SRC's weights, tokenizer and generation config to DST with a linearized config.json.",
    )
    convert.add_argument("--to", required=True, choices=LINEARIZE_CHOICES, help="target family")
    convert.add_argument("src", metavar="SRC", help="local HF-format checkpoint directory")
    convert.add_argument("dst", metavar="DST", help="output directory (must not exist or be empty)")
    convert.set_defaults(handler=_run_convert)

    demo = commands.add_parser(
        "demo-model",
        help="write a tiny random checkpoint with a byte-level tokenizer",
        description="Write a tiny seeded random model of one family, loadable with --model DIR.",
    )
    demo.add_argument("dir", metavar="DIR", help="output directory (must not exist or be empty)")
    demo.add_argument("--family", default="liger_gla", choices=DEMO_FAMILIES, help="model family (default liger_gla)")
    demo.set_defaults(handler=_run_demo_model)

    info = commands.add_parser(
        "info",
        help="load a model and print its size and per-request state",
        description="Load a model with the given flags and report what serving it costs per request.",
    )
    add_model_args(info)
    info.set_defaults(handler=_run_info)

    generate = commands.add_parser(
        "generate",
        help="generate completions offline for one or more prompts",
        description="Run prompts through the engine (continuous batching over the state pool) and print the text.",
    )
    add_model_args(generate)
    add_engine_args(generate)
    sampling = generate.add_argument_group("sampling")
    sampling.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    sampling.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn in the chat template")
    sampling.add_argument("--max-tokens", dest="max_tokens", type=int, default=64)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sampling.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    sampling.add_argument("--top-k", dest="top_k", type=int, default=0)
    sampling.add_argument("--min-p", dest="min_p", type=float, default=0.0)
    sampling.add_argument("--n", type=int, default=1, help="samples per prompt (forked from one prefill)")
    sampling.add_argument("--stop", action="append", default=[], help="a stop string (repeat for several)")
    sampling.add_argument("--ignore-eos", dest="ignore_eos", action="store_true")
    sampling.add_argument("--sample-seed", dest="sample_seed", type=int, default=None, help="per-request seed")
    generate.set_defaults(handler=_run_generate)
    add_bench_commands(commands)
    add_serve_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except _USER_ERRORS as exc:
        print(f"linrec: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _run_convert(args: argparse.Namespace) -> int:
    from linrec.models.convert import convert_checkpoint

    dst = convert_checkpoint(args.src, args.dst, to=args.to)
    print(f"wrote {args.to} checkpoint to {dst}")
    return 0


def _run_demo_model(args: argparse.Namespace) -> int:
    from linrec.models.demo import write_demo_model

    dst = write_demo_model(args.dir, args.family)
    print(f"wrote {args.family} demo model to {dst}")
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from linrec.engine.llm import LLM
    from linrec.engine.sampling_params import SamplingParams

    params = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
        seed=args.sample_seed,
    )
    config = engine_config_from_args(args)
    llm = LLM(progress=True, **{k: v for k, v in vars(config).items()})
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outputs = llm.generate(args.prompt, params)
    for prompt, output in zip(args.prompt, outputs):
        for sample in output.outputs:
            header = f"--- prompt {prompt!r}" + (f" sample {sample.index}" if len(output.outputs) > 1 else "")
            print(f"{header} (finish_reason={sample.finish_reason}, {len(sample.token_ids)} tokens)")
            print(sample.text)
    return 0


def _run_info(args: argparse.Namespace) -> int:
    import torch

    from linrec.models.demo import default_model_path
    from linrec.models.loader import load_model, load_tokenizer

    path = args.model if args.model is not None else str(default_model_path())
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(
        path,
        dtype=args.dtype,
        device=device,
        kernel_backend=args.kernel_backend,
        linearize=args.linearize,
        merge_lora=args.merge_lora,
    )
    tokenizer = load_tokenizer(path)
    num_params = sum(p.numel() for p in model.parameters())
    param = next(model.parameters())
    rows = {
        "model": path,
        "class": type(model).__name__,
        "parameters": f"{num_params:,}",
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": str(param.device),
        "state per request": f"{model.state_bytes_per_request():,} bytes (constant in context length)",
        "tokenizer": f"{len(tokenizer)} tokens, chat template {'yes' if tokenizer.chat_template else 'no'}",
    }
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return 0


BENCH_FAMILIES = ("liger_gla", "mamba2")  # literal copy of bench.common.BENCH_FAMILIES


def add_bench_commands(commands) -> None:
    """`linrec bench throughput`, `kernels`, `decode`, `prefix`, `fairness` and `stop-strings`: contenders side by
    side, in one run."""
    bench = commands.add_parser(
        "bench", help="measure linrec beside a peer in one run", description="Benchmarks; each prints ratios."
    )
    kinds = bench.add_subparsers(dest="bench", metavar="BENCH")
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
        help="Llama/Qwen2/Mistral (served as Liger-GLA; peer: the original under HF generate), Liger or mamba2 "
        "checkpoint (default: a seeded random bench model of --family, written once under the cache dir)",
    )
    throughput.add_argument("--family", default="liger_gla", choices=BENCH_FAMILIES, help="bench model without --model")
    throughput.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="both sides load in this dtype")
    throughput.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (both sides)")
    throughput.add_argument("--kernel-backend", dest="kernel_backend", default="auto", choices=KERNEL_BACKENDS)
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
    throughput.add_argument("--max-num-seqs", dest="max_num_seqs", type=int, default=256, help="linrec")
    throughput.add_argument("--max-num-batched-tokens", dest="max_num_batched_tokens", type=int, default=2048)
    throughput.add_argument("--seed", type=int, default=0, help="workload RNG")
    throughput.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads for both sides (default: torch's choice)"
    )
    throughput.add_argument("--json", action="store_true", help="print the result as JSON")
    throughput.set_defaults(handler=_run_bench_throughput)
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
    prefix.add_argument("--max-num-seqs", dest="max_num_seqs", type=int, default=64)
    prefix.add_argument("--max-num-batched-tokens", dest="max_num_batched_tokens", type=int, default=2048)
    prefix.add_argument("--device", default="auto")
    prefix.add_argument("--kernel-backend", dest="kernel_backend", default="auto", choices=KERNEL_BACKENDS)
    prefix.add_argument(
        "--modes", default="off,radix,global", help="comma-separated subset of off, radix, global (in this order)"
    )
    prefix.add_argument("--repeats", type=int, default=3, help="interleaved runs per mode; the fastest is reported")
    prefix.add_argument("--seed", type=int, default=0, help="workload RNG")
    prefix.add_argument("--json", action="store_true", help="print the result as JSON")
    prefix.set_defaults(handler=_run_bench_prefix)
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
    add_fairness_bench_command(kinds)
    add_decode_bench_commands(kinds)
    add_bench_serve_command(kinds)
    bench.set_defaults(handler=lambda args: (bench.print_help(sys.stderr), 2)[1])


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


BENCH_SIZES = ("small", "1.3b")  # literal copy of bench.common.SIZES


def add_fairness_bench_command(kinds) -> None:
    """`linrec bench fairness` (bench/fairness.py)."""
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
    fairness.add_argument("--max-num-seqs", dest="max_num_seqs", type=int, default=64)
    fairness.add_argument("--max-num-batched-tokens", dest="max_num_batched_tokens", type=int, default=2048)
    fairness.add_argument("--device", default="auto")
    fairness.add_argument("--kernel-backend", dest="kernel_backend", default="auto", choices=KERNEL_BACKENDS)
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


def add_decode_bench_commands(kinds) -> None:
    """`linrec bench kernels` (bench/kernels.py) and `linrec bench decode` (bench/decode.py)."""
    kernels = kinds.add_parser(
        "kernels",
        help="decode kernels: time and achieved bandwidth vs measured copy bandwidth, beside their peers",
        description="Each decode kernel (gated delta rule, Mamba2 SSD, GLA with per-head and grouped states, "
        "Liger's window ring, the fused Liger step, the short-conv update) on a 1.3B-class layer shape at each batch "
        "size: time per step, bytes moved (states and rings read + written, inputs, outputs) and the achieved "
        "bandwidth as a share of a large tensor copy's, beside linrec's torch path, fla-core's fused_recurrent "
        "(CUDA) and transformers' torch step, each with the gather/scatter of states the in-place kernel avoids.",
    )
    kernels.add_argument("--size", default="1.3b", choices=BENCH_SIZES, help="small: a tiny CPU smoke test")
    kernels.add_argument("--batch-sizes", dest="batch_sizes", default=None, help="comma-separated (1,8,64,256)")
    kernels.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    kernels.add_argument("--repeats", type=int, default=None, help="timed calls per point (50 on CUDA, 2 on CPU)")
    kernels.add_argument("--json", action="store_true", help="print the result as JSON")
    kernels.set_defaults(handler=_run_bench_kernels)

    decode = kinds.add_parser(
        "decode",
        help="end-to-end decode tokens/s vs HF transformers generate at batch 1, 8, 64, 256",
        description="A 1.3B-class seeded random model (no download) through linrec's engine and through HF "
        "generate on the same weights and dtype (Liger-GLA: the original Llama with its KV cache). Decode is timed "
        "by difference: a run of 1 + N output tokens minus a run of 1.",
    )
    decode.add_argument("--model", default=None, metavar="DIR", help="a checkpoint instead of the random model")
    decode.add_argument("--family", default="liger_gla", choices=BENCH_FAMILIES, help="random model without --model")
    decode.add_argument("--size", default="1.3b", choices=BENCH_SIZES, help="small: a tiny CPU smoke test")
    decode.add_argument("--batch-sizes", dest="batch_sizes", default=None, help="comma-separated (1,8,64,256)")
    decode.add_argument("--prompt-len", dest="prompt_len", type=int, default=16)
    decode.add_argument("--output-len", dest="output_len", type=int, default=64, help="timed decode tokens/request")
    decode.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bfloat16 on CUDA, else float32")
    decode.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (both sides)")
    decode.add_argument("--kernel-backend", dest="kernel_backend", default="auto", choices=KERNEL_BACKENDS)
    decode.add_argument("--enforce-eager", dest="enforce_eager", action="store_true", help="linrec without CUDA graphs")
    decode.add_argument("--seed", type=int, default=0, help="prompt RNG")
    decode.add_argument("--repeats", type=int, default=3, help="runs per timing; the fastest counts")
    decode.add_argument("--json", action="store_true", help="print the result as JSON")
    decode.set_defaults(handler=_run_bench_decode)


def _run_bench_kernels(args: argparse.Namespace) -> int:
    from linrec.bench.common import parse_batch_sizes
    from linrec.bench.kernels import run_kernels

    sizes = parse_batch_sizes(args.batch_sizes) if args.batch_sizes else None
    result = run_kernels(size=args.size, batch_sizes=sizes, device=args.device, repeats=args.repeats)
    print(result.to_json() if args.json else result.format())
    return 0


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
    )
    print(result.to_json() if args.json else result.format())
    return 0


def add_bench_serve_command(kinds) -> None:
    """`linrec bench serve`: the locust load test of loadtest/ (its flags live in linrec.loadtest.run)."""
    from linrec.loadtest.run import add_arguments  # stdlib only: parsing stays light

    serve = kinds.add_parser(
        "serve",
        help="HTTP load test: start `linrec serve`, run locust users headless, summarize",
        description="Start `linrec serve` (the demo model unless --model), drive it with locust users (completions "
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


def _run_bench_prefix(args: argparse.Namespace) -> int:
    from linrec.bench.prefix import run_prefix_bench

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
        repeats=args.repeats,
    )
    print(result.to_json() if args.json else result.format())
    return 0


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


def add_serve_command(commands) -> None:
    """`linrec serve [MODEL]`: the OpenAI-compatible HTTP server; server flags map onto ServerConfig."""
    serve = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Start the OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, "
        "/tokenize, /detokenize, /health, /version, /metrics). SIGTERM drains in-flight requests first.",
    )
    serve.add_argument("model_path", nargs="?", default=None, metavar="MODEL", help="same as --model")
    add_model_args(serve)
    add_engine_args(serve)
    group = serve.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for every interface)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument(
        "--api-key",
        dest="api_key",
        default=None,
        help="require `Authorization: Bearer KEY` on every route but /health, /version, /openapi.json and "
        "/metrics (or LINREC_API_KEY)",
    )
    group.add_argument(
        "--served-model-name", dest="served_model_name", default=None, help="the model name clients send"
    )
    group.add_argument(
        "--drain-timeout", dest="drain_timeout", type=float, default=30.0, help="seconds to finish requests on SIGTERM"
    )
    group.add_argument("--log-level", dest="log_level", default="info", choices=("debug", "info", "warning", "error"))

    def byte_count(text: str) -> int:
        try:
            value = parse_state_memory(text)  # '1' comes back as the fraction 1.0
        except (argparse.ArgumentTypeError, OverflowError):  # OverflowError: 'inf'
            value = 0
        if not 1 <= value < float("inf") or value != int(value):
            raise argparse.ArgumentTypeError(f"expected a byte count such as 16MiB or 1000000, got {text!r}")
        return int(value)

    group.add_argument(
        "--max-request-body-bytes",
        dest="max_request_body_bytes",
        type=byte_count,
        default=16 * 2**20,
        help="larger request bodies get 413 before they are parsed (bytes, or 16MiB, 1GB; default 16MiB)",
    )
    group.add_argument(
        "--metrics-require-api-key",
        dest="metrics_require_api_key",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="put /metrics behind --api-key too (Prometheus: `authorization: {credentials: KEY}`)",
    )
    serve.set_defaults(handler=_run_serve)


SERVER_ARG_FIELDS = (
    "host",
    "port",
    "api_key",
    "served_model_name",
    "drain_timeout",
    "log_level",
    "max_request_body_bytes",
    "metrics_require_api_key",
)


def _run_serve(args: argparse.Namespace) -> int:
    from linrec.server.app import run_server
    from linrec.server.config import ServerConfig

    if args.model_path is not None:
        if args.model is not None and args.model != args.model_path:
            raise ValueError(f"expected one model, got MODEL={args.model_path!r} and --model={args.model!r}")
        args.model = args.model_path
    server_config = ServerConfig(**{name: getattr(args, name) for name in SERVER_ARG_FIELDS})
    return run_server(engine_config_from_args(args), server_config)


if __name__ == "__main__":
    sys.exit(main())

"""One command for every GPU check, written to one report: `python -m linrec.bench.gpu_check --out gpu-report.md`.

Made for a machine with a GPU and no network (docs/gpu-check.md): each step runs in its own subprocess with
its own timeout, inside one overall budget (525 s by default); a step that fails or times out is
recorded and the next one runs. Steps, in order:

  env        nvidia-smi -L, python/torch/triton/transformers/fla versions, compute capability, ptxas, sanitizer
  kernels    `linrec bench kernels` at the 1.3B shapes (CUDA-graph replay beside eager); when it
             fails, each failing kernel again alone with CUDA_LAUNCH_BLOCKING=1, under compute-sanitizer
             memcheck where it is installed (kernels-isolate), so the report names the case that faults
  equality   greedy tokens of all five families on their demo models, fp32: triton + CUDA graphs == torch
             eager, prefix cache on == off, each request alone == batched (24 requests, a 300-token prefix)
  pytest     `pytest -m gpu` over tests/{kernels,engine,models,bench} (kernels at model sizes, graphs ==
             eager, fla == ours), where pytest is importable
  decode     the bench checkpoints written first (decode models, one step), then per family
             `linrec bench decode` (batch 1/8/64/256, 1.3B-class, bf16) beside its peer:
             transformers' generate for Liger-GLA and LoLCATs (the original Llama) and Mamba2, fla's own model
             classes for GLA and Gated DeltaNet (skipped with a note when fla.models is not importable)

Without CUDA the GPU steps are recorded as "skipped: no CUDA"; `--allow-cpu --size small` runs them on the
CPU at tiny sizes (the tests do), and `--dry-run` writes the plan without running anything but `env`.
This module imports nothing heavy at load time and nothing of fastapi, uvicorn, pydantic or fla at all:
the GPU machine has none of them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Issue 11's 8 minutes, plus 45 s for the lolcats_llama decode step: all steps together
DEFAULT_BUDGET_S = 525
# the two that ran on CUDA first; lolcats_llama before the GLA ones, which may wait on chunk_gla's autotuning
DECODE_FAMILIES = ("mamba2", "gated_deltanet", "lolcats_llama", "liger_gla", "gla")
EQUALITY_FAMILIES = ("mamba2", "gated_deltanet", "lolcats_llama", "liger_gla", "gla")
PYTEST_DIRS = ("tests/kernels", "tests/engine", "tests/models", "tests/bench")  # tests/server needs fastapi
KERNEL_NAMES = (
    "gated_delta",
    "ssd",
    "gla",
    "gla_grouped",
    "window",
    "liger_step",
    "liger_step_d128",
    "lolcats_step",
    "short_conv",
    "lora",
)  # bench/kernels.py KERNEL_SHAPES (not imported: it stays light)
OUTPUT_CHARS = 6000  # of each step's output kept in the report (its end)


@dataclass
class Step:
    name: str
    argv: list[str]  # run as a subprocess from the repository root
    timeout_s: float
    needs_cuda: bool = True
    needs_module: str | None = None  # skipped when this module is not importable (pytest)
    env: dict[str, str] = field(default_factory=dict)  # added to the inherited environment


@dataclass
class StepResult:
    name: str
    command: str
    status: str  # "passed", "failed (exit N)", "timed out after N s", "skipped: <why>", "planned (dry run)"
    seconds: float
    output: str


def repo_root() -> Path:
    """The tree linrec is imported from (the repository root: the package is the root)."""
    import linrec

    return Path(linrec.__file__).parent


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a step: this one, with the folder that holds `linrec` first on PYTHONPATH (a
    symlink named linrec to the repo root works: the link's folder, not its target, is added)."""
    env = dict(os.environ)
    holder = str(repo_root().parent)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if holder not in paths:
        paths.insert(0, holder)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    # `python -m` run from the repo root would put it first on sys.path, where its kernels/ folder shadows the
    # PyPI package `kernels` that transformers (5.25 on) imports; linrec comes from PYTHONPATH instead
    env["PYTHONSAFEPATH"] = "1"
    env.update(extra or {})
    return env


def has_cuda() -> bool:
    """Whether torch sees a CUDA device, asked in a subprocess so that this process stays free of CUDA."""
    probe = [sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"]
    try:
        return subprocess.run(probe, env=child_env(), capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def module_available(name: str) -> bool:
    """Whether `name` would import, without importing it (a module blocked as None in sys.modules would not)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: in sys.modules as None, or without a spec
        return False


def compute_sanitizer() -> str | None:
    """Path of NVIDIA's compute-sanitizer, where one is installed."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "compute-sanitizer").is_file():
            return str(Path(home) / "bin" / "compute-sanitizer")
    return None


def plan_steps(args: argparse.Namespace) -> list[Step]:
    py = sys.executable
    small = args.size == "small"
    device = "cpu" if args.allow_cpu and not args.cuda else "cuda"
    steps = [Step("env", [py, "-m", "linrec.bench.gpu_check", "--step", "env"], 15, needs_cuda=False)]
    if "kernels" in args.steps:
        batches = "1,2" if small else "1,8,64,256"
        argv = [
            py,
            "-m",
            "linrec.cli",
            "bench",
            "kernels",
            "--size",
            args.size,
            "--batch-sizes",
            batches,
            "--device",
            device,
        ]
        steps.append(Step("kernels", argv + (["--repeats", "1"] if small else []), 75))
    if "equality" in args.steps:
        argv = [py, "-m", "linrec.bench.gpu_check", "--step", "equality", "--device", device]
        argv += ["--families", ",".join(args.equality_families)]
        if small:
            argv += ["--num-requests", "3", "--prefix-len", "12", "--max-tokens", "3"]
        steps.append(Step("equality", argv, 70))
    if "pytest" in args.steps:
        argv = [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
        steps.append(Step("pytest", argv + ["-rfE", *PYTEST_DIRS], 45, needs_module="pytest"))
    if "decode" in args.steps:
        # the bench checkpoints are written first, in one step of their own (a 1.3B one takes tens of seconds
        # to write): the decode steps' timeouts then bound only the benches
        argv = [py, "-m", "linrec.bench.gpu_check", "--step", "prepare", "--size", args.size]
        steps.append(Step("decode models", argv + ["--families", ",".join(args.decode_families)], 90))
        for family in args.decode_families:
            argv = [
                py,
                "-m",
                "linrec.cli",
                "bench",
                "decode",
                "--family",
                family,
                "--size",
                args.size,
                "--device",
                device,
            ]
            if small:
                argv += ["--batch-sizes", "1,2", "--output-len", "4", "--repeats", "1"]
            else:
                argv += ["--batch-sizes", "1,8,64,256", "--output-len", "16", "--repeats", "1"]
            steps.append(Step(f"decode {family}", argv, 45))
    return steps


def isolation_steps(kernels_output: str, size: str, device: str) -> list[Step]:
    """When the kernels step failed: each kernel an error names (all of them when it named none, as after a
    timeout) alone in a fresh process, launches synchronous (CUDA_LAUNCH_BLOCKING=1: an error is raised at
    the launch that caused it), eager timing, batch 1 and 8, under compute-sanitizer memcheck where present."""
    named = [k for k in KERNEL_NAMES if f"error: {k} /" in kernels_output]
    sanitizer = compute_sanitizer()
    steps = []
    for kernel in named or list(KERNEL_NAMES):
        argv = [sys.executable, "-m", "linrec.cli", "bench", "kernels", "--size", size, "--kernels", kernel]
        argv += ["--batch-sizes", "1,8", "--eager", "--repeats", "2", "--device", device]
        if sanitizer:
            argv = [sanitizer, "--tool", "memcheck", "--print-limit", "20", *argv]
        steps.append(Step(f"kernels-isolate {kernel}", argv, 45, env={"CUDA_LAUNCH_BLOCKING": "1"}))
    return steps


def run_step(step: Step, *, cuda: bool, deadline: float, dry_run: bool, root: Path) -> StepResult:
    command = " ".join(([f"{k}={v}" for k, v in step.env.items()]) + step.argv)
    if dry_run and step.name != "env":
        here = "" if cuda or not step.needs_cuda else "; no CUDA here, so a real run skips it"
        return StepResult(step.name, command, f"planned (dry run), timeout {step.timeout_s:.0f} s{here}", 0.0, "")
    if step.needs_cuda and not cuda:
        return StepResult(step.name, command, "skipped: no CUDA", 0.0, "")
    if step.needs_module and not module_available(step.needs_module):
        return StepResult(step.name, command, f"skipped: {step.needs_module} is not importable here", 0.0, "")
    left = deadline - time.monotonic() - 2  # 2 s for writing the report
    if left < 5:
        return StepResult(step.name, command, "skipped: out of time (the overall budget is spent)", 0.0, "")
    timeout = min(step.timeout_s, left)
    begin = time.monotonic()
    try:
        # its own session: on a timeout the whole process group goes (pytest's subprocesses too), so nothing
        # of this step is left running on the GPU when the next one starts
        proc = subprocess.Popen(
            step.argv,
            cwd=root,
            env=child_env(step.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as e:
        return StepResult(step.name, command, f"failed to start: {e}", 0.0, str(e))
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, _ = proc.communicate()
        status = f"timed out after {timeout:.0f} s"
    output = (out or b"").decode(errors="replace")
    return StepResult(step.name, command, status, time.monotonic() - begin, output)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that `proc` leads (it was started in a session of its own)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def format_report(results: list[StepResult], *, args: argparse.Namespace, cuda: bool, total_s: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# linrec GPU check",
        "",
        f"- date: {now}; host: {platform.node()}; python {platform.python_version()}; CUDA seen: {cuda}",
        f"- command: `{' '.join([Path(sys.executable).name, '-m', 'linrec.bench.gpu_check', *args.argv])}`",
        f"- total: {total_s:.0f} s of a {args.budget_s:.0f} s budget",
        "",
        "| step | status | seconds |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.1f} |" for r in results]
    for r in results:
        lines += ["", f"## {r.name}: {r.status}", "", f"`{r.command}`"]
        if r.output:
            tail = r.output[-OUTPUT_CHARS:]
            cut = "(... the start is cut)\n" if len(r.output) > OUTPUT_CHARS else ""
            lines += ["", "```", cut + tail.rstrip(), "```"]
    return "\n".join(lines) + "\n"


# --- the steps that are functions of this module (run as `--step NAME` in their own process) ---


def print_environment() -> int:
    """The env step: what the report's figures were measured on."""

    def run(argv: list[str]) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (proc.stdout + proc.stderr).strip() or f"(no output, exit {proc.returncode})"
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"unavailable: {e}"

    print(f"python {sys.version.split()[0]} on {platform.platform()}")
    print("nvidia-smi -L:", run(["nvidia-smi", "-L"]) if shutil.which("nvidia-smi") else "no nvidia-smi")
    from importlib import metadata

    for dist in ("torch", "triton", "transformers", "fla-core", "flash-linear-attention", "pytest", "safetensors"):
        try:
            print(f"{dist}: {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            print(f"{dist}: not installed (as a distribution)")
    fla = importlib.util.find_spec("fla") if module_available("fla") else None
    locations = list(fla.submodule_search_locations or []) if fla else []
    print("fla importable:", bool(fla), locations, "fla.models:", any((Path(p) / "models").is_dir() for p in locations))
    for name in ("fastapi", "uvicorn", "pydantic"):
        print(f"{name} importable: {module_available(name)}")
    import torch

    print(f"torch CUDA build {torch.version.cuda}; cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(
                f"cuda:{i} {props.name}, compute capability {props.major}.{props.minor}, {props.total_memory >> 30} GiB"
            )
    try:
        import triton

        nvidia = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
        print(f"triton {triton.__version__}; bundled ptxas: {run([str(nvidia), '--version']).splitlines()[-1:]}")
    except Exception as e:  # noqa: BLE001 - the report says what it could not read
        print(f"triton: {type(e).__name__}: {e}")
    for var in ("TRITON_PTXAS_PATH", "TRITON_CACHE_DIR", "CUDA_HOME", "LINREC_CACHE_DIR", "FLA_DISABLE_TENSOR_CACHE"):
        print(f"{var}={os.environ.get(var, '')}")
    if os.environ.get("TRITON_PTXAS_PATH"):
        print("TRITON_PTXAS_PATH --version:", run([os.environ["TRITON_PTXAS_PATH"], "--version"]).splitlines()[-1:])
    print("compute-sanitizer:", compute_sanitizer() or "not found")
    print("git HEAD:", run(["git", "-C", str(repo_root()), "rev-parse", "--short", "HEAD"]))
    return 0


def shared_prefix_prompts(num_requests: int, prefix_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """num_requests prompts: one shared prefix_len-token prefix, then 1-8 tokens of each request's own."""
    import random

    rng = random.Random(seed)
    low = min(10, vocab_size - 1)  # past the demo tokenizer's special ids
    prefix = [rng.randrange(low, vocab_size) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(low, vocab_size) for _ in range(1 + i % 8)] for i in range(num_requests)]


def first_difference(got: list[list[int]], want: list[list[int]]) -> str | None:
    """'request i, token j: a != b' for the first token that differs, None when all are equal."""
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            j = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            a, b = (g[j] if j < len(g) else "end"), (w[j] if j < len(w) else "end")
            return f"request {i}, token {j}: {a} != {b}"
    if len(got) != len(want):
        return f"{len(got)} requests != {len(want)}"
    return None


def check_greedy_equality(
    families: Sequence[str],
    *,
    device: str,
    num_requests: int = 24,
    prefix_len: int = 300,
    max_tokens: int = 16,
    candidate_backend: str = "triton",
) -> int:
    """The equality step: per family, on its demo model in fp32, the greedy tokens of the same prompts
    (a shared prefix) from (a) the torch backend eager, no prefix cache, all batched (the reference);
    (b) the candidate backend with CUDA graphs (where the device has them); (c) (b) with the prefix cache,
    run twice so that the second run hits it; (d) (b) with each request alone. Prints one line a check;
    exit status 1 when any differs (or a family fails to run)."""
    import gc
    import tempfile

    import torch

    from linrec.engine.llm import LLM
    from linrec.engine.sampling_params import SamplingParams
    from linrec.models.demo import write_demo_model
    from linrec.models.tokenizer import DEMO_VOCAB_SIZE

    prompts = shared_prefix_prompts(num_requests, prefix_len, DEMO_VOCAB_SIZE)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    on_cuda = device.startswith("cuda")
    failures = 0

    def tokens(llm, batch: list[list[int]]) -> list[list[int]]:
        return [list(o.outputs[0].token_ids) for o in llm.generate(batch, params)]

    def engine(path: Path, backend: str, *, eager: bool, prefix_cache: bool):
        return LLM(
            str(path),
            dtype="float32",
            device=device,
            kernel_backend=backend,
            enforce_eager=eager,
            enable_prefix_caching=prefix_cache,
            max_num_seqs=num_requests,
        )

    def report(family: str, check: str, got, want) -> None:
        nonlocal failures
        diff = first_difference(got, want)
        failures += diff is not None
        print(f"{'PASS' if diff is None else 'FAIL'} {family}: {check}" + (f" ({diff})" if diff else ""), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            begin = time.monotonic()
            try:
                path = write_demo_model(Path(tmp) / family, family)
                llm = engine(path, "torch", eager=True, prefix_cache=False)
                want = tokens(llm, prompts)
                del llm
                llm = engine(path, candidate_backend, eager=False, prefix_cache=False)
                graphs = bool(getattr(llm.engine, "can_replay_cuda_graphs", False))
                label = f"{candidate_backend}{' + CUDA graphs' if graphs else ' eager'} == torch eager"
                batched = tokens(llm, prompts)
                report(family, label, batched, want)
                report(family, "each request alone == batched", [tokens(llm, [p])[0] for p in prompts], batched)
                del llm
                llm = engine(path, candidate_backend, eager=False, prefix_cache=True)
                report(family, "prefix cache on (cold) == off", tokens(llm, prompts), want)
                report(family, "prefix cache on (warm, hits) == off", tokens(llm, prompts), want)
                del llm
            except Exception as e:  # noqa: BLE001 - one family failing must not hide the others
                failures += 1
                print(f"FAIL {family}: {type(e).__name__}: {e}".splitlines()[0], flush=True)
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()
            print(f"     {family}: {time.monotonic() - begin:.1f} s", flush=True)
    print(f"{failures} check(s) failed" if failures else "all equal")
    return 1 if failures else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the check (also `linrec bench gpu-check`'s)."""
    parser.add_argument("--out", default="gpu-report.md", help="the report file (Markdown)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="all steps together, seconds")
    parser.add_argument(
        "--steps", default="kernels,equality,pytest,decode", help="comma-separated among kernels, equality, pytest, "
        "decode (env always runs)"
    )  # fmt: skip
    parser.add_argument("--size", default="1.3b", choices=("small", "1.3b"), help="bench shapes (small: a smoke run)")
    parser.add_argument("--decode-families", default=",".join(DECODE_FAMILIES))
    parser.add_argument("--equality-families", default=",".join(EQUALITY_FAMILIES))
    parser.add_argument("--dry-run", action="store_true", help="write the plan; run only the env step")
    parser.add_argument("--allow-cpu", action="store_true", help="run the GPU steps on the CPU (use --size small)")


DESCRIPTION = (
    "Every GPU check in one run (env, kernels, equality, pytest -m gpu, decode), each step in its own subprocess "
    "with its own timeout inside one budget, written to one Markdown report (docs/gpu-check.md)."
)


def prepare_decode_models(families: Sequence[str], size: str) -> int:
    """The decode-models step: write (once, into linrec's cache dir) the bench checkpoint of each family."""
    from linrec.bench.decode import decode_model_path

    for family in families:
        begin = time.monotonic()
        path = decode_model_path(family, size)
        print(f"{family} ({size}): {path} in {time.monotonic() - begin:.1f} s", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m linrec.bench.gpu_check", description=DESCRIPTION)
    add_arguments(parser)
    # the steps this module runs itself, each in its own process
    parser.add_argument("--step", choices=("env", "equality", "prepare"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--families", default=",".join(EQUALITY_FAMILIES), help=argparse.SUPPRESS)
    parser.add_argument("--num-requests", type=int, default=24, help=argparse.SUPPRESS)
    parser.add_argument("--prefix-len", type=int, default=300, help=argparse.SUPPRESS)
    parser.add_argument("--max-tokens", type=int, default=16, help=argparse.SUPPRESS)
    return parser


def run_checks(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the planned steps and write the report; exit status 1 when a step failed or timed out."""
    args.argv = list(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in args.steps if s not in ("kernels", "equality", "pytest", "decode")]
    if unknown:
        raise SystemExit(f"expected --steps among kernels, equality, pytest, decode; got {unknown}")
    args.decode_families = [f for f in args.decode_families.split(",") if f]
    args.equality_families = [f for f in args.equality_families.split(",") if f]
    begin = time.monotonic()
    deadline = begin + args.budget_s
    root = repo_root()
    args.cuda = has_cuda()
    cuda_or_allowed = args.cuda or args.allow_cpu
    device = "cuda" if args.cuda else "cpu"
    results: list[StepResult] = []
    out = Path(args.out)
    for step in plan_steps(args):
        result = run_step(step, cuda=cuda_or_allowed, deadline=deadline, dry_run=args.dry_run, root=root)
        results.append(result)
        print(f"{result.name}: {result.status} ({result.seconds:.1f} s)", flush=True)
        if step.name == "kernels" and result.status.startswith(("failed", "timed out")):
            for extra in isolation_steps(result.output, args.size, device):
                results.append(run_step(extra, cuda=cuda_or_allowed, deadline=deadline, dry_run=False, root=root))
                print(f"{results[-1].name}: {results[-1].status} ({results[-1].seconds:.1f} s)", flush=True)
        # the report is rewritten after every step: a machine taken away mid-run still leaves one
        out.write_text(format_report(results, args=args, cuda=args.cuda, total_s=time.monotonic() - begin))
    print(f"report: {out}")
    return 0 if all(r.status.startswith(("passed", "skipped", "planned")) for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.step == "env":
        return print_environment()
    if args.step == "prepare":
        return prepare_decode_models([f for f in args.families.split(",") if f], args.size)
    if args.step == "equality":
        families = [f for f in args.families.split(",") if f]
        return check_greedy_equality(
            families,
            device=args.device,
            num_requests=args.num_requests,
            prefix_len=args.prefix_len,
            max_tokens=args.max_tokens,
        )
    return run_checks(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())

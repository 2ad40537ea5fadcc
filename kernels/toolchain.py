"""The Triton toolchain of this process: what it is, what it is known to get wrong, where it caches, and when
it compiles.

`prepare_triton(device)` runs once per device, on the first resolution of the triton backend on CUDA
(kernels/backend.py), before anything compiles: it points Triton's cache at linrec's cache dir, inspects the
toolchain, answers a known-bad one (one warning line, and a newer ptxas or the torch kernels), and installs
the compile watch that engine/warmup.py arms.

Known faults (the facts the findings encode; the triton version matters only through the ptxas it bundles):
- ptxas 12.8.93 generates wrong code for sm_90 (Hopper): fla-org/flash-linear-attention#1262 assembled
  byte-identical PTX of two of fla's Hopper backward kernels with each ptxas: 12.8.93 gave wrong numbers (dv)
  and an invalid shared-memory write (dh), 13.0.88 the invalid write, 13.1.80 neither. (fla#640, gated
  `chunk_bwd_dqkwg` wrong on Hopper with 3.4.0 <= triton < 3.7.1, is the same family: fla raises there.)
- ptxas 12.9 can reuse the register inputs of an asynchronous WGMMA (sm_90) before the instruction has read
  them, corrupting valid matmuls; NVIDIA's CUDA 13.3 release notes list the fix (triton-lang/triton#11781).
- Bundled with the wheels (read from them): triton 3.6.0 ptxas 12.8.93 (ptxas-blackwell 12.9.86); 3.8.0
  12.9.86 (13.3); 3.9.0 12.9.86 (13.4.59). Triton assembles sm < 100 with `ptxas` (TRITON_PTXAS_PATH, else
  the bundled one) and sm >= 100 with `ptxas-blackwell`.
So on sm_90 every ptxas before 13.3 has a known miscompile. The faults are in tensor-core (mma/wgmma) and
shared-memory code: the chunked prefill kernels (fla's, linrec's). linrec's decode kernels use no tl.dot and
measured right on triton 3.6.0 / ptxas 12.8.93 (H200, issue 11: Gated DeltaNet and Mamba2 greedy-equal to
the torch path, every decode kernel clean per process), so the fallback where no newer ptxas is at hand is
narrow: prefill runs the torch chunked path (Verdict.use_triton_prefill False), decode keeps its Triton
kernels. A toolchain that cannot compile at all (no triton, no usable ptxas) sends every op to torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from linrec import envs

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# The oldest ptxas with no known sm_90 miscompile (see the module docstring).
SM90_MIN_PTXAS = (13, 3)
# fla's own guard (fla#640): gated chunk backward wrong on Hopper for 3.4.0 <= triton < 3.7.1. Training only.
FLA_HOPPER_BACKWARD_BAD = ((3, 4, 0), (3, 7, 1))
PTXAS_TIMEOUT_S = 10.0  # `ptxas --version` answers in milliseconds; a hung binary must not hang the engine


def parse_version(text: str) -> tuple[int, ...]:
    """'3.6.0' -> (3, 6, 0); '3.7.0+git1a2b' -> (3, 7, 0); '3.9.0rc1' -> (3, 9, 0); '' -> ()."""
    numbers = []
    for part in text.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() != len(part):
            break
    return tuple(numbers)


def parse_ptxas_version(output: str) -> tuple[int, int, int] | None:
    """The version in `ptxas --version` output: 'Cuda compilation tools, release 12.8, V12.8.93' -> (12, 8, 93);
    None when the output names none."""
    full = re.search(r"\bV(\d+)\.(\d+)\.(\d+)", output)
    if full:
        return int(full.group(1)), int(full.group(2)), int(full.group(3))
    release = re.search(r"release (\d+)\.(\d+)", output)
    if release:
        return int(release.group(1)), int(release.group(2)), 0
    return None


def _dotted(version: tuple[int, ...] | None) -> str:
    return ".".join(map(str, version)) if version else "unknown"


@dataclasses.dataclass(frozen=True)
class Ptxas:
    path: str
    version: tuple[int, int, int] | None  # None: it did not run or named no version
    source: str  # where it was found: "TRITON_PTXAS_PATH", "bundled with triton", "CUDA_HOME", ...

    @property
    def is_explicit(self) -> bool:
        """Chosen by the user through TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH: never overridden."""
        return self.source.startswith("TRITON_PTXAS")

    def describe(self) -> str:
        return f"ptxas {_dotted(self.version)} ({self.source}: {self.path})"


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """What compiles linrec's Triton kernels for one device."""

    triton_version: str | None  # None: triton does not import
    triton_error: str | None  # why it does not
    is_nvidia: bool  # an NVIDIA GPU (not ROCm, not the CPU)
    capability: tuple[int, int] | None  # compute capability, (9, 0) for H100/H200
    driver_cuda: tuple[int, int] | None  # the CUDA version the driver supports, (13, 0)
    ptxas: Ptxas | None  # the ptxas Triton would use for this device's kernels
    candidates: tuple[Ptxas, ...] = ()  # other ptxas binaries found on the machine (a remedy where newer)


@dataclasses.dataclass(frozen=True)
class Finding:
    code: str  # "triton-unavailable", "ptxas-unusable", "sm90-ptxas", "fla-hopper-backward"
    is_blocking: bool  # Triton kernels would be wrong or would not compile: do not run them as they are
    message: str
    remedy: Ptxas | None = None  # a ptxas on this machine that avoids it
    is_prefill_only: bool = False  # only the tensor-core prefill kernels are at risk; decode kernels are not


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What to do about a toolchain: run Triton (with ptxas_override when set), Triton for decode and the
    torch chunked path for prefill, or the torch kernels."""

    findings: tuple[Finding, ...]
    use_triton: bool
    ptxas_override: Ptxas | None = None
    use_triton_prefill: bool = True  # False: prefill takes the torch path even where use_triton holds

    def log_line(self) -> str | None:
        """The one warning line a known-bad toolchain gets; None when there is nothing to say."""
        blocking = [f for f in self.findings if f.is_blocking]
        if not blocking:
            return None
        problem = "; ".join(f.message for f in blocking)
        if self.use_triton and self.ptxas_override is not None:
            return (
                f"linrec: {problem}; Triton now assembles with {self.ptxas_override.describe()} "
                "(set TRITON_PTXAS_PATH to choose another)"
            )
        if self.use_triton:
            what = "prefill runs the torch chunked path instead of Triton (correct, slower); decode keeps Triton"
        else:
            what = "the torch kernels run instead of Triton (correct, slower)"
        return (
            f"linrec: {problem}; {what}. To run Triton, set "
            f"TRITON_PTXAS_PATH to a ptxas >= {_dotted(SM90_MIN_PTXAS)} (a CUDA >= 13.3 toolkit's, or the "
            "backends/nvidia/bin/ptxas-blackwell of a triton >= 3.8 wheel)"
        )


def find_findings(tc: Toolchain) -> list[Finding]:
    """The known faults of a toolchain (pure: facts in, findings out)."""
    if tc.triton_version is None:
        return [Finding("triton-unavailable", True, f"triton does not import ({tc.triton_error})")]
    findings: list[Finding] = []
    if not tc.is_nvidia or tc.capability is None:
        return findings
    is_hopper = tc.capability[0] == 9
    triton_version = parse_version(tc.triton_version)
    if is_hopper and FLA_HOPPER_BACKWARD_BAD[0] <= triton_version < FLA_HOPPER_BACKWARD_BAD[1]:
        findings.append(
            Finding(
                "fla-hopper-backward",
                False,
                f"triton {tc.triton_version} on sm_90: fla-core refuses its gated chunk backward (fla#640); "
                "inference never runs a backward",
            )
        )
    ptxas = tc.ptxas
    if ptxas is None or ptxas.version is None:
        where = ptxas.path if ptxas is not None else "no ptxas found"
        needed = SM90_MIN_PTXAS if is_hopper else (0, 0)
        findings.append(
            Finding(
                "ptxas-unusable",
                True,
                f"triton {tc.triton_version} cannot run its ptxas ({where}), so it cannot compile kernels",
                remedy=_best_candidate(tc, needed),
            )
        )
        return findings
    if is_hopper and ptxas.version[:2] < SM90_MIN_PTXAS:
        faults = []
        if ptxas.version[:2] < (13, 1):
            faults.append("fla#1262: 12.8.93 and 13.0.88 miscompile fla's Hopper kernels, 13.1.80 does not")
        faults.append("triton#11781: 12.9 reuses WGMMA register inputs too early, fixed in CUDA 13.3")
        findings.append(
            Finding(
                "sm90-ptxas",
                True,
                f"triton {tc.triton_version} assembles sm_{tc.capability[0]}{tc.capability[1]} kernels with "
                f"{ptxas.describe()}, older than {_dotted(SM90_MIN_PTXAS)} (" + "; ".join(faults) + ")",
                remedy=None if ptxas.is_explicit else _best_candidate(tc, SM90_MIN_PTXAS),
                is_prefill_only=True,
            )
        )
    return findings


def _best_candidate(tc: Toolchain, minimum: tuple[int, int]) -> Ptxas | None:
    """The newest candidate ptxas at least `minimum` that the driver can load the output of (same CUDA
    major or older: minor-version compatibility); None without one, or when the driver's version is unknown."""
    if tc.driver_cuda is None:
        return None
    usable = [
        c
        for c in tc.candidates
        if c.version is not None and c.version[:2] >= minimum and c.version[0] <= tc.driver_cuda[0]
    ]
    return max(usable, key=lambda c: c.version, default=None)


def decide(tc: Toolchain) -> Verdict:
    """Triton as it is, Triton with a newer ptxas, Triton for decode only, or the torch kernels."""
    findings = tuple(find_findings(tc))
    blocking = [f for f in findings if f.is_blocking]
    if not blocking:
        return Verdict(findings, use_triton=True)
    remedies = {f.remedy for f in blocking}
    if None not in remedies and len(remedies) == 1:
        return Verdict(findings, use_triton=True, ptxas_override=remedies.pop())
    if all(f.is_prefill_only for f in blocking):
        return Verdict(findings, use_triton=True, use_triton_prefill=False)
    return Verdict(findings, use_triton=False, use_triton_prefill=False)


# ---- inspecting the machine (impure) ----


def run_ptxas_version(path: str, source: str) -> Ptxas:
    """`path --version`, parsed; a binary that is missing, fails or hangs gets version None."""
    try:
        result = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=PTXAS_TIMEOUT_S, check=False
        )
        version = parse_ptxas_version(result.stdout + result.stderr) if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        version = None
    return Ptxas(path, version, source)


def _triton_bin_dir() -> str | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "backends", "nvidia", "bin")


def _ptxas_in_use(capability: tuple[int, int], bin_dir: str | None) -> Ptxas | None:
    """The ptxas Triton picks for this capability, as triton 3.6-3.9 do: the environment's when it runs,
    else the bundled one."""
    is_blackwell = capability[0] >= 10
    name, explicit = (
        ("ptxas-blackwell", envs.triton_ptxas_blackwell_path()) if is_blackwell else ("ptxas", envs.triton_ptxas_path())
    )
    if explicit:
        chosen = run_ptxas_version(explicit, "TRITON_PTXAS_BLACKWELL_PATH" if is_blackwell else "TRITON_PTXAS_PATH")
        if chosen.version is not None:
            return chosen
    if bin_dir is None:
        return None
    bundled = os.path.join(bin_dir, name)
    if is_blackwell and not os.path.exists(bundled):  # a triton without ptxas-blackwell uses ptxas for all
        bundled = os.path.join(bin_dir, "ptxas")
    return run_ptxas_version(bundled, "bundled with triton")


def _candidate_ptxas(bin_dir: str | None) -> list[Ptxas]:
    """Every other ptxas on the machine: Triton's ptxas-blackwell, PATH, CUDA_HOME, /usr/local/cuda and the
    nvidia-cuda-nvcc wheels."""
    paths: list[tuple[str, str]] = []
    if bin_dir is not None:
        paths.append((os.path.join(bin_dir, "ptxas-blackwell"), "ptxas-blackwell bundled with triton"))
    on_path = shutil.which("ptxas")
    if on_path:
        paths.append((on_path, "PATH"))
    if envs.cuda_home():
        paths.append((os.path.join(envs.cuda_home(), "bin", "ptxas"), "CUDA_HOME"))
    paths.append(("/usr/local/cuda/bin/ptxas", "/usr/local/cuda"))
    nvidia = importlib.util.find_spec("nvidia")
    for root in (nvidia.submodule_search_locations or []) if nvidia is not None else []:
        paths += [(p, "nvidia wheel") for p in sorted(glob.glob(os.path.join(root, "*", "bin", "ptxas")))]
    seen: set[str] = set()
    found = []
    for path, source in paths:
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        found.append(run_ptxas_version(path, source))
    return found


def inspect_toolchain(device: torch.device) -> Toolchain:
    """The toolchain that compiles for `device` (a CUDA device). Never raises: what cannot be read is None."""
    import torch

    try:
        import triton

        triton_version, triton_error = str(triton.__version__), None
    except Exception as exc:  # a broken install raises more than ImportError
        triton_version, triton_error = None, f"{type(exc).__name__}: {exc}"
    try:
        is_nvidia = torch.version.hip is None and torch.cuda.is_available()
        capability = tuple(torch.cuda.get_device_capability(device)) if is_nvidia else None
    except Exception:
        is_nvidia, capability = False, None
    driver_cuda = None
    with contextlib.suppress(Exception):
        driver = int(torch._C._cuda_getDriverVersion())  # 13000 for CUDA 13.0
        driver_cuda = (driver // 1000, driver % 1000 // 10)
    if triton_version is None or capability is None:
        return Toolchain(triton_version, triton_error, is_nvidia, capability, driver_cuda, None)
    bin_dir = _triton_bin_dir()
    return Toolchain(
        triton_version,
        None,
        is_nvidia,
        capability,
        driver_cuda,
        _ptxas_in_use(capability, bin_dir),
        tuple(_candidate_ptxas(bin_dir)),
    )


def apply_verdict(verdict: Verdict, knobs: Any = None) -> None:
    """Make Triton's process-wide settings follow the verdict: its cache under linrec's cache dir (unless
    TRITON_CACHE_DIR is set) and the ptxas override. `knobs`: triton.knobs (a stand-in in tests)."""
    if knobs is None:
        from triton import knobs
    if not envs.is_triton_cache_dir_set():
        # knobs' setter also exports TRITON_CACHE_DIR, so child processes (and fla's autotune results,
        # which triton's Autotuner writes through the same cache manager) land there too.
        knobs.cache.dir = str(envs.triton_cache_dir())
    if verdict.ptxas_override is not None:
        knobs.nvidia.ptxas = verdict.ptxas_override.path
        # Triton keys its on-disk cache by the ptxas version it read (lru-cached) when it first compiled.
        with contextlib.suppress(Exception):
            from triton.backends.nvidia.compiler import get_ptxas_version

            get_ptxas_version.cache_clear()


def prepare_triton(device: torch.device) -> Verdict:
    """Once per device and process: inspect, decide, apply, log; later calls return the same verdict."""
    index = device.index
    if index is None:  # "cuda" is the current device: one key for it, however it is spelled
        import torch

        try:
            index = torch.cuda.current_device()
        except Exception:
            index = 0
    return _prepared(index)


@functools.cache
def _prepared(index: int) -> Verdict:
    # Cached: resolve_backend runs on every forward, and the toolchain does not change within a process.
    import torch

    if envs.triton_interpreter():  # nothing is compiled: no ptxas, no cache
        return Verdict((), use_triton=True)
    tc = inspect_toolchain(torch.device("cuda", index))
    verdict = decide(tc)
    line = verdict.log_line()
    if line:
        logger.warning(line)
    for finding in verdict.findings:
        if not finding.is_blocking:
            logger.info("linrec: %s", finding.message)
    if tc.triton_version is not None:
        try:
            apply_verdict(verdict)
            install_compile_watch()
        except Exception as exc:  # a triton without knobs: it keeps its own cache and ptxas
            logger.info("linrec: could not set triton's cache dir or ptxas on triton %s: %s", tc.triton_version, exc)
            if verdict.ptxas_override is not None:
                return Verdict(verdict.findings, use_triton=False)
    return verdict


# ---- counting compilations ----


class CompileWatch:
    """Counts Triton JIT compilations in this process; once a warm-up has finished (and while none runs),
    each one is a request waiting on the compiler, logged as a bug: one warning line naming the kernel and
    its specialization.

    Installed as `triton.knobs.runtime.jit_post_compile_hook` (triton 3.6 to 3.9: called after a kernel
    specialization is built in this process, from source or from the on-disk cache; never under
    TRITON_INTERPRET=1). The hook slot holds one callable: a hook found there is kept and called after ours.
    The slot is process-wide, and so is the watch: every engine of the process shares it. A second engine
    built after the first one's warm-up has its load and graph-capture compilations reported too (they
    happen before its own warm-up begins).
    """

    def __init__(self, previous: Callable[..., Any] | None = None):
        self.previous = previous  # the hook that was installed before this one
        self.num_compilations = 0  # since installation
        self.num_late_compilations = 0  # after a warm-up finished, while none was running
        self._num_warming = 0  # warm-ups running now (engines start one at a time, but a count costs nothing)
        self.has_warmed_up = False

    @property
    def is_armed(self) -> bool:
        return self.has_warmed_up and self._num_warming == 0

    @contextlib.contextmanager
    def warming_up(self) -> Iterator[None]:
        """Compilations inside the block are the warm-up's; after it, the watch is armed."""
        self._num_warming += 1
        try:
            yield
        finally:
            self._num_warming -= 1
            self.has_warmed_up = True

    def record(self, kernel: str, specialization: str) -> None:
        self.num_compilations += 1
        if self.is_armed:
            self.num_late_compilations += 1
            logger.warning(
                "linrec: bug: Triton compiled %s%s after warm-up: a request waited on the compiler "
                "(engine/warmup.py does not reach this specialization)",
                kernel,
                specialization,
            )

    def __call__(self, *, key: Any = None, repr: Any = None, fn: Any = None, compile: Any = None, **kwargs: Any) -> Any:
        try:
            self.record(kernel_name(fn, repr), describe_specialization(compile, key))
        except Exception:  # counting must never break a compilation
            logger.debug("linrec: compile watch failed on %r", repr, exc_info=True)
        if self.previous is not None:
            return self.previous(key=key, repr=repr, fn=fn, compile=compile, **kwargs)
        return None


def kernel_name(fn: Any, repr: Any = None) -> str:
    """'linrec.kernels.gla.decode._gla_decode_kernel' from the hook's `fn` (module, name), else from `repr`."""
    module, name = getattr(fn, "module", None), getattr(fn, "name", None)
    if name:
        return f"{module}.{name}" if module else str(name)
    return str(repr).split("[", 1)[0] if repr else "an unnamed kernel"


def describe_specialization(compile: Any, key: Any = None) -> str:
    """'(q_ptr: *bf16/16, T: i32, K=64, ...)': each argument's type, /16 where Triton assumed it divisible
    by 16 (pointer alignment, integers), and the value of constexprs (a 1 passed as an integer becomes one).
    From the hook's `compile` dict (signature, constants, configs); the raw key when that is not readable."""
    try:
        signature = compile["signature"]
        constants = compile.get("constants") or {}
        attrs = (compile.get("configs") or [{}])[0] or {}
        parts = []
        for i, (name, kind) in enumerate(signature.items()):
            if kind == "constexpr":
                parts.append(f"{name}={str(constants.get((i,), '?'))[:40]}")
            else:
                divisible = any(attr[0] == "tt.divisibility" for attr in attrs.get((i,), ()))
                parts.append(f"{name}: {kind}{'/16' if divisible else ''}")
        return "(" + ", ".join(parts) + ")"
    except Exception:
        return f" {str(key)[:400]}"


def install_compile_watch(runtime: Any = None) -> CompileWatch | None:
    """The process's CompileWatch, installed on first call; None (after one info line) on a triton without
    the hook. `runtime`: triton.knobs.runtime (a stand-in in tests)."""
    version = "?"
    if runtime is None:
        try:
            import triton

            version = triton.__version__
            from triton import knobs

            runtime = knobs.runtime
        except Exception as exc:
            logger.info("linrec: compile-after-warm-up detector unavailable on triton %s (%s)", version, exc)
            return None
    if not hasattr(runtime, "jit_post_compile_hook"):
        logger.info("linrec: compile-after-warm-up detector unavailable on triton %s (no hook slot)", version)
        return None
    current = runtime.jit_post_compile_hook
    if isinstance(current, CompileWatch):
        return current
    watch = CompileWatch(previous=current)
    runtime.jit_post_compile_hook = watch
    return watch


def current_compile_watch() -> CompileWatch | None:
    """The process's CompileWatch if one is installed (for metrics: its num_late_compilations); imports
    nothing, so a process that never loaded Triton answers None at no cost."""
    knobs = sys.modules.get("triton.knobs")
    hook = getattr(getattr(knobs, "runtime", None), "jit_post_compile_hook", None)
    return hook if isinstance(hook, CompileWatch) else None

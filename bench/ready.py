"""`linrec bench ready`: how long `linrec serve` takes to report ready, with Triton's cache empty and full.

Each round starts `linrec serve` in a subprocess twice with the same fresh TRITON_CACHE_DIR: first empty
(cold: every kernel is compiled and every autotuned kernel tuned, as on a new machine), then holding what the
first start wrote (warm: a restart). It reports the seconds from starting the process to the first /health
200, which the server answers only after the engine's warm-up (engine/warmup.py), the count of Triton
compilations at start-up from the warm-up's summary line (engine/warmup.py prints it with the progress bars;
none when the warm-up is off, as it is on the CPU unless --server-arg=--warmup=on), and the latency of the
first completion request after ready beside the same request sent again: with nothing left to compile, the
first is no slower. Medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from linrec import envs
from linrec.loadtest.run import served_model, started_server

CACHES = ("cold", "warm")
# The request timed after ready: a short prompt, a few greedy tokens (prefill, decode and sampling all run).
REQUEST = {"prompt": "The warm-up compiles every kernel", "max_tokens": 8, "temperature": 0.0}
# The warm-up's summary line (engine/warmup.py WarmupReport.summary).
_COMPILATIONS = re.compile(r"linrec warm-up: .*?(\d+) Triton compilations at start-up")


def parse_compilations(log: str) -> int | None:
    """The start-up compilation count of the last warm-up summary in a server log; None without one."""
    counts = _COMPILATIONS.findall(log)
    return int(counts[-1]) if counts else None


@dataclass(frozen=True)
class ReadyRun:
    cache: str  # "cold" (empty Triton cache) or "warm" (what the cold start left)
    seconds: float  # from starting `linrec serve` to its first /health 200
    num_compilations: int | None  # Triton compilations at start-up; None: not reported (no warm-up summary)
    first_request_s: float  # the first completion request after ready
    second_request_s: float  # the same request again


@dataclass(frozen=True)
class ReadyResult:
    model: str | None  # None: linrec's default model
    server_args: list[str]
    runs: list[ReadyRun]

    def median_seconds(self, cache: str) -> float:
        return statistics.median(r.seconds for r in self.runs if r.cache == cache)

    def median_request_seconds(self, cache: str, which: str) -> float:
        return statistics.median(getattr(r, f"{which}_request_s") for r in self.runs if r.cache == cache)

    def compilations(self, cache: str) -> int | None:
        counts = [r.num_compilations for r in self.runs if r.cache == cache and r.num_compilations is not None]
        return int(statistics.median(counts)) if counts else None

    def to_json(self) -> str:
        summary = {
            c: {
                "median_s": self.median_seconds(c),
                "compilations": self.compilations(c),
                "first_request_s": self.median_request_seconds(c, "first"),
                "second_request_s": self.median_request_seconds(c, "second"),
            }
            for c in CACHES
        }
        return json.dumps({**asdict(self), "summary": summary}, indent=2)

    def format(self) -> str:
        num_rounds = len(self.runs) // len(CACHES)
        args = " ".join(self.server_args) or "no extra flags"
        lines = [
            f"`linrec serve` ({self.model or 'the default model'}; {args}) to /health 200, "
            f"{num_rounds} round(s), medians",
            "",
            f"{'Triton cache':<13} {'to ready s':>10} {'compilations at start-up':>25} {'1st request s':>14} "
            f"{'2nd request s':>14}",
        ]
        for cache in CACHES:
            count = self.compilations(cache)
            lines.append(
                f"{cache:<13} {self.median_seconds(cache):>10.2f} {'not reported' if count is None else count:>25} "
                f"{self.median_request_seconds(cache, 'first'):>14.3f} "
                f"{self.median_request_seconds(cache, 'second'):>14.3f}"
            )
        cold, warm = self.median_seconds("cold"), self.median_seconds("warm")
        lines.append(f"{'warm / cold':<13} {warm / cold if cold > 0 else float('nan'):>8.2f}x")
        return "\n".join(lines)


def run_ready_bench(
    model: str | None = None,
    server_args: list[str] | None = None,
    repeats: int = 1,
    startup_timeout: float = 900.0,
) -> ReadyResult:
    """`repeats` rounds of a cold then a warm start of `linrec serve`, each round with a fresh cache dir."""
    if repeats < 1:
        raise ValueError(f"expected repeats >= 1, got {repeats}")
    server_args = list(server_args or [])
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="linrec-ready-") as tmp:
            cache_dir = Path(tmp) / "triton"
            for cache in CACHES:
                workdir = Path(tmp) / cache
                workdir.mkdir()
                args = argparse.Namespace(
                    port=0, model=model, api_key=None, server_args=server_args, startup_timeout=startup_timeout
                )
                with envs.overridden(TRITON_CACHE_DIR=str(cache_dir)):
                    start = time.perf_counter()
                    with started_server(args, workdir) as server:
                        seconds = time.perf_counter() - start
                        first, second = (_timed_completion(server.url) for _ in range(2))
                log = (workdir / "server.log").read_text(errors="replace")
                runs.append(ReadyRun(cache, seconds, parse_compilations(log), first, second))
    return ReadyResult(model, server_args, runs)


def _timed_completion(url: str) -> float:
    """Seconds for one non-streamed completion (REQUEST) to come back whole."""
    body = json.dumps({"model": served_model(url, None), **REQUEST}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        json.load(response)
    return time.perf_counter() - start

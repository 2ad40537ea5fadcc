"""Per-request records (the locustfile's JSON lines) -> the load test's summary and its table.

Percentiles are exact over the records (linear interpolation between order statistics), not
locust's rounded response-time buckets.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

KIND_ORDER = ("completions", "chat", "completions (stream)", "chat (stream)")


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"expected a percentile in [0, 100], got {q}")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _stats(records: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    ok = [r for r in records if r["error"] is None]
    latencies = [r["latency"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    num_output_tokens = sum(r["output_tokens"] for r in ok)
    return {
        "num_requests": len(records),
        "num_failures": len(records) - len(ok),
        "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
        "num_output_tokens": num_output_tokens,
        "output_tokens_per_s": num_output_tokens / duration if duration > 0 else 0.0,
        "latency_s": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99)},
        "ttft_s": {"p50": percentile(ttfts, 50), "p99": percentile(ttfts, 99)},
    }


def summarize(records: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """Rates use the wall time from the first request's start to the last one's end; requests/s
    and tokens/s count successful requests only. TTFT comes from streamed requests only."""
    if records:
        duration = max(r["start"] + r["latency"] for r in records) - min(r["start"] for r in records)
    else:
        duration = 0.0
    kinds = sorted({r["kind"] for r in records}, key=lambda k: (KIND_ORDER + (k,)).index(k))
    errors = Counter(r["error"] for r in records if r["error"] is not None)
    return {
        "config": config,
        "duration_s": duration,
        **_stats(records, duration),
        "failures": dict(errors.most_common(10)),
        "by_kind": {kind: _stats([r for r in records if r["kind"] == kind], duration) for kind in kinds},
    }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def format_table(summary: dict[str, Any]) -> str:
    header = ("kind", "requests", "failures", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "lat p50", "lat p99")
    rows = [
        (name, s) for name, s in [*summary["by_kind"].items(), ("all", summary)] if name == "all" or s["num_requests"]
    ]
    table = [header]
    for name, s in rows:
        table.append(
            (
                name,
                str(s["num_requests"]),
                str(s["num_failures"]),
                f"{s['requests_per_s']:.2f}",
                f"{s['output_tokens_per_s']:.1f}",
                _ms(s["ttft_s"]["p50"]),
                _ms(s["ttft_s"]["p99"]),
                _ms(s["latency_s"]["p50"]),
                _ms(s["latency_s"]["p99"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in table
    ]
    lines.insert(1, "-" * len(lines[0]))
    config = summary["config"]
    title = (
        f"{config.get('users')} users for {summary['duration_s']:.1f}s, max_tokens {config.get('max_tokens')}, "
        f"model {config.get('model_name')} (times in ms)"
    )
    out = [title, *lines]
    for message, count in summary["failures"].items():
        out.append(f"failure x{count}: {message}")
    return "\n".join(out)

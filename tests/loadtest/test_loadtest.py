"""The load test: summary arithmetic, a short headless run against a fresh `linrec serve` with zero
failures (what CI runs), and the locust users' failure reports against a scripted fake server."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from linrec.loadtest.summary import format_table, percentile, summarize

# Looked up, not imported: importing locust would monkey-patch the test process with gevent.
needs_locust = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs locust (the test extra)")

ROOT = Path(__file__).resolve().parents[2]


def record(kind: str, start: float, latency: float, ttft=None, tokens: int = 8, error=None) -> dict:
    return {"kind": kind, "start": start, "latency": latency, "ttft": ttft, "output_tokens": tokens, "error": error}


def test_percentile_matches_linear_interpolation() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 101)


def test_summary_counts_rates_and_failures() -> None:
    records = [
        record("completions", 0.0, 1.0),
        record("chat (stream)", 0.5, 1.0, ttft=0.2),
        record("chat (stream)", 1.0, 3.0, ttft=0.4),
        record("completions", 2.0, 0.1, tokens=0, error="HTTP 429: queue full"),
    ]
    summary = summarize(records, {"users": 2, "max_tokens": 8, "model_name": "m"})
    assert summary["duration_s"] == 4.0  # first start 0.0 to last end 4.0
    assert (summary["num_requests"], summary["num_failures"]) == (4, 1)
    assert summary["requests_per_s"] == 3 / 4 and summary["output_tokens_per_s"] == 24 / 4
    assert summary["latency_s"] == {"p50": 1.0, "p99": pytest.approx(2.96)}
    assert summary["ttft_s"]["p50"] == pytest.approx(0.3)
    assert summary["failures"] == {"HTTP 429: queue full": 1}
    assert list(summary["by_kind"]) == ["completions", "chat (stream)"]
    assert summary["by_kind"]["completions"]["num_failures"] == 1
    assert summary["by_kind"]["completions"]["ttft_s"] == {"p50": None, "p99": None}
    table = format_table(summary)
    assert "failure x1: HTTP 429: queue full" in table and table.splitlines()[-2].startswith("all ")


def run_loadtest(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "linrec.loadtest.run", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


@needs_locust
def test_headless_run_against_a_fresh_server_has_no_failures(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    # No --model: the server serves the shipped default model.
    done = run_loadtest(
        "--users", "2", "--run-time", "3s", "--max-tokens", "4", "--out", str(out),
        env={"LINREC_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(out.read_text())
    assert summary["num_failures"] == 0 and summary["failures"] == {}
    assert summary["config"]["model_name"] == "linrec-default" and summary["config"]["users"] == 2
    assert set(summary["by_kind"]) == {"completions", "chat", "completions (stream)", "chat (stream)"}
    num_ok = summary["num_requests"]
    assert num_ok >= 4 and summary["num_output_tokens"] == 4 * num_ok  # ignore_eos: exactly max_tokens each
    assert summary["output_tokens_per_s"] == pytest.approx(4 * summary["requests_per_s"])
    assert 0 < summary["duration_s"] < 30
    for kind, stats in summary["by_kind"].items():
        assert stats["num_requests"] >= 1
        assert stats["latency_s"]["p50"] <= stats["latency_s"]["p99"]
        if kind.endswith("(stream)"):
            assert 0 < stats["ttft_s"]["p50"] <= stats["latency_s"]["p99"]
        else:
            assert stats["ttft_s"]["p50"] is None
    assert "all" in done.stdout and "TTFT p50" in done.stdout


def fake_server() -> FastAPI:
    """Each route fails in its own way, except plain chat."""
    app = FastAPI()
    chunk = {"id": "x", "object": "text_completion", "created": 0, "model": "fake"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(body: dict):
        if not body.get("stream"):
            error = {"error": {"message": "queue full", "type": "RateLimitError", "param": None, "code": None}}
            return JSONResponse(error, status_code=429)

        async def cut_off():
            yield f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'text': 'a'}]})}\n\n"

        return StreamingResponse(cut_off(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        assert body["model"] == "fake" and body["ignore_eos"] is True
        if not body.get("stream"):
            usage = {"prompt_tokens": 3, "completion_tokens": body["max_tokens"], "total_tokens": 0}
            return {**chunk, "choices": [{"index": 0, "message": {"content": "hi"}}], "usage": usage}

        async def failing():
            yield f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': {'content': 'a'}}]})}\n\n"
            yield f"data: {json.dumps({'error': {'message': 'engine died', 'type': 'InternalServerError'}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(failing(), media_type="text/event-stream")

    return app


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@needs_locust
def test_users_report_each_kind_of_failure_with_its_message(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    with serving(fake_server()) as url:
        done = run_loadtest(
            "--url", url + "/v1", "--users", "1", "--run-time", "2s", "--max-tokens", "5", "--out", str(out)
        )
    assert done.returncode == 1, done.stdout + done.stderr  # some requests failed
    summary = json.loads(out.read_text())
    assert set(summary["failures"]) == {
        "HTTP 429: queue full",
        "the stream ended before [DONE]",
        "error in the stream: engine died",
    }
    by_kind = summary["by_kind"]
    assert (
        by_kind["chat"]["num_failures"] == 0
        and by_kind["chat"]["num_output_tokens"] == 5 * by_kind["chat"]["num_requests"]
    )
    for kind in ("completions", "completions (stream)", "chat (stream)"):
        assert by_kind[kind]["num_failures"] == by_kind[kind]["num_requests"] >= 1
    assert summary["num_output_tokens"] == by_kind["chat"]["num_output_tokens"]  # failures count no tokens


@needs_locust
def test_linrec_bench_serve_reports_an_unreachable_url_in_one_line(capsys: pytest.CaptureFixture) -> None:
    from linrec.cli import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--users", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("linrec: error: expected a server at") and "Traceback" not in err
    assert main(["bench", "serve", "--users", "0"]) == 2
    assert "expected --users >= 1, got 0" in capsys.readouterr().err

"""The soak (`linrec bench serve --soak`): its outcome classification on fake answers, its sending against
a scripted fake server (deliberate disconnects apart from failures), a broken fake that fails every check
and a sound one that passes them, and a short soak against a fresh `linrec serve` on the demo model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from linrec.cli import main as linrec_main
from linrec.loadtest.soak import (
    BAD_KINDS,
    PlannedRequest,
    SoakConfig,
    TrafficMix,
    _rss_summary,
    classify_answer,
    classify_refusal,
    classify_stream,
    parse_duration,
    send,
    shared_prefixes,
)

COMPLETION = PlannedRequest(
    "completions", "/v1/completions", b'{"prompt": "hi", "n": 2}', is_stream=False, num_choices=2
)
CHAT_STREAM = PlannedRequest("chat (stream)", "/v1/chat/completions", b"{}", is_stream=True, num_choices=2)
BAD = PlannedRequest("bad out-of-range", "/v1/completions", b'{"prompt": "hi", "n": 0}', is_stream=False)


def error_body(message: str = "nope") -> bytes:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return json.dumps({"error": error}).encode()


def answer(*finish_reasons: str | None, chat: bool = False) -> bytes:
    key = {"message": {"role": "assistant", "content": "x"}} if chat else {"text": "x"}
    choices = [{"index": i, **key, "finish_reason": r} for i, r in enumerate(finish_reasons)]
    return json.dumps({"choices": choices}).encode()


def stream(*events: dict | str, done: bool = True) -> bytes:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return ("".join(lines) + ("data: [DONE]\n\n" if done else "")).encode()


def chunk(index: int, finish_reason: str | None = None) -> dict:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": {}, "finish_reason": finish_reason}],
    }


def test_a_4xx_in_openai_shape_is_an_answer_and_a_5xx_is_a_failure() -> None:
    assert classify_refusal(BAD, 400, error_body("n: too small")).status == "4xx"
    assert classify_refusal(BAD, 404, error_body()).status == "4xx"
    assert classify_refusal(COMPLETION, 429, error_body("queue full")).status == "4xx"  # a valid request may wait
    refused = classify_refusal(COMPLETION, 400, error_body("n: too small"))
    assert refused.is_failure and refused.reason == "a valid request was refused: HTTP 400: n: too small"
    bare = classify_refusal(BAD, 422, json.dumps({"detail": [{"msg": "bad"}]}).encode())
    assert bare.is_failure and "not in OpenAI's error shape" in bare.reason
    no_code = json.dumps({"error": {"message": "x", "type": "y", "param": None}}).encode()  # "code" missing
    assert classify_refusal(BAD, 400, no_code).is_failure
    server_error = classify_refusal(BAD, 500, error_body("the engine stopped"))
    assert server_error.is_failure and server_error.reason == "HTTP 500: the engine stopped"
    assert classify_refusal(BAD, 502, b"<html>bad gateway</html>").is_failure
    assert classify_answer(BAD, 503, error_body("shutting down")).is_failure


def test_a_whole_answer_needs_every_choice_asked_for_finished() -> None:
    assert classify_answer(COMPLETION, 200, answer("length", "stop")).status == "ok"
    chat = PlannedRequest("chat", "/v1/chat/completions", b"{}", is_stream=False)
    assert classify_answer(chat, 200, answer("stop", chat=True)).status == "ok"
    assert "expected choices [0, 1], got [0]" in classify_answer(COMPLETION, 200, answer("length")).reason
    assert "got None" in classify_answer(COMPLETION, 200, answer("length", None)).reason
    assert "got 'abort'" in classify_answer(COMPLETION, 200, answer("length", "abort")).reason
    assert classify_answer(COMPLETION, 200, b'{"choices": [{"index": 0').is_failure  # cut JSON
    assert classify_answer(chat, 200, answer("stop")).is_failure  # a chat answer without a message
    assert classify_answer(BAD, 200, answer("length")).reason == "expected a 4xx for bad out-of-range, got 200"


def test_a_stream_needs_parsed_events_finished_choices_and_done() -> None:
    whole = [chunk(0), chunk(1), chunk(1, "stop"), chunk(0, "length")]
    assert classify_stream(CHAT_STREAM, 200, stream(*whole)).status == "ok"
    usage_only = {"object": "chat.completion.chunk", "choices": [], "usage": {"completion_tokens": 3}}
    assert classify_stream(CHAT_STREAM, 200, stream(*whole, usage_only)).status == "ok"
    cases = {
        "the stream ended before data: [DONE]": stream(*whole, done=False),
        "expected choice 0 to finish with stop or length, got None": stream(chunk(0), chunk(1, "stop")),
        "expected a JSON event, got '{\"choices\": ['": stream('{"choices": ['),
        "error event in the stream: engine died": stream(chunk(0), {"error": {"message": "engine died"}}),
        "expected nothing after data: [DONE], got 'data: {}'": stream(*whole) + b"data: {}\n\n",
        "expected only `data:` lines in the stream, got 'oops'": stream(*whole).replace(b"data: [DONE]", b"oops"),
    }
    for reason, body in cases.items():
        outcome = classify_stream(CHAT_STREAM, 200, body)
        assert outcome.is_failure and outcome.reason == reason, (reason, outcome)
    assert classify_stream(CHAT_STREAM, 500, error_body("engine died")).reason == "HTTP 500: engine died"
    bad_stream = PlannedRequest("bad oov-stop-token-ids", "/v1/completions", b"{}", is_stream=True)
    assert classify_stream(bad_stream, 200, stream(chunk(0, "length"))).is_failure
    assert classify_stream(bad_stream, 400, error_body()).status == "4xx"


def test_parse_duration_takes_locust_style_times() -> None:
    assert [parse_duration(t) for t in ("90", "45s", "10m", "1h30m", "1.5m")] == [90, 45, 600, 5400, 90]
    for junk in ("", "ten", "5x", "m"):
        with pytest.raises(Exception, match="expected --run-time like"):
            parse_duration(junk)


def test_rss_growth_is_measured_from_the_first_sample_after_the_warmup() -> None:
    config = SoakConfig(4, 100.0, 0, 8, 0.1, 0.1, BAD_KINDS, 120.0, 10.0, 2.0, "64MiB")
    mib = 2**20
    samples = [(0.0, 100 * mib), (10.0, 300 * mib), (20.0, 400 * mib), (60.0, 420 * mib), (101.0, 450 * mib)]
    rss = _rss_summary(config, "/proc", samples)  # the warm-up (20 s) ends at the third sample
    assert (rss["start_bytes"], rss["end_bytes"], rss["growth_bytes"]) == (400 * mib, 450 * mib, 50 * mib)
    assert rss["passed"] and rss["peak_bytes"] == 450 * mib and rss["growth_percent"] == 12.5
    assert not _rss_summary(SoakConfig(**{**config.__dict__, "max_rss_growth": "10%"}), "/proc", samples)["passed"]
    assert not _rss_summary(config, None, [])["passed"]  # not measured is not a pass


def test_the_mix_is_seeded_and_sends_every_kind() -> None:
    def plans(seed: int, bad_kinds=BAD_KINDS) -> list[PlannedRequest]:
        mix = TrafficMix(random.Random(seed), "m", 2048, 32, 0.1, 0.2, bad_kinds, shared_prefixes(seed, 800))
        return [mix.next() for _ in range(3000)]

    first = plans(7)
    assert first == plans(7) and first != plans(8)
    kinds = {plan.kind for plan in first}
    assert kinds == {"completions", "chat", "completions (stream)", "chat (stream)", *(f"bad {k}" for k in BAD_KINDS)}
    features = {feature for plan in first for feature in plan.features}
    assert {"n>1", "stop", "shared prefix", "longer max_tokens", "stop_token_ids+min_tokens"} <= features
    cut = [p for p in first if p.disconnect_after_events is not None or p.disconnect_after_s is not None]
    assert 0.05 < len(cut) / len(first) < 0.15 and not any(p.is_bad for p in cut)
    for plan in first:
        if plan.kind == "bad malformed-json":
            with pytest.raises(ValueError):
                json.loads(plan.body)
        elif plan.kind == "bad over-long-prompt":
            assert len(json.loads(plan.body)["prompt"]) >= 2048
        elif not plan.is_bad:
            body = json.loads(plan.body)
            assert body.get("n", 1) == plan.num_choices and body.get("stream", False) == plan.is_stream
    assert not any(p.kind == "bad oov-prompt" for p in plans(7, tuple(k for k in BAD_KINDS if k != "oov-prompt")))


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


def scripted_server(closed_streams: list[str]) -> FastAPI:
    """A slow stream and a slow answer (for cutting off), a stream cut short, and a 500."""
    app = FastAPI()

    @app.post("/slow-stream")
    async def slow_stream(raw: Request):
        async def events():
            try:
                for _ in range(10):
                    yield f"data: {json.dumps(chunk(0))}\n\n"
                    await asyncio.sleep(0.05)
                yield f"data: {json.dumps(chunk(0, 'length'))}\n\ndata: [DONE]\n\n"
            except asyncio.CancelledError:  # the client went away: uvicorn cancels the response
                closed_streams.append(raw.headers.get("x-name", ""))
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/slow-answer")
    async def slow_answer():
        await asyncio.sleep(0.5)
        return JSONResponse(json.loads(answer("length")))

    @app.post("/cut-stream")
    async def cut_stream():
        return StreamingResponse(iter([f"data: {json.dumps(chunk(0))}\n\n"]), media_type="text/event-stream")

    @app.post("/error")
    async def error():
        return JSONResponse(json.loads(error_body("the engine stopped")), status_code=500)

    return app


def test_send_counts_deliberate_disconnects_apart_from_failures() -> None:
    def plan(path: str, is_stream: bool, **cut) -> PlannedRequest:
        return PlannedRequest("chat (stream)" if is_stream else "completions", path, b"{}", is_stream, **cut)

    async def outcomes(url: str) -> dict[str, tuple[str, str]]:
        async with httpx.AsyncClient() as client:
            runs = {
                "stream cut after 2 events": (plan("/slow-stream", True, disconnect_after_events=2), 30),
                "stream read to the end": (plan("/slow-stream", True), 30),
                "answer dropped after 50 ms": (plan("/slow-answer", False, disconnect_after_s=0.05), 30),
                "answer waited for": (plan("/slow-answer", False), 30),
                "answer slower than the request timeout": (plan("/slow-answer", False), 0.2),
                "stream without [DONE]": (plan("/cut-stream", True), 30),
                "500": (plan("/error", False), 30),
            }
            found = {}
            for name, (planned, timeout) in runs.items():
                outcome = await send(client, url, planned, timeout)
                found[name] = (outcome.status, outcome.reason)
            with socket.socket() as sock:  # a port nobody listens on
                sock.bind(("127.0.0.1", 0))
                closed_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            outcome = await send(client, closed_url, plan("/error", False), 30)
            found["no server"] = (outcome.status, outcome.reason)
            return found

    closed_streams: list[str] = []
    with serving(scripted_server(closed_streams)) as url:
        found = asyncio.run(outcomes(url))
        deadline = time.monotonic() + 10
        while not closed_streams and time.monotonic() < deadline:  # the server notices the close on its next write
            time.sleep(0.05)
    assert found["stream cut after 2 events"] == ("disconnected", "")
    assert found["answer dropped after 50 ms"] == ("disconnected", "")
    assert found["stream read to the end"] == ("ok", "")
    assert found["answer waited for"] == ("ok", "")
    assert found["answer slower than the request timeout"] == ("failed", "no complete answer within 0.2s")
    assert found["stream without [DONE]"] == ("failed", "the stream ended before data: [DONE]")
    assert found["500"] == ("failed", "HTTP 500: the engine stopped")
    assert found["no server"][0] == "failed" and found["no server"][1].startswith("connection error: ConnectError")
    assert closed_streams, "the cut stream's connection stayed open on the server"


def fake_openai_server(is_broken: bool, metrics_scrapes: list[int]) -> FastAPI:
    """Answers like an OpenAI server. Broken: chat gets a 500, streams end without [DONE], a valid
    completion is refused with a 400, a slot stays in use and RSS grows 100 MiB per scrape."""
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model", "max_model_len": 4096}]}

    @app.get("/metrics")
    def metrics():
        metrics_scrapes.append(1)
        rss = 500 * 2**20 + (100 * 2**20 * len(metrics_scrapes) if is_broken else 0)
        slots = 1 if is_broken else 0
        text = "".join(
            f"# TYPE {name} gauge\n{name}{labels} {value}\n"
            for name, labels, value in (
                ("linrec:state_slots_used", '{model_name="fake"}', slots),
                ("linrec:num_requests_running", '{model_name="fake"}', slots),
                ("linrec:num_requests_waiting", '{model_name="fake"}', 0),
                ("process_resident_memory_bytes", "", rss),
            )
        )
        return PlainTextResponse(text)

    async def generate(raw: Request, is_chat: bool):
        body = await raw.json()
        n, is_stream = body.get("n", 1), body.get("stream", False)
        if is_broken and is_chat and not is_stream:
            return JSONResponse(json.loads(error_body("the engine stopped")), status_code=500)
        if is_broken and not is_chat and not is_stream:
            return JSONResponse(json.loads(error_body("prompt: refused")), status_code=400)
        if not is_stream:
            await asyncio.sleep(0.02)
            return JSONResponse(json.loads(answer(*["length"] * n, chat=is_chat)))

        async def events():
            for step in range(3):
                for index in range(n):
                    yield f"data: {json.dumps(chunk(index, 'length' if step == 2 else None))}\n\n"
                await asyncio.sleep(0.01)
            if not is_broken:
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(raw: Request):
        return await generate(raw, is_chat=False)

    @app.post("/v1/chat/completions")
    async def chat(raw: Request):
        return await generate(raw, is_chat=True)

    return app


def soak_against(url: str, out: Path, *flags: str) -> int:
    quick = ["--run-time", "1.5s", "--users", "3", "--rss-interval", "0.2", "--settle-timeout", "0.5"]
    return linrec_main(["bench", "serve", "--soak", "--url", url + "/v1", "--out", str(out), *quick, *flags])


def test_a_broken_server_fails_every_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    scrapes: list[int] = []
    with serving(fake_openai_server(is_broken=True, metrics_scrapes=scrapes)) as url:
        code = soak_against(url, tmp_path / "soak.json", "--bad-fraction", "0", "--disconnect-fraction", "0")
    assert code == 1
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert summary["checks"] == {"nothing_lost": False, "slots_back_to_zero": False, "rss_flat": False}
    assert not summary["passed"] and summary["num_failures"] == sum(s["failed"] for s in summary["by_kind"].values())
    reasons = set(summary["failure_reasons"])
    assert {
        "chat: HTTP 500: the engine stopped",
        "completions: a valid request was refused: HTTP 400: prompt: refused",
        "chat (stream): the stream ended before data: [DONE]",
        "completions (stream): the stream ended before data: [DONE]",
    } == reasons
    assert 1 <= len(summary["failures"]) <= 20 and {"sent_s", "kind", "request", "reason"} == set(
        summary["failures"][0]
    )
    assert summary["slots"]["settled"] is False and summary["slots"]["linrec:state_slots_used"] == 1
    assert summary["rss"]["growth_bytes"] > 64 * 2**20 and summary["rss"]["source"].startswith("/metrics")
    table = capsys.readouterr().out
    assert "soak FAIL" in table and "failure x" in table and "first sent at" in table
    first_500 = summary["failure_reasons"]["chat: HTTP 500: the engine stopped"]
    assert first_500["count"] >= 1 and first_500["first"]["request"].startswith("POST /v1/chat/completions {")


def test_a_sound_server_passes_with_deliberate_disconnects(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    scrapes: list[int] = []
    with serving(fake_openai_server(is_broken=False, metrics_scrapes=scrapes)) as url:
        code = soak_against(url, tmp_path / "soak.json", "--bad-fraction", "0", "--disconnect-fraction", "0.5")
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert code == 0, capsys.readouterr().out
    assert summary["passed"] and summary["num_failures"] == 0 and summary["failures"] == []
    assert summary["num_disconnects"] >= 1  # streams cut after 1-6 events of a 3-step stream, at least
    assert summary["num_requests"] == sum(s["sent"] for s in summary["by_kind"].values())
    assert summary["not_sent"] == {} and summary["config"]["max_model_len"] == 4096


def test_soak_flags_are_checked_before_anything_runs(capsys: pytest.CaptureFixture) -> None:
    for flags, message in (
        (["--skip-bad", "nonsense"], "expected --skip-bad names from malformed-json"),
        (["--run-time", "soon"], "expected --run-time like 90, 45s, 10m or 1h30m, got 'soon'"),
        (["--max-rss-growth", "lots"], "expected --max-rss-growth as MiB (64, 64MiB) or a percentage (10%)"),
        (["--bad-fraction", "2"], "expected --bad-fraction in [0, 1], got 2.0"),
    ):
        assert linrec_main(["bench", "serve", "--soak", "--url", "http://127.0.0.1:9", *flags]) == 2
        assert message in capsys.readouterr().err


def test_a_short_soak_against_the_demo_server(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    command = [sys.executable, "-m", "linrec.loadtest.run", "--soak", "--run-time", "6s", "--users", "4"]
    command += ["--bad-fraction", "0.2", "--rss-interval", "0.5", "--out", str(out)]
    # Six seconds of traffic measure the allocators' warm-up, not a leak: on the 2-core VM the growth was 58-72
    # MiB in six runs, at this change and at the one before it alike, against the default bound of 64 MiB. The
    # leak check is the long soak (docs/benchmarks.md); this test checks the mechanics, with room for warm-up.
    command += ["--max-rss-growth", "160"]
    env = {**os.environ, "LINREC_CACHE_DIR": str(tmp_path / "cache")}  # the demo model, made on first use
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    summary = json.loads(out.read_text())
    assert set(summary) >= {"config", "duration_s", "by_kind", "failures", "failure_reasons", "slots", "rss", "checks"}
    assert summary["config"]["model_name"] == "linrec-default" and summary["config"]["max_model_len"] == 2048
    assert {"machine", "date", "command", "server_command", "seed"} <= set(summary["config"])
    assert summary["num_requests"] == sum(s["sent"] for s in summary["by_kind"].values()) >= 10
    assert {"completions", "chat", "completions (stream)", "chat (stream)"} <= set(summary["by_kind"])
    assert summary["rss"]["source"].startswith(("/metrics", "/proc")) and len(summary["rss"]["samples"]) >= 3
    assert "soak " in done.stdout and "nothing lost" in done.stdout
    assert done.returncode == 0 and summary["passed"], done.stdout + summary.get("server_log_tail", "")

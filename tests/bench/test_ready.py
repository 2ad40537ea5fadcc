"""`linrec bench ready`: real `linrec serve` starts on the tiny demo model, cold then warm in one Triton cache
dir, timed to /health 200, with the warm-up's compilation count read from the server's log; and the command's
flags and output."""

from __future__ import annotations

import json
import os

import pytest

import linrec.bench.ready as ready
from linrec.bench.ready import ReadyResult, ReadyRun, parse_compilations, run_ready_bench
from linrec.cli import main
from linrec.engine.warmup import WarmupReport


def test_the_count_is_read_from_the_warmup_summary():
    report = WarmupReport(12, 13, 4.2, num_compilations=40, num_startup_compilations=57)
    log = f"loading ... 100%\rwarming up: 100%|####| 25/25\n{report.summary()}\nINFO: started\n"
    assert parse_compilations(log) == 57
    uncounted = WarmupReport(12, 13, 4.2, num_compilations=None, num_startup_compilations=None)
    assert parse_compilations(uncounted.summary()) is None
    assert parse_compilations("no warm-up here") is None


def test_a_cold_and_a_warm_start_of_a_real_server(demo_model_dir, monkeypatch):
    caches = []
    real = ready.started_server

    def spy(args, workdir):
        caches.append(os.environ["TRITON_CACHE_DIR"])
        return real(args, workdir)

    monkeypatch.setattr(ready, "started_server", spy)
    before = os.environ.get("TRITON_CACHE_DIR")
    result = run_ready_bench(
        demo_model_dir(),
        ["--warmup=on", "--kernel-backend=torch", "--max-num-seqs=4", "--max-num-batched-tokens=32"],
        repeats=1,
        startup_timeout=300,
    )
    assert [r.cache for r in result.runs] == ["cold", "warm"]
    assert all(r.seconds > 0 and r.first_request_s > 0 and r.second_request_s > 0 for r in result.runs)
    assert caches[0] == caches[1] and caches[0].endswith("triton")  # the warm start reuses the cold one's dir
    assert os.environ.get("TRITON_CACHE_DIR") == before  # restored
    # The torch backend on the CPU compiles no Triton kernel; the count is there because the warm-up ran.
    assert [r.num_compilations for r in result.runs] == [0, 0]
    assert "warm / cold" in result.format()


def test_the_command_prints_the_table_or_json(monkeypatch, capsys):
    runs = [ReadyRun("cold", 30.0, 120, 0.5, 0.4), ReadyRun("warm", 6.0, 120, 0.5, 0.4)]
    runs += [ReadyRun("cold", 40.0, 120, 0.7, 0.6), ReadyRun("warm", 8.0, 120, 0.7, 0.6)]
    fake = ReadyResult("m", ["--x"], runs)
    seen = {}

    def fake_bench(model, server_args, repeats, startup_timeout):
        seen.update(model=model, server_args=server_args, repeats=repeats)
        return fake

    monkeypatch.setattr(ready, "run_ready_bench", fake_bench)
    assert main(["bench", "ready", "--model", "m", "--server-arg=--x", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert seen == {"model": "m", "server_args": ["--x"], "repeats": 2}
    assert "35.00" in out and "7.00" in out and "0.20x" in out and "120" in out
    assert main(["bench", "ready", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["cold"] == {
        "median_s": 35.0,
        "compilations": 120,
        "first_request_s": pytest.approx(0.6),
        "second_request_s": pytest.approx(0.5),
    }
    with pytest.raises(ValueError, match="expected repeats >= 1"):
        run_ready_bench(repeats=0)

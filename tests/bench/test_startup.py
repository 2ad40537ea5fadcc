"""`linrec bench startup`: the probe measures a fresh process, the bench alternates contenders and reports
medians and default / demo ratios."""

from __future__ import annotations

import json

import pytest

import linrec.bench.startup as startup
from linrec.bench.startup import MEASURES, run_startup_bench


def test_the_probe_runs_in_a_fresh_process(demo_model_dir) -> None:
    measured = startup._probe_in_fresh_process(demo_model_dir(), max_tokens=3)
    assert all(measured[m] >= 0 for m in MEASURES) and measured["load_s"] > 0
    assert isinstance(measured["sample"], str)


def test_contenders_take_turns_and_ratios_are_default_over_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_probe(model: str, max_tokens: int) -> dict:
        calls.append("default" if model.endswith("default") else "demo")
        scale = 2.0 if calls[-1] == "default" else 1.0
        return {**{m: scale * len(calls) for m in MEASURES}, "sample": calls[-1]}

    monkeypatch.setattr(startup, "_probe_in_fresh_process", fake_probe)
    result = run_startup_bench(repeats=3, max_tokens=4)
    assert calls == ["default", "demo"] * 3
    default, demo = result.contenders
    assert default.medians["load_s"] == 2.0 * 3 and demo.medians["load_s"] == 4
    assert result.ratios()["load_s"] == pytest.approx(1.5)
    assert json.loads(result.to_json())["default_over_demo"]["import_s"] == pytest.approx(1.5)
    assert "default/demo" in result.format() and "1.50x" in result.format()
    with pytest.raises(ValueError, match="expected repeats >= 1"):
        run_startup_bench(repeats=0)

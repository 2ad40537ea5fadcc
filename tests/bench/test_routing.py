"""`linrec bench routing` on a tiny workload: every configuration reported, the self-checks passing, the ratios
and the JSON output in their documented shape."""

from __future__ import annotations

import json

from linrec.bench.routing import routes_for, skip_route
from linrec.cli import main


def test_skip_routes_keep_the_first_layer_and_skip_the_fraction():
    for layers in (4, 8, 12):
        for fraction in (0.25, 0.5, 0.75):
            route = skip_route(layers, fraction)
            assert route[0] == 1 and route.count(0) == round(fraction * layers), (layers, fraction, route)
    configs = routes_for(8, 3)
    assert configs["none"] == [None] * 3 and all(sum(r) == 8 for r in configs["ones"])
    assert configs["repeat-25"][0].count(2) == 2


def test_tiny_run_reports_every_configuration(tmp_path, capsys):
    out = tmp_path / "routing.json"
    argv = ["bench", "routing", "--num-layers", "4", "--num-requests", "6", "--prompt-len", "6", "--output-len", "3"]
    assert main([*argv, "--repeats", "1", "--device", "cpu", "--budget-slots", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    names = ["none", "ones", "skip-25", "skip-50", "skip-75", "alt-skip", "repeat-25"]
    assert [c["name"] for c in data["configs"]] == names
    assert data["ones_equal_none"] and data["skips_differ"]
    assert set(data["ratios"]) == {f"{n} / none" for n in names[1:]}
    fractions = {c["name"]: c["layer_fraction"] for c in data["configs"]}
    assert fractions["skip-50"] == 0.5 and fractions["repeat-25"] == 1.25
    assert "all-ones overhead" in text and "checks: ones == none bit for bit: yes" in text
    # under a budget of 2 slots: routes running complementary halves of the layers run twice the requests at once;
    # one route for everyone leaves rows nobody else can use
    bounded = {c["name"]: c["peak_running"] for c in data["bounded"]}
    assert data["budget_slots"] == 2 and bounded == {"none": 2, "skip-50": 2, "halves": 4}
    assert set(data["bounded_ratios"]) == {"skip-50 / none", "halves / none"}
    assert {c["name"]: c["peak_running"] for c in data["configs"]}["none"] == 6

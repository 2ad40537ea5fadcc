"""Layer routes over HTTP through the official `openai` client (extra_body, as for vLLM's extra fields): the
answers of the offline routed engine, the route and layer passes in usage, "auto" with a router, refusals as
400s naming layer_route, and the counters a real scrape reads."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

import linrec_client as lc
from linrec import LLM
from linrec.engine.async_llm import AsyncLLM
from linrec.engine.config import EngineConfig
from linrec.engine.sampling_params import SamplingParams
from linrec.models.demo import write_seeded_model
from linrec.models.router import write_random_routers

openai = pytest.importorskip("openai")

NUM_LAYERS = 4
PROMPT = [72, 101, 108, 108, 111, 44, 32, 119]
ENGINE = {"device": "cpu", "dtype": "float32", "max_num_seqs": 8, "enable_prefix_caching": False}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("routing-api")
    path = write_seeded_model(root / "model", "mamba2", {"num_hidden_layers": NUM_LAYERS})
    hidden = json.loads((path / "config.json").read_text())["hidden_size"]
    return path, write_random_routers(root / "router", NUM_LAYERS, hidden, seed=5)


def test_routes_over_http_equal_the_offline_engine_and_show_in_usage(model, tools):
    path, router = model
    offline = LLM(str(path), router=str(router), **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    skip = [1, 0, 1, 1]
    want_skip = offline.generate([PROMPT], params, layer_route=skip)[0].outputs[0]
    want_auto = offline.generate([PROMPT], params, layer_route="auto")[0].outputs[0]
    llm = AsyncLLM(EngineConfig(model=str(path), router=str(router), **ENGINE))
    try:
        with tools.run_app(tools.app_over(llm)) as base_url:
            client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
            greedy = dict(model="demo", max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True})
            plain = client.completions.create(prompt=PROMPT, **greedy)
            assert "layers_executed" not in plain.usage.model_dump()  # unchanged without a route
            done = client.completions.create(
                prompt=PROMPT, **{**greedy, "extra_body": {"ignore_eos": True, "layer_route": skip}}
            )
            assert done.choices[0].text == want_skip.text
            usage = done.usage.model_dump()
            assert usage["layer_routes"] == [skip] and usage["layers_executed"] == 3
            stream = client.chat.completions.create(
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
                **{**greedy, "extra_body": {"ignore_eos": True, "layer_route": "auto"}},
            )
            chunks = list(stream)
            auto_usage = chunks[-1].usage.model_dump()
            assert len(auto_usage["layer_routes"][0]) == NUM_LAYERS
            auto = client.completions.create(
                prompt=PROMPT, **{**greedy, "extra_body": {"ignore_eos": True, "layer_route": "auto"}}
            )
            assert auto.choices[0].text == want_auto.text
            assert auto.usage.model_dump()["layer_routes"] == [list(want_auto.layer_route)]

            for body, message in (
                ({"layer_route": [1, 1]}, "expected a layer route of 4 counts"),
                ({"layer_route": [1, 3, 1, 1]}, "counts 0, 1 or 2, got [1, 3, 1, 1]"),
                ({"layer_route": "sometimes"}, "layer_route"),
                ({"layer_route": [1, 2, 1, 1], "n": 2}, "expected n=1 with a route that repeats a layer"),
                ({"layer_route": "auto", "layer_route_skip_bias": 1000}, "layer_route_skip_bias"),
                ({"layer_route": "auto", "layer_route_skip_bias": "lots"}, "layer_route_skip_bias"),
            ):
                r = httpx.post(
                    base_url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, **body}, timeout=60
                )
                assert r.status_code == 400, (body, r.text)
                error = r.json()["error"]
                assert message in error["message"] and "\n" not in error["message"], error
                assert error["param"] is not None and "layer_route" in error["param"] or body.get("n"), error
            # nobody else noticed: the next routed request is served as before
            again = client.completions.create(
                prompt=PROMPT, **{**greedy, "extra_body": {"ignore_eos": True, "layer_route": skip}}
            )
            assert again.choices[0].text == want_skip.text

            # the Python SDK names the fields and types the usage
            with lc.Client(base_url, model="demo") as sdk:
                out = sdk.completions(PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True, layer_route=skip)
            assert out.choices[0].text == want_skip.text
            assert out.usage.layer_routes == [skip] and out.usage.layers_executed == 3

            metrics = httpx.get(base_url + "/metrics", timeout=60).text

            def metric(name: str) -> float:
                lines = [line for line in metrics.splitlines() if line.startswith(f"linrec:{name}")]
                assert lines, name
                return float(lines[0].split()[-1])

            assert metric("layers_skipped_total") >= len(PROMPT) + 5  # prompt and decodes, one layer each
            # every request's rows were given back, whatever its route ("auto" held two rows of every layer)
            assert metric("state_rows_total") == NUM_LAYERS * metric("state_slots_total") > 0
            assert metric("state_rows_used") == 0 and metric("state_bytes_used") == 0
    finally:
        llm.shutdown()


def test_auto_without_a_router_is_a_400(model, tools):
    path, _router = model
    llm = AsyncLLM(EngineConfig(model=str(path), **ENGINE))
    try:
        with tools.run_app(tools.app_over(llm)) as base_url:
            r = httpx.post(
                base_url + "/v1/completions",
                json={"prompt": PROMPT, "max_tokens": 2, "layer_route": "auto"},
                timeout=60,
            )
            assert r.status_code == 400
            assert "this engine has none (--router DIR)" in r.json()["error"]["message"]
            assert r.json()["error"]["param"] == "layer_route"
    finally:
        llm.shutdown()

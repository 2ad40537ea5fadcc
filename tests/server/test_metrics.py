"""/metrics after known traffic, read by prometheus-client's own parser, and scraped by a real
Prometheus server (Debian's `prometheus`, when installed): counters equal the usage the responses
reported, histogram counts equal request counts, gauges come back to zero."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import textwrap
import time
import urllib.parse
from collections.abc import Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

MODEL = "demo"
LABELS = {"model_name": MODEL}
REQUEST_HISTOGRAMS = (
    "time_to_first_token_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "request_prefill_time_seconds",
    "request_decode_time_seconds",
    "request_prompt_tokens",
    "request_generation_tokens",
)


def scrape(base_url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} for every sample, through prometheus-client's parser."""
    response = httpx.get(f"{base_url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    key = ("linrec:" + name, tuple(sorted(labels.items())))
    assert key in samples, f"no sample {key}; have {sorted(k for k in samples if k[0].startswith('linrec:' + name))}"
    return samples[key]


def test_metrics_agree_with_the_responses(fresh_app) -> None:
    v1, llm = fresh_app.v1, fresh_app.llm
    greedy = {"model": MODEL, "temperature": 0, "ignore_eos": True}
    usages = []
    # Two prompts x n=2 (4 samples, 2 engine requests), all ending on length.
    out = httpx.post(f"{v1}/completions", json={**greedy, "prompt": ["Hello", "Yo"], "n": 2, "max_tokens": 4})
    usages.append(out.json()["usage"])
    # A chat stream with usage.
    body = {**greedy, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{v1}/chat/completions", json=body) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: {")]
    usages.append(json.loads(events[-1])["usage"])
    # One sample ending on a stop token (a +100 bias makes token 66 certain).
    stop = {"model": MODEL, "prompt": "x", "max_tokens": 10, "logit_bias": {"66": 100}, "stop_token_ids": [66]}
    out = httpx.post(f"{v1}/completions", json=stop).json()
    assert out["choices"][0]["finish_reason"] == "stop"
    usages.append(out["usage"])
    # HTTP-only traffic.
    assert httpx.post(f"{v1}/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 400
    assert httpx.get(f"{v1}/nope").status_code == 404
    assert httpx.get(f"{v1}/models").status_code == 200

    s = scrape(fresh_app.base_url)
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    assert generated == 16 + 3 + 1
    assert value(s, "prompt_tokens_total", **LABELS) == prompt_tokens
    assert value(s, "generation_tokens_total", **LABELS) == generated
    assert value(s, "request_success_total", finished_reason="length", **LABELS) == 4 + 1
    assert value(s, "request_success_total", finished_reason="stop", **LABELS) == 1
    num_requests = 2 + 1 + 1  # engine requests: one per prompt
    for name in REQUEST_HISTOGRAMS:
        assert value(s, name + "_count", **LABELS) == num_requests, name
        assert value(s, name + "_bucket", le="+Inf", **LABELS) == num_requests, name
    assert value(s, "request_prompt_tokens_sum", **LABELS) == prompt_tokens
    assert value(s, "request_generation_tokens_sum", **LABELS) == generated
    # One inter-token gap per token after each sample's first.
    assert value(s, "inter_token_latency_seconds_count", **LABELS) == generated - (4 + 1 + 1)
    # One clock: queue + prefill = time to first token; queue + prefill + decode = end to end.
    queue, prefill, decode = (
        value(s, f"request_{p}_time_seconds_sum", **LABELS) for p in ("queue", "prefill", "decode")
    )
    assert queue + prefill == pytest.approx(value(s, "time_to_first_token_seconds_sum", **LABELS), abs=1e-6)
    assert queue + prefill + decode == pytest.approx(value(s, "e2e_request_latency_seconds_sum", **LABELS), abs=1e-6)
    assert prefill > 0 and decode > 0

    http = {"method": "POST", "route": "/v1/completions"}
    assert value(s, "http_requests_total", status="200", **http) == 2
    assert value(s, "http_requests_total", status="400", **http) == 1
    assert value(s, "http_request_duration_seconds_count", **http) == 3
    assert value(s, "http_requests_total", method="POST", route="/v1/chat/completions", status="200") == 1
    assert value(s, "http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert value(s, "http_requests_total", method="GET", route="/v1/models", status="200") == 1

    stats = llm.engine.stats()
    pool = llm.engine.pool
    assert value(s, "state_slots_total", **LABELS) == stats.num_slots_total == pool.num_slots
    assert value(s, "state_bytes_per_request", **LABELS) == pool.total_bytes // pool.num_rows > 0
    for gauge in ("state_slots_used", "num_requests_running", "num_requests_waiting"):
        assert value(s, gauge, **LABELS) == 0, gauge
    assert value(s, "kernel_compilations_after_warmup_total", **LABELS) == 0  # the torch backend compiles nothing


def test_gauges_follow_a_running_request_and_an_aborted_one_counts_its_prompt(fresh_app) -> None:
    prompt_ids = fresh_app.llm.tokenizer.encode("hold the slot")
    body = {"model": MODEL, "prompt": prompt_ids, "max_tokens": 80, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{fresh_app.v1}/completions", json=body) as response:
            lines = response.iter_lines()  # held: dropping the iterator closes the connection
            next(lines)
            s = scrape(fresh_app.base_url)
            assert value(s, "num_requests_running", **LABELS) == value(s, "state_slots_used", **LABELS) == 1
            assert value(s, "prompt_tokens_total", **LABELS) == len(prompt_ids)  # prefilled, not finished
    deadline = time.monotonic() + 10
    while value(s := scrape(fresh_app.base_url), "state_slots_used", **LABELS):
        assert time.monotonic() < deadline, "the aborted request kept its slot"
        time.sleep(0.02)
    assert value(s, "num_requests_running", **LABELS) == 0
    # Aborted: counted tokens, but no finished-request observations.
    assert value(s, "prompt_tokens_total", **LABELS) == len(prompt_ids)
    assert value(s, "generation_tokens_total", **LABELS) >= 1
    assert ("linrec:e2e_request_latency_seconds_count", tuple(sorted(LABELS.items()))) not in s


def test_requests_refused_by_the_middleware_keep_their_route_label(live_server, tools) -> None:
    with tools.run_app(tools.app_over(live_server.llm, api_key="sekrit")) as base:
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.post(f"{base}/v1/nope", json={}).status_code == 401  # unknown /v1 paths need the key too
        s = scrape(base)
    assert value(s, "http_requests_total", method="GET", route="/v1/models", status="401") == 1
    assert value(s, "http_requests_total", method="POST", route="unmatched", status="401") == 1


needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="needs Debian's `prometheus` binary (.ci/run installs it)"
)


@contextlib.contextmanager
def prometheus(tmp_path, tools, jobs: dict[str, str]) -> Iterator[Callable[[str], list]]:
    """A real Prometheus server scraping every second, one job per {name: YAML lines of its scrape config};
    yields query(promql) -> result vector."""
    config = tmp_path / "prometheus.yml"
    scrape = "".join(f"  - job_name: {name}\n" + textwrap.indent(body, "    ") for name, body in jobs.items())
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n{scrape}")
    port = tools.free_port()
    command = ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}"]
    command += [f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def query(promql: str) -> list:
        assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
        url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(promql)}"
        response = httpx.get(url, timeout=5)
        assert response.status_code == 200, response.text
        return response.json()["data"]["result"]

    try:
        deadline = time.monotonic() + 60
        while True:  # 503 until its storage is open
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass  # not listening yet
            assert time.monotonic() < deadline, "Prometheus never became ready"
            time.sleep(0.1)
        yield query
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def wait_for(query: Callable[[str], list], *promql: str, timeout: float = 60) -> list[list]:
    """Each query's result once every one of them is non-empty (Prometheus has scraped and stored)."""
    deadline = time.monotonic() + timeout
    while True:
        results = [query(q) for q in promql]
        if all(results):
            return results
        assert time.monotonic() < deadline, f"Prometheus never stored {promql}"
        time.sleep(0.2)


@needs_prometheus
def test_a_real_prometheus_server_scrapes_linrec(fresh_app, tools, tmp_path) -> None:
    out = httpx.post(f"{fresh_app.v1}/completions", json={"model": MODEL, "prompt": "scrape me", "max_tokens": 3})
    expected = out.json()["usage"]
    target = fresh_app.base_url.removeprefix("http://")
    with prometheus(tmp_path, tools, {"linrec": f"static_configs:\n  - targets: ['{target}']\n"}) as query:
        prompt, generated = wait_for(
            query, 'linrec:prompt_tokens_total{job="linrec"}', "linrec:generation_tokens_total"
        )
        assert prompt[0]["metric"]["model_name"] == MODEL
        assert float(prompt[0]["value"][1]) == expected["prompt_tokens"]
        assert float(generated[0]["value"][1]) == expected["completion_tokens"]
        assert float(query('up{job="linrec"}')[0]["value"][1]) == 1
        ttft = query("linrec:time_to_first_token_seconds_count")
        assert float(ttft[0]["value"][1]) == 1


@needs_prometheus
def test_prometheus_scrapes_a_protected_metrics_endpoint_with_the_key_only(live_server, tools, tmp_path) -> None:
    app = tools.app_over(live_server.llm, api_key="scrape-key", metrics_require_api_key=True)
    with tools.run_app(app) as base:
        target = f"static_configs:\n  - targets: ['{base.removeprefix('http://')}']\n"
        jobs = {"with_key": "authorization:\n  credentials: scrape-key\n" + target, "without_key": target}
        with prometheus(tmp_path, tools, jobs) as query:
            with_key, without_key = wait_for(query, 'up{job="with_key"}', 'up{job="without_key"}')
            assert float(with_key[0]["value"][1]) == 1
            assert float(without_key[0]["value"][1]) == 0  # the scrape was refused (401)
            assert wait_for(query, 'linrec:state_slots_total{job="with_key"}')[0]
            assert query('linrec:state_slots_total{job="without_key"}') == []
        metrics = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer scrape-key"}).text
    assert 'route="/metrics",status="401"' in metrics and 'route="/metrics",status="200"' in metrics


def test_stored_state_metrics_follow_the_engine(demo_model_dir) -> None:
    """Stored states per tier and the store's counters, rendered from a real engine's stats and read back by
    prometheus-client's parser after a store, a continuation, a miss and a push to the host."""
    from linrec import LLM, SamplingParams
    from linrec.server.metrics import Metrics

    llm = LLM(demo_model_dir(), max_device_states=1, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    llm.generate([[1, 2, 3]], params, store_state="a")
    llm.generate([[4]], params, resume_state="a", store_state="b")  # b takes the one row: a goes to the host
    with pytest.raises(ValueError):
        llm.generate([[4]], params, resume_state="nobody")
    body, _ = Metrics(MODEL, llm.engine.stats).render()
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert value(samples, "stored_states", tier="device", **LABELS) == 1
    assert value(samples, "stored_states", tier="host", **LABELS) == 1
    assert value(samples, "stored_states", tier="disk", **LABELS) == 0
    per_state = llm.engine.bytes_per_request
    assert value(samples, "stored_state_bytes", tier="host", **LABELS) == per_state
    for name, expected in (("saves", 2), ("resumes", 1), ("misses", 1), ("spills_to_host", 1), ("restores", 0)):
        assert value(samples, f"stored_state_{name}_total", **LABELS) == expected, name

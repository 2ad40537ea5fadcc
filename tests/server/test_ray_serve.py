"""Engine replicas on Ray Serve (server/ray_serve.py, server/ray_router.py): one local Ray instance with two CPU
replicas of the tiny demo model for the module, the usual app over a RayEngineClient, driven by the official
openai client. The replica kill runs last: the module has one replica fewer after it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import httpx
import openai
import pytest

from linrec.engine.config import EngineConfig
from linrec.server.config import ServerConfig

MODEL = "demo"
ENGINE = {"device": "cpu", "max_num_seqs": 8, "max_num_batched_tokens": 256, "max_model_len": 4096}
GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}


@dataclass
class RayServer:
    base_url: str
    client: object  # RayEngineClient
    tools: SimpleNamespace  # tests/server/conftest.py's helpers

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def decisions(self) -> dict[str, float]:
        return self.tools.routing_decisions(self.base_url)

    def samples(self, family: str) -> list:
        return self.tools.metric_samples(self.base_url, family)


@pytest.fixture(scope="module")
def ray_server(server_model_dir: str, tools) -> Iterator[RayServer]:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'linrec[ray]')")
    import ray
    from ray import serve

    from linrec.server.ray_serve import RayEngineClient, build_ray_app, deploy_engines, start_local_ray

    config = EngineConfig(model=server_model_dir, **ENGINE)
    start_local_ray(config, 2)
    client = None
    try:
        client = RayEngineClient(deploy_engines(config, 2, app_name="linrec-test"))
        assert client.info.num_replicas == 2
        app = build_ray_app(client, ServerConfig(served_model_name=MODEL), MODEL)
        with tools.run_app(app) as base_url:
            yield RayServer(base_url, client, tools)
    finally:
        if client is not None:
            client.shutdown()
        serve.shutdown()
        ray.shutdown()


def test_the_openai_client_gets_what_one_engine_answers(ray_server: RayServer, make_server) -> None:
    prompts = ["Once upon a time", "The quick brown fox", "Hello"]
    api = ray_server.openai()
    replicated = [api.completions.create(prompt=p, **GREEDY).choices[0].text for p in prompts]
    chat = api.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], stream=True, **GREEDY)
    replicated_chat = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    with make_server(max_model_len=4096) as single:
        one = single.client()
        assert [one.completions.create(prompt=p, **GREEDY).choices[0].text for p in prompts] == replicated
        chat = one.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], stream=True, **GREEDY)
        assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == replicated_chat
    assert {m.id for m in api.models.list().data} == {MODEL}
    assert httpx.get(ray_server.base_url + "/health", timeout=10).status_code == 200
    with pytest.raises(openai.BadRequestError, match="token ids"):
        api.completions.create(prompt=[10**6], **GREEDY)


def test_a_shared_prefix_and_a_conversation_go_to_the_replica_that_holds_them(ray_server: RayServer) -> None:
    api = ray_server.openai()
    system = list(range(3, 3 + 96))  # six prefix blocks; the engine snapshots the prompt's end
    api.completions.create(prompt=system, **GREEDY)
    before = ray_server.decisions()
    api.completions.create(prompt=system + [210, 211, 212], **GREEDY)
    after = ray_server.decisions()
    assert after["prefix"] == before.get("prefix", 0) + 1
    # The prefix really was reused there: one replica's prefix-cache hits hold the shared tokens (once the client's
    # stats poll has seen them).
    deadline = time.monotonic() + 5
    while True:
        hits = {s.labels["replica"]: s.value for s in ray_server.samples("linrec:replica_prefix_cache_hits")}
        if max(hits.values()) >= len(system) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert max(hits.values()) >= len(system), hits

    first = api.responses.create(
        model=MODEL, input="Hi", temperature=0, max_output_tokens=4, extra_body={"ignore_eos": True}
    )
    before = ray_server.decisions()
    for _ in range(2):  # each turn finds the stored state on its replica (a wrong one would answer 404)
        turn = api.responses.create(
            model=MODEL,
            input="And so?",
            previous_response_id=first.id,
            temperature=0,
            max_output_tokens=4,
            extra_body={"ignore_eos": True},
        )
        assert turn.previous_response_id == first.id
    assert ray_server.decisions()["session"] == before.get("session", 0) + 2
    assert api.responses.retrieve(first.id).id == first.id


def test_per_replica_metrics_are_scraped_at_the_ingress(ray_server: RayServer) -> None:
    time.sleep(0.6)  # a stats poll after the previous test's requests
    slots = ray_server.samples("linrec:replica_state_slots_total")
    assert len({s.labels["replica"] for s in slots}) == 2 and all(s.value == ENGINE["max_num_seqs"] for s in slots)
    (total,) = ray_server.samples("linrec:state_slots_total")
    assert total.value == 2 * ENGINE["max_num_seqs"]  # the engine gauges are the replicas' sum
    (alive,) = ray_server.samples("linrec:replicas_alive")
    assert alive.value == 2


def test_a_killed_replica_fails_its_requests_and_the_other_serves(ray_server: RayServer) -> None:
    import ray

    api = ray_server.openai()
    stream = api.completions.create(
        model=MODEL, prompt="Long story", max_tokens=3000, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks)  # running now
    running = {s.labels["replica"]: s.value for s in ray_server.samples("linrec:replica_num_requests_running")}
    deadline = time.monotonic() + 5
    while not any(running.values()) and time.monotonic() < deadline:  # the next stats poll sees it
        time.sleep(0.2)
        running = {s.labels["replica"]: s.value for s in ray_server.samples("linrec:replica_num_requests_running")}
    (busy,) = [replica for replica, n in running.items() if n]
    ray.kill(ray.get_actor(ray_server.client.replica_actor_names()[busy], namespace="serve"), no_restart=True)
    started = time.monotonic()
    with pytest.raises(openai.APIError, match="stopped while serving"):
        for _ in chunks:
            pass
    assert time.monotonic() - started < 30  # an error, not a hang
    answer = api.completions.create(prompt="Still there?", **GREEDY)
    assert answer.choices[0].finish_reason == "length"
    assert httpx.get(ray_server.base_url + "/health", timeout=10).status_code == 200


def test_one_replica_is_todays_path_without_ray() -> None:
    """--replicas 1 runs server.app.run_server (no Ray import); --replicas 0 is one line."""
    script = (
        "import sys\n"
        "import linrec.server.app as app\n"
        "from linrec import cli\n"
        "app.run_server = lambda engine, server: print('run_server', engine.device, server.port) or 0\n"
        "rc = cli.main(['serve', '--replicas', '1', '--device', 'cpu', '--port', '8123'])\n"
        "print('ray imported:', 'ray' in sys.modules, 'rc:', rc)\n"
    )
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "run_server cpu 8123" in out.stdout and "ray imported: False rc: 0" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "linrec.cli", "serve", "--replicas", "0"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 1 and bad.stderr.strip() == "linrec: error: expected --replicas >= 1, got 0"


def test_a_local_ray_instance_gets_whole_cpus(monkeypatch) -> None:
    """3 CPU replicas on a 2-core machine: 3 CPUs (half a CPU per replica + 1, rounded up); Ray refuses 2.5."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'linrec[ray]')")
    import ray
    from ray import serve

    from linrec.server import ray_serve

    started: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.update(kwargs))
    monkeypatch.setattr(serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(ray_serve.os, "cpu_count", lambda: 2)
    ray_serve.start_local_ray(EngineConfig(model="demo", device="cpu"), 3)
    assert started["num_cpus"] == 3 and isinstance(started["num_cpus"], int)

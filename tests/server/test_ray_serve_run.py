"""The `serve run` path (server/ray_serve.py's build_serve_app): Serve's HTTP proxy in front of the ingress
deployment, whose RayEngineClient calls the engines' handle from inside a Serve replica. There the router is a copy
unpickled from Serve's config and every call is made while an HTTP request is being served, unlike
`linrec serve --replicas` (test_ray_serve.py). One local Ray instance for the module: two CPU replicas of the demo
model and one ingress."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

MODEL = "demo"
ENGINE = {"device": "cpu", "max_num_seqs": 8, "max_num_batched_tokens": 256, "max_model_len": 4096}
GREEDY = {"temperature": 0, "max_output_tokens": 4, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def serve_run(server_model_dir: str, tools) -> Iterator[str]:
    """The app as `serve run linrec.server.ray_serve:build_serve_app model=DIR replicas=2 ...` deploys it (string
    values, as the command line passes them), on Serve's proxy at a free port; yields its base URL."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'linrec[ray]')")
    import ray
    from ray import serve

    from linrec.server.ray_serve import build_serve_app

    port = tools.free_port()
    # 2 CPUs: two replicas at half a CPU each and the ingress at a quarter (Serve's controller and proxy take none)
    ray.init(
        num_cpus=max(os.cpu_count() or 1, 2),
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        logging_level=logging.WARNING,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"model": server_model_dir, "replicas": "2", "served_model_name": MODEL}
        app = build_serve_app({**args, **{k: str(v) for k, v in ENGINE.items()}})
        serve.run(app, name="linrec-serve-run", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_ingress_sees_both_replicas(serve_run: str, tools) -> None:
    deadline = time.monotonic() + 10  # the ingress may start before the second engine: its next stats poll sees it
    while True:
        (alive,) = tools.metric_samples(serve_run, "linrec:replicas_alive")
        if alive.value == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert alive.value == 2
    slots = tools.metric_samples(serve_run, "linrec:replica_state_slots_total")
    assert len({s.labels["replica"] for s in slots}) == 2
    assert httpx.get(serve_run + "/health", timeout=10).status_code == 200


def test_a_conversation_and_a_prompt_list_answer_as_one_engine(serve_run: str, make_server, tools) -> None:
    """A continuation finds its state (targeted calls reach their replica; the routing counters move); an imported
    state is continued on the replica that took it; the prompts of one request (concurrent calls made while one HTTP
    request is served) each reach a replica."""

    def conversation(api: openai.OpenAI, base_url: str) -> list[str]:
        first = api.responses.create(model=MODEL, input="Hi", **GREEDY)
        turn = api.responses.create(model=MODEL, input="And so?", previous_response_id=first.id, **GREEDY)
        assert turn.previous_response_id == first.id
        blob = httpx.get(f"{base_url}/v1/states/{first.id}", timeout=60)
        assert blob.status_code == 200
        imported = httpx.post(f"{base_url}/v1/states", content=blob.content, timeout=60)
        assert imported.status_code == 200, imported.text
        again = api.responses.create(model=MODEL, input="And so?", previous_response_id=imported.json()["id"], **GREEDY)
        return [first.output_text, turn.output_text, again.output_text]

    def prompt_list(api: openai.OpenAI) -> list[str]:
        prompts = [[5, 6, 7, i] for i in range(4)]
        answer = api.completions.create(
            model=MODEL, prompt=prompts, n=2, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
        )
        return [c.text for c in sorted(answer.choices, key=lambda c: c.index)]

    api = openai.OpenAI(base_url=serve_run + "/v1", api_key="unused", max_retries=0, timeout=60)
    before = tools.routing_decisions(serve_run)
    replicated = conversation(api, serve_run), prompt_list(api)
    after = tools.routing_decisions(serve_run)
    assert after["session"] == before.get("session", 0) + 2
    assert sum(after.values()) == sum(before.values()) + 3 + 4  # 3 responses, 4 prompts (n=2 is one request each)
    with make_server(max_model_len=ENGINE["max_model_len"]) as single:
        one = single.client(timeout=60)
        assert (conversation(one, single.base_url), prompt_list(one)) == replicated

"""The prefix cache over HTTP: `cache_salt` isolates tenants, /metrics counts queries, hits and snapshots."""

from __future__ import annotations

import random

import httpx


def metric(text: str, name: str) -> float:
    """The value of `name` (one sample, any labels) in a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_cache_salt_isolates_and_metrics_count_hits(make_server):
    rng = random.Random(0)
    system = [rng.randrange(256) for _ in range(64)]
    with make_server() as server:
        client = server.client()

        def complete(question: list[int], salt: str | None) -> None:
            extra = {"cache_salt": salt} if salt is not None else {}
            out = client.completions.create(
                model="demo", prompt=system + question, max_tokens=3, temperature=0, extra_body=extra
            )
            assert out.choices[0].finish_reason in ("length", "stop")

        def scrape() -> str:
            return httpx.get(server.base_url + "/metrics").text

        complete([1, 2, 3], "tenant-a")
        text = scrape()
        assert metric(text, "linrec:prefix_cache_request_queries_total") == 1
        assert metric(text, "linrec:prefix_cache_hits_total") == 0
        assert metric(text, "linrec:prefix_cache_states") >= 1
        assert metric(text, "linrec:prefix_cache_state_bytes") == metric(text, "linrec:prefix_cache_states") * metric(
            text, "linrec:state_bytes_per_request"
        )
        # The same tokens plus more, from another tenant and from no tenant: no hit.
        complete([1, 2, 3, 4, 5, 6], "tenant-b")
        complete([1, 2, 3, 4, 5, 6], None)
        assert metric(scrape(), "linrec:prefix_cache_request_hits_total") == 0
        # The same tenant resumes from its own prompt-end state (67 tokens).
        complete([1, 2, 3, 4, 5, 6], "tenant-a")
        text = scrape()
        assert metric(text, "linrec:prefix_cache_request_hits_total") == 1
        assert metric(text, "linrec:prefix_cache_hits_total") == 67
        assert metric(text, "linrec:prefix_cache_queries_total") == 67 + 3 * 70
        assert metric(text, "linrec:prefill_tokens_computed_total") == 67 + 2 * 70 + 3
        # An empty salt is a 400, as in vLLM.
        response = httpx.post(
            server.v1 + "/completions", json={"prompt": "hi", "max_tokens": 1, "cache_salt": ""}, timeout=30
        )
        assert response.status_code == 400

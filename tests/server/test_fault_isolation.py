"""Over HTTP: a request that breaks an engine step gets a 500 in OpenAI's shape (or an error event and
[DONE] on a stream) that quotes nobody else, while everyone else keeps streaming; the report's request
that used to stop the engine is a 400."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

MODEL = "demo"
POISON = "<<poison>>"  # a step holding this prompt fails from its first chunk on
LATE_POISON = "<<late>>"  # a step holding this prompt fails once it decodes (after its first token went out)


def poison_the_runner(llm) -> None:
    """A step raises (after running the forward, as a real fault would) whenever it holds a poisoned request."""
    markers = [llm.tokenizer.encode(text, add_special_tokens=False) for text in (POISON, LATE_POISON)]
    runner = llm.engine.runner
    forward = runner._forward

    def holds(ids: list[int], marker: list[int]) -> bool:
        return any(ids[i : i + len(marker)] == marker for i in range(len(ids)))

    def faulty(seqs, *args):
        hidden = forward(seqs, *args)
        for s in seqs:
            ids = llm.engine.scheduler._step[s.request_id].prompt_token_ids  # the live request behind it
            if holds(ids, markers[0]) or (holds(ids, markers[1]) and s.start_position > len(ids)):
                raise RuntimeError("injected fault")
        return hidden

    runner._forward = faulty


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
@pytest.mark.parametrize("stop_token_ids", [[99999], [-1]])
def test_the_request_that_stopped_the_engine_is_a_400(live_server, route, stop_token_ids) -> None:
    body = {"model": MODEL, "max_tokens": 4, "min_tokens": 1, "stop_token_ids": stop_token_ids}
    body.update({"prompt": "hi"} if route == "completions" else {"messages": [{"role": "user", "content": "hi"}]})
    response = httpx.post(f"{live_server.v1}/{route}", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "stop_token_ids"
    assert httpx.get(f"{live_server.base_url}/health").status_code == 200
    assert httpx.head(f"{live_server.base_url}/health").status_code == 200  # load balancers probe with HEAD
    ok = httpx.post(f"{live_server.v1}/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_a_failing_request_gets_a_500_and_everyone_else_keeps_streaming(make_server) -> None:
    with make_server(max_num_seqs=8) as server:
        poison_the_runner(server.llm)
        others: dict[int, list[str]] = {}

        def stream_other(i: int) -> None:
            body = {"model": MODEL, "prompt": f"secret of user {i}", "max_tokens": 24, "ignore_eos": True}
            with httpx.stream("POST", f"{server.v1}/completions", json={**body, "stream": True}, timeout=60) as r:
                assert r.status_code == 200
                others[i] = sse_events(r)

        threads = [threading.Thread(target=stream_other, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        whole = httpx.post(
            f"{server.v1}/completions", json={"model": MODEL, "prompt": POISON, "max_tokens": 8}, timeout=60
        )
        chat = {"model": MODEL, "messages": [{"role": "user", "content": LATE_POISON}], "stream": True}
        chat.update(max_tokens=16, ignore_eos=True)  # room for the quarantine rounds (each samples once more)
        with httpx.stream("POST", f"{server.v1}/chat/completions", json=chat, timeout=60) as response:
            assert response.status_code == 200  # the failure comes after the stream started
            streamed = sse_events(response)
        for thread in threads:
            thread.join(60)

        assert whole.status_code == 500
        error = whole.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "InternalServerError"
        assert streamed[-1] == "[DONE]" and json.loads(streamed[-2])["error"]["type"] == "InternalServerError"
        assert any(json.loads(e).get("choices") for e in streamed[:-2])  # it had streamed before it failed
        for text in (whole.text, *streamed):
            assert "secret" not in text and "Traceback" not in text
        for events in others.values():  # the others ran to the end, untouched
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length" and not any("error" in c for c in chunks)
        assert len(others) == 3
        assert httpx.get(f"{server.base_url}/health").status_code == 200
        stats = server.llm.engine.stats()
        assert stats.num_failed_requests == 2 and stats.num_step_failures >= 2 and stats.num_slots_used == 0
        metrics = scrape(f"{server.base_url}/metrics")
        assert metrics["linrec:request_failures"] == 2 and metrics["linrec:engine_step_failures"] >= 2
        assert metrics["linrec:num_requests_quarantined"] == 0 and metrics["process_resident_memory_bytes"] > 0


def scrape(url: str) -> dict[str, float]:
    """Metric family name -> its first sample's value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f.samples[0].value for f in text_string_to_metric_families(httpx.get(url).text) if f.samples}

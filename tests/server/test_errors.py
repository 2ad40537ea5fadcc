"""Bad input, auth, overload, disconnects and the SIGTERM drain, each against a live server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from linrec import envs

openai = pytest.importorskip("openai")

MODEL = "demo"
CHAT = [{"role": "user", "content": "hi"}]


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "n": 1000}, "n"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": [1, 2, 100000]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "x" * 200}, "prompt"),  # over max_model_len=96
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"999999": 1}}, "logit_bias"),
        ({"prompt": "x", "logprobs": 50}, "logprobs"),
        ({}, "prompt"),
    ],
)
def test_completion_bad_input_is_400(live_server, body: dict, param: str) -> None:
    response = httpx.post(f"{live_server.v1}/completions", json={"model": MODEL, **body})
    error = assert_openai_error(response, 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_malformed_bodies_and_chat_errors_are_400(live_server) -> None:
    url = f"{live_server.v1}/chat/completions"
    assert_openai_error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_openai_error(httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    assert_openai_error(httpx.post(url, json={"model": MODEL, "messages": []}), 400)
    assert_openai_error(httpx.post(url, json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}), 400)
    assert_openai_error(httpx.post(url, json={"model": MODEL, "messages": "hi"}), 400)
    # n above the engine's slot count (8) passes the schema but not the engine.
    assert_openai_error(httpx.post(url, json={"model": MODEL, "messages": CHAT, "n": 9}), 400)


def test_openai_client_raises_the_matching_errors(live_server) -> None:
    client = live_server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    assert info.value.status_code == 400 and "max_tokens" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=200)  # prompt + 200 > 96
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    assert info.value.status_code == 404 and info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):  # streaming refusals come before the stream starts
        client.completions.create(model=MODEL, prompt="x" * 200, stream=True)
    # The server goes on serving after all of these.
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices[0].finish_reason


def test_unknown_route_is_404_in_openai_shape(live_server) -> None:
    assert_openai_error(httpx.get(f"{live_server.v1}/nope"), 404)
    assert_openai_error(httpx.get(f"{live_server.v1}/completions"), 405)


def test_api_key_guards_v1_routes(live_server, tools, monkeypatch: pytest.MonkeyPatch) -> None:
    with tools.run_app(tools.app_over(live_server.llm, api_key="sekrit")) as base:
        error = assert_openai_error(httpx.get(f"{base}/v1/models"), 401)
        assert error["code"] == "invalid_api_key"
        assert_openai_error(httpx.post(f"{base}/v1/completions", json={"prompt": "x"}), 401)
        wrong = {"Authorization": "Bearer wrong"}
        assert_openai_error(httpx.post(f"{base}/v1/chat/completions", json={}, headers=wrong), 401)
        assert httpx.get(f"{base}/health").status_code == 200  # probes need no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="sekrit", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1
    # LINREC_API_KEY (read in envs.py) applies when the config names no key.
    monkeypatch.setenv("LINREC_API_KEY", "from-env")
    assert envs.api_key() == "from-env"
    with tools.run_app(tools.app_over(live_server.llm)) as base:
        assert_openai_error(httpx.get(f"{base}/v1/models"), 401)
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200


def wait_until(predicate, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.005)
    return time.monotonic() - start


def long_body(stream: bool) -> dict:
    return {"model": MODEL, "prompt": "go", "max_tokens": 4000, "ignore_eos": True, "stream": stream}


def test_disconnect_frees_the_slot(make_server) -> None:
    with make_server() as server:
        stats = server.llm.engine.stats
        # A stream closed by the client after its first event.
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"{server.v1}/completions", json=long_body(True)) as response:
                assert response.status_code == 200
                lines = response.iter_lines()  # held: a dropped line iterator closes the connection
                next(lines)
                assert stats().num_slots_used == 1
        waited = wait_until(lambda: stats().num_slots_used == 0 and stats().num_running == 0)
        print(f"stream closed: slot freed after {waited * 1000:.1f} ms")
        # A non-streaming request whose client gives up (read timeout closes the connection).
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.v1}/completions", json=long_body(False), timeout=httpx.Timeout(5, read=0.5))
        waited = wait_until(lambda: stats().num_slots_used == 0 and stats().num_running == 0)
        print(f"non-stream cancelled: slot freed after {waited * 1000:.1f} ms")
        # 5000 tokens take far longer than the wait: the engine aborted them rather than finishing.
        assert server.client().completions.create(model=MODEL, prompt="after", max_tokens=2).choices


def test_full_queue_is_429_with_retry_after(make_server) -> None:
    with make_server(max_num_seqs=1, max_waiting_requests=1) as server:
        stats = server.llm.engine.stats
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"{server.v1}/completions", json=long_body(True)) as running:
                lines = running.iter_lines()  # held: a dropped line iterator closes the connection
                next(lines)  # holds the only slot
                waiter_result: dict = {}
                waiter = threading.Thread(
                    target=lambda: waiter_result.update(
                        r=httpx.post(f"{server.v1}/completions", json={"model": MODEL, "prompt": "w", "max_tokens": 2})
                    )
                )
                waiter.start()
                wait_until(lambda: stats().num_waiting == 1)
                response = httpx.post(f"{server.v1}/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
                error = assert_openai_error(response, 429)
                assert response.headers["retry-after"] == "1" and "full" in error["message"]
                with pytest.raises(openai.RateLimitError):
                    server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
        waiter.join(30)  # the running stream closed: the waiting request gets the slot and finishes
        assert waiter_result["r"].status_code == 200


def test_sigterm_drains_in_flight_requests(server_model_dir: str, tools, tmp_path) -> None:
    port = tools.free_port()
    env = {**os.environ, "LINREC_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "linrec.cli", "serve", server_model_dir, "--port", str(port)]
    command += ["--device", "cpu", "--served-model-name", MODEL, "--drain-timeout", "3", "--log-level", "warning"]
    command += ["--max-model-len", "200000"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.1)
        events: list[str] = []
        long_events: list[str] = []
        with httpx.Client(timeout=60) as http:
            body = {"model": MODEL, "prompt": "drain", "max_tokens": 100, "ignore_eos": True, "stream": True}
            long = {**body, "max_tokens": 150_000}  # far beyond the 3 s drain timeout
            with (
                http.stream("POST", f"{base}/v1/completions", json=body) as response,
                http.stream("POST", f"{base}/v1/completions", json=long) as long_response,
            ):
                lines, long_lines = response.iter_lines(), long_response.iter_lines()
                events.append(next(lines))
                long_events.append(next(long_lines))
                process.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                refused = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "late"}, timeout=5)
                assert_openai_error(refused, 503)
                assert httpx.get(f"{base}/health", timeout=5).status_code == 503
                events.extend(line for line in lines if line)
                long_events.extend(line for line in long_lines if line)
        # The short stream finished within the drain timeout.
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        # The long one got an error event in OpenAI's shape, then [DONE]: not a cut stream.
        assert long_events[-1] == "data: [DONE]"
        error = json.loads(long_events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "ServiceUnavailableError" and "drain timeout (3s)" in error["message"]
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_drain_timeout_ends_running_requests_with_503_and_frees_their_slots(server_model_dir: str, tools) -> None:
    import uvicorn

    from linrec.engine.async_llm import AsyncLLM
    from linrec.engine.config import EngineConfig
    from linrec.server.app import DrainingServer

    llm = AsyncLLM(EngineConfig(model=server_model_dir, device="cpu", max_num_seqs=4, max_model_len=100_000))
    try:
        app = tools.app_over(llm)
        port = tools.free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
        server = DrainingServer(config, app.state.server, app.state.serving, drain_timeout=0.5)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_until(lambda: server.started, timeout=30)
        v1 = f"http://127.0.0.1:{port}/v1"
        stats = llm.engine.stats
        long = {"model": MODEL, "max_tokens": 50_000, "ignore_eos": True}
        result: dict = {}
        whole = threading.Thread(
            target=lambda: result.update(r=httpx.post(f"{v1}/completions", json={**long, "prompt": "x"}, timeout=60))
        )
        with httpx.Client(timeout=60) as http:
            body = {**long, "messages": CHAT, "stream": True}
            with http.stream("POST", f"{v1}/chat/completions", json=body) as response:
                lines = response.iter_lines()
                events = [next(lines)]
                whole.start()
                wait_until(lambda: stats().num_running == 2, timeout=30)
                server.handle_exit(signal.SIGTERM, None)  # what the SIGTERM handler calls
                events.extend(line for line in lines if line)
        whole.join(60)
        # The stream: chunks, then one error event in OpenAI's shape, then [DONE].
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "ServiceUnavailableError" and "drain timeout (0.5s)" in error["message"]
        assert all("error" not in json.loads(e.removeprefix("data: ")) for e in events[:-2])
        # The non-streaming request: a 503 in OpenAI's shape, not uvicorn's plain-text 500.
        assert "drain timeout" in assert_openai_error(result["r"], 503)["message"]
        # Their engine requests were aborted: both slots are free again.
        wait_until(lambda: stats().num_slots_used == 0 and stats().num_running == 0, timeout=10)
        thread.join(30)
        assert not thread.is_alive()
    finally:
        llm.shutdown()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"prompt": "\xff\xfe"}', "utf-8"),
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "recursion"),
        (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "digits"),
    ],
)
def test_bodies_json_cannot_parse_are_400_saying_why(live_server, content: bytes, reason: str) -> None:
    headers = {"content-type": "application/json"}
    error = assert_openai_error(httpx.post(f"{live_server.v1}/completions", content=content, headers=headers), 400)
    assert error["message"].startswith("expected a JSON body: ") and reason in error["message"].lower(), error


@pytest.mark.parametrize(
    ("headers", "content"),
    [
        ({"content-type": "text/plain"}, b'{"prompt": "x"}'),
        ({}, b'{"prompt": "x"}'),
        ({"content-type": "application/x-www-form-urlencoded"}, b"prompt=x"),
        ({"content-type": "multipart/form-data; boundary=b"}, b"--b--"),
    ],
)
def test_a_body_that_is_not_json_is_400_naming_the_content_type(live_server, headers, content) -> None:
    response = httpx.post(f"{live_server.v1}/completions", content=content, headers=headers)
    error = assert_openai_error(response, 400)
    assert "Content-Type: application/json" in error["message"], error
    assert live_server.client().completions.create(model=MODEL, prompt="ok", max_tokens=2).choices


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": "2"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": "x", "echo": 0}, "echo"),
        ({"prompt": "x", "stream": "true"}, "stream"),
        ({"prompt": [104, "105"]}, "prompt"),
        ({"prompt": [104, True]}, "prompt"),
        ({"prompt": "x", "temperature": "0.5"}, "temperature"),
        ({"prompt": "x", "stop_token_ids": ["1"]}, "stop_token_ids"),
    ],
)
def test_types_are_strict_as_the_document_states(live_server, body: dict, param: str) -> None:
    # pydantic's lax default accepted "2" for an integer and 0 for a boolean, which the document calls invalid.
    error = assert_openai_error(httpx.post(f"{live_server.v1}/completions", json={"model": MODEL, **body}), 400)
    assert error["param"] == param


def test_integral_floats_are_integers_as_json_schema_says(live_server) -> None:
    body = {"model": MODEL, "prompt": [104.0, 105], "max_tokens": 2.0, "n": 1.0, "stop_token_ids": [5.0]}
    response = httpx.post(f"{live_server.v1}/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 2


def test_a_huge_invalid_prompt_is_one_validation_error() -> None:
    from pydantic import ValidationError

    from linrec.server.protocol import MAX_PROMPTS, CompletionRequest

    # Every member of the prompt union used to be tried on every element, each failure collected: seconds of
    # event-loop time for a few megabytes of JSON. Now one form is chosen and its first bad element ends it.
    for prompt in ([1] + ["a"] * 200_000, [[1]] * (MAX_PROMPTS + 1), ["a"] * (MAX_PROMPTS + 1), [[1], *[["b"]] * 1000]):
        with pytest.raises(ValidationError) as info:
            CompletionRequest.model_validate({"prompt": prompt})
        assert info.value.error_count() == 1

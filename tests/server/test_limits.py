"""A production server's limits, each a 4xx in OpenAI's error shape that names the limit, after which the
server keeps serving: request body size, the API key on every route but the probes, per-request list sizes."""

from __future__ import annotations

import httpx
import pytest

from linrec.engine.sampling_params import MAX_LOGPROBS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from linrec.server.app import build_app
from linrec.server.config import ServerConfig
from linrec.server.protocol import MAX_CACHE_SALT_CHARS, MAX_LOGIT_BIAS, MAX_N, MAX_PROMPTS

openai = pytest.importorskip("openai")

MODEL = "demo"
KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    return error


def assert_still_serving(base: str, headers: dict[str, str] | None = None) -> None:
    body = {"model": MODEL, "prompt": "ok", "max_tokens": 2}
    response = httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"]


def test_body_over_the_limit_is_413_before_it_is_parsed(live_server, tools) -> None:
    limit = 2000
    with tools.run_app(tools.app_over(live_server.llm, max_request_body_bytes=limit)) as base:
        url = f"{base}/v1/completions"
        # Declared by Content-Length: refused before a byte is read.
        big = {"model": MODEL, "prompt": "x" * limit, "max_tokens": 1}
        error = assert_openai_error(httpx.post(url, json=big), 413)
        assert error["code"] == "request_too_large" and str(limit) in error["message"]
        assert "--max-request-body-bytes" in error["message"]
        # Not even JSON: the size is checked first.
        assert_openai_error(httpx.post(url, content=b"{" * (limit + 1)), 413)
        # Chunked (no Content-Length): counted as it arrives.
        chunks = [b'{"prompt": "', b"y" * limit, b'", "max_tokens": 1}']
        response = httpx.post(url, content=iter(chunks), headers={"content-type": "application/json"})
        assert "content-length" not in response.request.headers
        assert assert_openai_error(response, 413)["code"] == "request_too_large"
        # A chunked body under the limit reaches the handler whole.
        small = [b'{"model": "demo", ', b'"prompt": "hi", ', b'"max_tokens": 2}']
        response = httpx.post(url, content=iter(small), headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
        # Exactly at the limit passes the size check (and fails later, for its own reason).
        at_limit = b'{"prompt": [' + b" " * (limit - len(b'{"prompt": [1]}')) + b"1]}"
        assert len(at_limit) == limit
        assert httpx.post(url, content=at_limit).status_code != 413
        with pytest.raises(openai.APIStatusError) as info:
            openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0).completions.create(
                model=MODEL, prompt="z" * limit
            )
        assert info.value.status_code == 413
        assert_still_serving(base)
        metrics = httpx.get(f"{base}/metrics").text
        assert 'route="/v1/completions",status="413"' in metrics


def test_every_route_but_the_probes_needs_the_api_key(live_server, tools) -> None:
    with tools.run_app(tools.app_over(live_server.llm, api_key=KEY)) as base:
        for method, path, body in [
            ("POST", "/tokenize", {"prompt": "hi"}),
            ("POST", "/detokenize", {"tokens": [104, 105]}),
            ("GET", "/v1/models", None),
            ("POST", "/v1/completions", {"prompt": "hi"}),
            ("POST", "/v1/chat/completions", {"messages": []}),
            ("GET", "/no/such/route", None),  # no route probing without the key
        ]:
            response = httpx.request(method, f"{base}{path}", json=body)
            assert assert_openai_error(response, 401)["code"] == "invalid_api_key", path
            wrong = httpx.request(method, f"{base}{path}", json=body, headers={"Authorization": "Bearer no"})
            assert_openai_error(wrong, 401)
        assert httpx.post(f"{base}/tokenize", json={"prompt": "hi"}, headers=AUTH).json()["count"] >= 2
        assert httpx.post(f"{base}/detokenize", json={"tokens": [104, 105]}, headers=AUTH).json()["prompt"] == "hi"
        # Probes, the API document and (by default) the metrics stay open.
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.get(f"{base}/version").status_code == 200
        assert httpx.get(f"{base}/openapi.json").json()["openapi"].startswith("3.")
        assert httpx.get(f"{base}/metrics").status_code == 200
        assert_still_serving(base, AUTH)


def test_metrics_behind_the_api_key_when_asked(live_server, tools) -> None:
    app = tools.app_over(live_server.llm, api_key=KEY, metrics_require_api_key=True)
    with tools.run_app(app) as base:
        assert_openai_error(httpx.get(f"{base}/metrics"), 401)
        assert_openai_error(httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer no"}), 401)
        assert httpx.get(f"{base}/metrics", headers=AUTH).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200
        assert_still_serving(base, AUTH)


def test_server_config_refuses_bad_limits(live_server, monkeypatch: pytest.MonkeyPatch) -> None:
    for value in (0, -1, 1.5, True, "16MiB"):
        with pytest.raises(ValueError, match="max_request_body_bytes"):
            ServerConfig(max_request_body_bytes=value)
    # A protected /metrics without any key would be a silent no-op: refused at startup instead.
    monkeypatch.delenv("LINREC_API_KEY", raising=False)
    with pytest.raises(ValueError, match="metrics_require_api_key needs an API key"):
        build_app(live_server.llm, ServerConfig(metrics_require_api_key=True), MODEL)


@pytest.mark.parametrize(
    ("route", "fields", "param", "limit"),
    [
        ("completions", {"stop": ["s"] * (MAX_STOP_STRINGS + 1)}, "stop", MAX_STOP_STRINGS),
        ("completions", {"stop": "s" * (MAX_STOP_STRING_CHARS + 1)}, "stop", MAX_STOP_STRING_CHARS),
        ("chat/completions", {"stop": ["s", "s" * (MAX_STOP_STRING_CHARS + 1)]}, "stop", MAX_STOP_STRING_CHARS),
        ("completions", {"stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)}, "stop_token_ids", MAX_STOP_TOKEN_IDS),
        ("completions", {"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias", MAX_LOGIT_BIAS),
        ("chat/completions", {"n": MAX_N + 1}, "n", MAX_N),
        ("completions", {"logprobs": MAX_LOGPROBS + 1}, "logprobs", MAX_LOGPROBS),
        ("chat/completions", {"logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, "top_logprobs", MAX_LOGPROBS),
        ("completions", {"cache_salt": "s" * (MAX_CACHE_SALT_CHARS + 1)}, "cache_salt", MAX_CACHE_SALT_CHARS),
        ("completions", {"prompt": [[104]] * (MAX_PROMPTS + 1)}, "prompt", MAX_PROMPTS),
        ("completions", {"prompt": ["hi"] * (MAX_PROMPTS + 1)}, "prompt", MAX_PROMPTS),
    ],
)
def test_per_request_lists_over_their_limit_are_400_naming_it(live_server, route, fields, param, limit) -> None:
    prompt = {"prompt": "x"} if route == "completions" else {"messages": [{"role": "user", "content": "x"}]}
    body = {"model": MODEL, **prompt, "max_tokens": 2, **fields}  # `fields` may replace the prompt
    error = assert_openai_error(httpx.post(f"{live_server.v1}/{route}", json=body), 400)
    assert error["param"] == param and str(limit) in error["message"], error
    assert_still_serving(live_server.base_url)


def test_per_request_lists_at_their_limit_are_served(live_server) -> None:
    client = live_server.client()
    out = client.completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=2,
        logprobs=MAX_LOGPROBS,
        stop=[f"{i:04d}" * (MAX_STOP_STRING_CHARS // 4) for i in range(MAX_STOP_STRINGS)],
        logit_bias={str(i): 0.5 for i in range(min(MAX_LOGIT_BIAS, live_server.llm.engine.vocab_size))},
        extra_body={"stop_token_ids": [7] * MAX_STOP_TOKEN_IDS, "cache_salt": "s" * MAX_CACHE_SALT_CHARS},
    )
    assert out.choices[0].finish_reason and len(out.choices[0].logprobs.top_logprobs[0]) >= 1

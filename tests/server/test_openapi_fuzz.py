"""The server's own OpenAPI document, and a bounded schemathesis pass over it against a live server: no input
yields a 5xx, and every answer conforms to the document (status, content type, body schema).

Positive and negative cases for every operation; max_model_len 96 on the tiny demo model keeps generations
short. `positive_data_acceptance` is not checked: schema-valid requests may still be refused for reasons the
schema cannot state (n above the engine's slot count, a role the chat template refuses, a prompt over
max_model_len). A longer pass by hand: `st run http://HOST:PORT/openapi.json --checks all` (see
docs/server-limits.md).
"""

from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402 -- schemathesis brings hypothesis
from schemathesis import checks as st_checks  # noqa: E402

from linrec.engine.sampling_params import MAX_LOGPROBS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS  # noqa: E402
from linrec.server.protocol import MAX_LOGIT_BIAS, MAX_N  # noqa: E402

CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
    st_checks.negative_data_rejection,
]


@pytest.fixture(scope="module")
def fuzzed_server(live_server, tools):
    """Its own app (fresh metrics) over the shared engine, so the fuzz traffic counts nowhere else."""
    with tools.run_app(tools.app_over(live_server.llm)) as base_url:
        yield base_url


OPERATIONS = [
    "GET /health",
    "HEAD /health",
    "GET /version",
    "GET /metrics",
    "GET /v1/models",
    "POST /v1/completions",
    "POST /v1/chat/completions",
    "POST /tokenize",
    "POST /detokenize",
    "POST /v1/load_lora_adapter",
    "POST /v1/unload_lora_adapter",
    "POST /v1/responses",
    "GET /v1/responses/{response_id}",
    "DELETE /v1/responses/{response_id}",
    "POST /v1/responses/{response_id}/fork",
    "GET /v1/states/{state_id}",
    "POST /v1/states",
]


# Hypothesis drives schemathesis' strategies directly: its pytest plugin (`from_fixture`) reads a private
# attribute that pytest 9 no longer has.
@pytest.mark.parametrize(
    ("label", "mode"),
    # Only POST routes take a body to make invalid (the others take at most an id and a tenant).
    [(label, "positive") for label in OPERATIONS] + [(label, "negative") for label in OPERATIONS if "POST" in label],
)
def test_no_input_yields_a_5xx_and_answers_match_the_document(fuzzed_server, label: str, mode: str) -> None:
    from hypothesis import given

    api = schemathesis.openapi.from_url(f"{fuzzed_server}/openapi.json")
    operation = api[label.split()[1]][label.split()[0]]
    documented = {f"{o.ok().method.upper()} {o.ok().path}" for o in api.get_all_operations()}
    assert documented == set(OPERATIONS), "a route was added or removed: list it here"

    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    @settings(
        max_examples=12 if label.startswith("POST") else 3,
        deadline=None,
        derandomize=True,  # the same cases every run: CI fails on a change, not on luck
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def fuzz(case) -> None:
        case.call_and_validate(checks=CHECKS, timeout=60)

    fuzz()


def test_the_document_states_the_limits_and_this_servers_model(fuzzed_server) -> None:
    doc = httpx.get(f"{fuzzed_server}/openapi.json").json()
    schemas = doc["components"]["schemas"]
    sampling = schemas["CompletionRequest"]["properties"]

    def bound(prop: dict, key: str) -> int:
        return next(member[key] for member in prop["anyOf"] if key in member)

    stop_list = next(member for member in sampling["stop"]["anyOf"] if member.get("type") == "array")
    assert stop_list["maxItems"] == MAX_STOP_STRINGS
    assert bound(sampling["stop_token_ids"], "maxItems") == MAX_STOP_TOKEN_IDS
    assert bound(sampling["logit_bias"], "maxProperties") == MAX_LOGIT_BIAS
    assert bound(sampling["logprobs"], "maximum") == MAX_LOGPROBS and sampling["n"]["maximum"] == MAX_N
    assert sampling["model"]["anyOf"][0] == {"const": "demo"}
    # Validation errors are 400 in OpenAI's shape; FastAPI's 422 is not documented.
    completions = doc["paths"]["/v1/completions"]["post"]["responses"]
    assert "422" not in completions and "HTTPValidationError" not in schemas
    assert completions["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "text/event-stream" in completions["200"]["content"]

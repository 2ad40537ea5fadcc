"""Per-request LoRA over HTTP: adapters from --lora-modules and /v1/load_lora_adapter answer as their merged
models do (official `openai` client), come and go at runtime under traffic without a lost request, sit
behind the API key, show in /metrics, and the serve flags parse with one-line errors.

One tiny Llama (linearized to liger-gla) and random PEFT adapters built here; the references are engines
with the adapter merged at load (EngineConfig.merge_lora), served the same way.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

import linrec_client as lc
from linrec import cli
from linrec.engine.async_llm import AsyncLLM
from linrec.engine.config import EngineConfig
from linrec.models.demo import demo_llama_config
from linrec.models.tokenizer import write_byte_tokenizer
from linrec.server.app import DrainingServer
from linrec.server.config import parse_lora_module

openai = pytest.importorskip("openai")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

MODEL = "demo"  # the served name (tests/server/conftest.app_over)
PROMPTS = ["Hello there", "The cat sat"]
CHAT = [{"role": "user", "content": "Say hi"}]
MAX_TOKENS = 6
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS, "extra_body": {"ignore_eos": True}}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTERS = {  # name -> peft LoraConfig kwargs; a1 and a2 differ in rank and targets from a0
    "a0": dict(r=8, lora_alpha=16, target_modules=[*ATTENTION, "gate_proj", "up_proj", "down_proj"]),
    "a1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True),
    "a2": dict(r=8, lora_alpha=8, target_modules=["v_proj", "o_proj", "up_proj"]),
    # not servable per request: rank above max_lora_rank, and a full-tensor replacement
    "too_big": dict(r=16, lora_alpha=16, target_modules=["q_proj"]),
    "saves_lm_head": dict(r=4, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
}
ENGINE = {
    "linearize": "liger-gla",
    "device": "cpu",
    "dtype": "float32",
    "max_num_seqs": 8,
    "max_num_batched_tokens": 256,
    "max_model_len": 256,
}
LORA_ENGINE = {**ENGINE, "enable_lora": True, "max_loras": 2, "max_lora_rank": 8}


def _llama_config():
    return transformers.LlamaConfig(**demo_llama_config())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """{"base": a tiny Llama with the byte tokenizer, adapter name: a PEFT adapter directory with B != 0}."""
    root = tmp_path_factory.mktemp("lora-api")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_llama_config()).save_pretrained(str(root / "base"), safe_serialization=True)
    write_byte_tokenizer(root / "base")
    out = {"base": str(root / "base")}
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed + 1)
        model = peft.get_peft_model(transformers.LlamaForCausalLM(_llama_config()), peft.LoraConfig(**config))
        with torch.no_grad():  # peft zero-inits lora_B: make the adapter change the output
            for param_name, param in model.named_parameters():
                if "lora_" in param_name:
                    param.normal_(std=0.5)
        model.save_pretrained(str(root / name))
        out[name] = str(root / name)
    return out


@dataclass
class Server:
    base_url: str
    app: FastAPI
    llm: AsyncLLM
    api_key: str | None = None

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def client(self):
        return openai.OpenAI(base_url=self.v1, api_key=self.api_key or "unused", max_retries=0, timeout=60)

    def post(self, route: str, body: dict, **kwargs) -> httpx.Response:
        return httpx.post(self.v1 + route, json=body, timeout=60, **kwargs)


@contextlib.contextmanager
def served(tools, engine: dict, api_key: str | None = None, **server_config) -> Iterator[Server]:
    llm = AsyncLLM(EngineConfig(**engine))
    try:
        app = tools.app_over(llm, api_key, **server_config)
        with tools.run_app(app) as base_url:
            yield Server(base_url, app, llm, api_key)
    finally:
        llm.shutdown()


def answers(client, model: str) -> tuple[list[str], str]:
    """Greedy completion texts for PROMPTS and the chat answer to CHAT, from `model`."""
    texts = [client.completions.create(model=model, prompt=p, **GREEDY).choices[0].text for p in PROMPTS]
    chat = client.chat.completions.create(model=model, messages=CHAT, **GREEDY).choices[0].message.content
    return texts, chat


@pytest.fixture(scope="module")
def references(dirs, tools) -> dict[str, tuple[list[str], str]]:
    """What the base model and each servable adapter answer, from engines with the adapter merged at load."""
    out = {}
    for name in ("base", "a0", "a1", "a2"):
        merge = None if name == "base" else dirs[name]
        with served(tools, {**ENGINE, "model": dirs["base"], "merge_lora": merge}) as server:
            out[name] = answers(server.client(), MODEL)
    assert len({str(v) for v in out.values()}) == 4, "every adapter must change the answers, or the test proves nothing"
    return out


@pytest.fixture(scope="module")
def lora_server(dirs, tools) -> Iterator[Server]:
    """--enable-lora --max-loras 2 --max-lora-rank 8 --lora-modules a0=DIR a1=DIR; a test that loads more
    adapters unloads them before it ends."""
    modules = (("a0", dirs["a0"]), ("a1", dirs["a1"]))
    with served(tools, {**LORA_ENGINE, "model": dirs["base"]}, lora_modules=modules) as server:
        yield server


def one_line_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert "\n" not in message and "Traceback" not in message, message
    return message


# -- OpenAI's routes -----------------------------------------------------------------------------------


def test_models_list_the_base_and_each_adapter_with_its_parent(lora_server, dirs) -> None:
    cards = lora_server.client().models.list().data
    assert [(m.id, getattr(m, "parent", None)) for m in cards] == [(MODEL, None), ("a0", MODEL), ("a1", MODEL)]
    assert [getattr(m, "root", None) for m in cards] == [dirs["base"], dirs["a0"], dirs["a1"]]
    with lc.Client(lora_server.base_url, max_retries=0) as client:  # the SDK's card carries parent too
        assert [(m.id, m.parent) for m in client.models().data] == [(MODEL, None), ("a0", MODEL), ("a1", MODEL)]


def test_each_model_answers_as_its_merged_engine_and_names_itself(lora_server, references) -> None:
    client = lora_server.client()
    for name in ("a0", "a1"):
        assert answers(client, name) == references[name], name
    assert answers(client, MODEL) == references["base"]
    # A request without a model runs on the base model.
    body = {"prompt": PROMPTS[0], "temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    assert lora_server.post("/completions", body).json()["choices"][0]["text"] == references["base"][0][0]
    # Each response names the model that answered, as vLLM's do (it named the base model, whatever ran).
    assert client.completions.create(model="a0", prompt=PROMPTS[0], **GREEDY).model == "a0"
    assert client.chat.completions.create(model="a1", messages=CHAT, **GREEDY).model == "a1"
    stream = client.chat.completions.create(model="a0", messages=CHAT, stream=True, **GREEDY)
    assert {chunk.model for chunk in stream} == {"a0"}
    assert client.completions.create(model=MODEL, prompt=PROMPTS[0], **GREEDY).model == MODEL


def test_an_unknown_model_is_model_not_found(lora_server) -> None:
    client = lora_server.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="a9", prompt="x", max_tokens=1)
    assert info.value.code == "model_not_found" and "a9" in info.value.message
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="a9", messages=CHAT, max_tokens=1)
    assert info.value.code == "model_not_found"


# -- loading and unloading at runtime ------------------------------------------------------------------


def test_load_use_and_unload_an_adapter_at_runtime(lora_server, dirs, references) -> None:
    client = lora_server.client()
    load = {"lora_name": "a2", "lora_path": dirs["a2"]}
    response = lora_server.post("/load_lora_adapter", load)
    assert (response.status_code, response.text) == (200, "Success: LoRA adapter 'a2' added successfully.")
    try:
        assert [m.id for m in client.models.list().data] == [MODEL, "a0", "a1", "a2"]
        assert answers(client, "a2") == references["a2"]
        assert "already been loaded" in one_line_error(lora_server.post("/load_lora_adapter", load), 400)
        assert one_line_error(
            lora_server.post("/load_lora_adapter", {"lora_name": MODEL, "lora_path": dirs["a2"]}), 400
        )
    finally:
        response = lora_server.post("/unload_lora_adapter", {"lora_name": "a2"})
    assert (response.status_code, response.text) == (200, "Success: LoRA adapter 'a2' removed successfully.")
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="a2", prompt="x", max_tokens=1)
    assert info.value.code == "model_not_found"
    assert "cannot be found" in one_line_error(lora_server.post("/unload_lora_adapter", {"lora_name": "a2"}), 404)
    assert [m.id for m in client.models.list().data] == [MODEL, "a0", "a1"]

    # The SDK's methods against the real routes: the server's text back, its 4xx as typed exceptions.
    with lc.Client(lora_server.base_url, max_retries=0) as sdk:
        assert sdk.load_lora_adapter("a2", dirs["a2"]) == "Success: LoRA adapter 'a2' added successfully."
        with pytest.raises(lc.BadRequestError, match="already been loaded"):
            sdk.load_lora_adapter("a2", dirs["a2"])
        assert sdk.completions(PROMPTS[0], model="a2", **GREEDY).choices[0].text == references["a2"][0][0]
        assert sdk.unload_lora_adapter("a2") == "Success: LoRA adapter 'a2' removed successfully."
        with pytest.raises(lc.NotFoundError, match="cannot be found"):
            sdk.unload_lora_adapter("a2")


def test_a_bad_adapter_directory_is_a_one_line_400_and_the_server_goes_on(lora_server, dirs, tmp_path) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "adapter_config.json").write_text("{not json")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text(Path(dirs["a0"], "adapter_config.json").read_text())
    bad = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "a_file"): "not a directory",
        dirs["base"]: "adapter_config.json",  # a model, not an adapter
        str(tmp_path / "bad_json"): "invalid JSON",
        str(no_weights): "adapter_model.safetensors",
        dirs["too_big"]: "max_lora_rank=8",
        dirs["saves_lm_head"]: "full tensors",
    }
    for path, expected in bad.items():
        response = lora_server.post("/load_lora_adapter", {"lora_name": "bad", "lora_path": path})
        assert expected in one_line_error(response, 400), path
    assert one_line_error(lora_server.post("/load_lora_adapter", {"lora_name": "bad"}), 400)  # no lora_path
    assert [m.id for m in lora_server.client().models.list().data] == [MODEL, "a0", "a1"]
    assert lora_server.client().completions.create(model="a0", prompt="x", max_tokens=2).usage.completion_tokens


def test_a_corrupt_adapter_weights_file_is_a_400(lora_server, dirs, tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text(Path(dirs["a0"], "adapter_config.json").read_text())
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors" * 4)
    response = lora_server.post("/load_lora_adapter", {"lora_name": "bad", "lora_path": str(tmp_path)})
    if response.status_code != 400:
        # No traceback: CPython 3.11's traceback module parses source with `ast`, and the server thread may still
        # be logging the 500's traceback; two threads in `ast` at once crash pytest (AST recursion depth mismatch).
        pytest.fail(f"expected a one-line 400, got {response.status_code}: {response.text}", pytrace=False)
    assert "adapter_model.safetensors" in one_line_error(response, 400)


def test_an_adapter_unloaded_after_the_model_check_is_a_404_not_a_500(lora_server, dirs, monkeypatch) -> None:
    """The window between the handler's model check and the engine taking the request, made certain: the
    engine's AdapterNotFoundError (a KeyError) must come back as 404 model_not_found, as vLLM answers."""
    serving = lora_server.app.state.serving
    check_model = serving.check_model

    def check_then_unload(model: str | None) -> str | None:
        name = check_model(model)
        if name is not None:
            lora_server.llm.unload_lora_adapter(name)
        return name

    monkeypatch.setattr(serving, "check_model", check_then_unload)
    for stream in (False, True):  # a stream too: it fails before its 200 starts
        load = {"lora_name": "a2", "lora_path": dirs["a2"]}
        assert lora_server.post("/load_lora_adapter", load).status_code == 200
        response = lora_server.post("/completions", {"model": "a2", "prompt": "x", "max_tokens": 2, "stream": stream})
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "model_not_found"
        assert "a2" not in lora_server.llm.engine.adapters


def test_load_unload_and_reload_under_concurrent_traffic(lora_server, dirs) -> None:
    """Four clients send base, a0, a1 and a2 requests (some streamed) while a2 is unloaded and loaded again; with
    max_loras=2 the three adapters also take each other's slots. Every request ends in a whole 200 answer equal
    to that model's answer alone, or, for a2 while it is unloaded, in a 404 model_not_found. Never a 500 or a
    hang, and nothing stays pinned."""
    mix = [MODEL, "a2", "a0", "a2", "a1"]
    greedy = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    assert lora_server.post("/load_lora_adapter", {"lora_name": "a2", "lora_path": dirs["a2"]}).status_code == 200
    alone = {
        (model, prompt): lora_server.post("/completions", {"model": model, "prompt": prompt, **greedy}).json()
        for model in mix
        for prompt in PROMPTS
    }

    results: list[tuple[str, str, int, dict]] = []  # model, prompt, status, body (a stream's folded into one)
    failures: list[BaseException] = []
    done = threading.Event()
    cycles = [0]

    def client_loop(worker: int) -> None:
        with httpx.Client(base_url=lora_server.v1, timeout=60) as http:
            for i in range(10):
                model, prompt = mix[(worker + i) % len(mix)], PROMPTS[(worker + i // 5) % len(PROMPTS)]
                body = {"model": model, "prompt": prompt, **greedy}
                if i % 3 != 2:
                    response = http.post("/completions", json=body)
                    results.append((model, prompt, response.status_code, response.json()))
                    continue
                # A stream: an unload must not cut one that began.
                with http.stream("POST", "/completions", json={**body, "stream": True}) as response:
                    if response.status_code != 200:
                        results.append((model, prompt, response.status_code, json.loads(response.read())))
                        continue
                    events = [
                        line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")
                    ]
                assert events[-1] == "[DONE]", events
                choices = [c for e in events[:-1] for c in json.loads(e)["choices"]]
                folded = {"text": "".join(c["text"] for c in choices), "finish_reason": choices[-1]["finish_reason"]}
                results.append((model, prompt, 200, {"choices": [folded], "usage": {"completion_tokens": 4}}))

    def churn_loop() -> None:
        with httpx.Client(base_url=lora_server.v1, timeout=60) as http:
            while not done.is_set() or cycles[0] < 3:
                response = http.post("/unload_lora_adapter", json={"lora_name": "a2"})
                assert response.status_code == 200, response.text
                time.sleep(0.005)  # a2 is mostly served: most a2 requests run, some meet the gap
                response = http.post("/load_lora_adapter", json={"lora_name": "a2", "lora_path": dirs["a2"]})
                assert response.status_code == 200, response.text
                cycles[0] += 1
                time.sleep(0.05)

    def reporting(target, *args) -> threading.Thread:
        def run() -> None:
            try:
                target(*args)
            except BaseException as exc:  # the main thread reports it
                failures.append(exc)

        return threading.Thread(target=run, daemon=True)

    clients = [reporting(client_loop, worker) for worker in range(4)]
    churn = reporting(churn_loop)
    try:
        churn.start()
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 90
        for thread in clients:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in clients), "a request hung"
    finally:
        done.set()
        churn.join(30)
        lora_server.post("/unload_lora_adapter", {"lora_name": "a2"})
    assert not failures, failures
    assert not churn.is_alive() and cycles[0] >= 3, cycles

    assert len(results) == 4 * 10
    assert {status for *_, status, _ in results} <= {200, 404}, [r for r in results if r[2] not in (200, 404)]
    for model, prompt, status, body in results:
        if status == 404:
            assert model == "a2" and body["error"]["code"] == "model_not_found", body
            continue
        (choice,) = body["choices"]
        assert (choice["finish_reason"], body["usage"]["completion_tokens"]) == ("length", 4), body
        assert choice["text"] == alone[model, prompt]["choices"][0]["text"], (model, prompt, body)
    assert any(model == "a2" and status == 200 for model, _, status, _ in results)
    info = lora_requests_info(lora_server.base_url)
    assert (info["running_lora_adapters"], info["waiting_lora_adapters"]) == ("", "")


# -- the API key, metrics, a server without LoRA --------------------------------------------------------


def test_load_and_unload_need_the_api_key(lora_server, dirs, tools) -> None:
    with tools.run_app(tools.app_over(lora_server.llm, api_key="sk-lora")) as base_url:
        load = {"lora_name": "a2", "lora_path": dirs["a2"]}
        for route, body in (("load_lora_adapter", load), ("unload_lora_adapter", {"lora_name": "a0"})):
            assert httpx.post(f"{base_url}/v1/{route}", json=body).status_code == 401
            wrong = {"Authorization": "Bearer nope"}
            assert httpx.post(f"{base_url}/v1/{route}", json=body, headers=wrong).status_code == 401
        assert "a2" not in lora_server.llm.engine.adapters and "a0" in lora_server.llm.engine.adapters
        key = {"Authorization": "Bearer sk-lora"}
        assert httpx.post(f"{base_url}/v1/load_lora_adapter", json=load, headers=key).status_code == 200
        assert (
            httpx.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": "a2"}, headers=key).status_code == 200
        )


def lora_requests_info(base_url: str) -> dict[str, str]:
    """The labels of linrec:lora_requests_info, read by prometheus-client's parser."""
    response = httpx.get(f"{base_url}/metrics")
    assert response.status_code == 200
    samples = [
        s
        for f in text_string_to_metric_families(response.text)
        for s in f.samples
        if s.name == "linrec:lora_requests_info"
    ]
    assert len(samples) == 1, samples
    assert samples[0].value > 1e9  # the snapshot's time, as vLLM's gauge carries it
    return samples[0].labels


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_metrics_show_the_adapter_slots_and_the_adapters_in_use(lora_server, monkeypatch) -> None:
    """The engine steps only when the test lets it, so the scrape sees the request waiting, then running."""
    engine = lora_server.llm.engine
    assert lora_requests_info(lora_server.base_url) == {
        "max_lora": "2",
        "running_lora_adapters": "",
        "waiting_lora_adapters": "",
    }
    step, permits, is_open, num_steps = engine.step, threading.Semaphore(0), threading.Event(), [0]

    def gated_step():
        num_steps[0] += 1
        if not is_open.is_set():
            assert permits.acquire(timeout=30), "the test never let the engine step"
        return step()

    monkeypatch.setattr(engine, "step", gated_step)
    responses: list[httpx.Response] = []
    body = {"model": "a1", "prompt": "x", "max_tokens": 3}
    request = threading.Thread(target=lambda: responses.append(lora_server.post("/completions", body)), daemon=True)
    try:
        request.start()
        wait_until(lambda: num_steps[0] == 1)  # queued; its first step held
        info = lora_requests_info(lora_server.base_url)
        assert (info["running_lora_adapters"], info["waiting_lora_adapters"]) == ("", "a1")
        permits.release()
        wait_until(lambda: num_steps[0] == 2)  # admitted, holding a slot; the next step held
        info = lora_requests_info(lora_server.base_url)
        assert (info["running_lora_adapters"], info["waiting_lora_adapters"]) == ("a1", "")
    finally:
        is_open.set()
        permits.release()
        request.join(30)
    assert responses[0].status_code == 200 and responses[0].json()["model"] == "a1"
    info = lora_requests_info(lora_server.base_url)
    assert (info["running_lora_adapters"], info["waiting_lora_adapters"]) == ("", "")


def test_a_server_without_lora_refuses_loads(dirs, tools) -> None:
    with served(tools, {**ENGINE, "model": dirs["base"]}) as server:
        message = one_line_error(server.post("/load_lora_adapter", {"lora_name": "a0", "lora_path": dirs["a0"]}), 400)
        assert "--enable-lora" in message
        assert server.post("/unload_lora_adapter", {"lora_name": "a0"}).status_code == 404
        with pytest.raises(openai.NotFoundError):
            server.client().completions.create(model="a0", prompt="x", max_tokens=1)
        assert "linrec:lora_requests_info" not in httpx.get(f"{server.base_url}/metrics").text


# -- the command line ----------------------------------------------------------------------------------


def test_serve_help_lists_the_lora_flags(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--enable-lora", "--lora-modules", "--max-loras", "--max-lora-rank", "--max-cpu-loras"):
        assert flag in text, flag


def test_parse_lora_module() -> None:
    assert parse_lora_module("sql=/adapters/sql") == ("sql", "/adapters/sql")
    assert parse_lora_module("a=b=c") == ("a", "b=c")  # the first '=' splits
    assert parse_lora_module('{"name": "sql", "path": "/adapters/sql"}') == ("sql", "/adapters/sql")
    for bad, expected in (
        ("x", "NAME=DIR, got"),
        ("=dir", "both parts non-empty"),
        ("name=", "both parts non-empty"),
        ('{"name": "sql"}', '{"name": ..., "path": ...}'),
        ("{not json", '{"name": ..., "path": ...}'),
    ):
        with pytest.raises(ValueError) as info:
            parse_lora_module(bad)
        message = str(info.value)
        assert "\n" not in message and expected in message and message.endswith(f"got {bad!r}"), message


def test_bad_lora_flags_are_one_line_errors(dirs, tools, capsys, monkeypatch) -> None:
    def never(self) -> None:
        raise AssertionError("the server started despite a bad flag")

    monkeypatch.setattr(DrainingServer, "run", never)  # a missed refusal fails here instead of serving forever
    port = str(tools.free_port())
    common = ["serve", dirs["base"], "--linearize", "liger-gla", "--device", "cpu", "--port", port]
    with pytest.raises(SystemExit) as info:  # argparse: exit 2 with a usage line
        cli.main([*common, "--enable-lora", "--lora-modules", "x"])
    assert info.value.code == 2
    assert "argument --lora-modules: expected a LoRA module as NAME=DIR, got 'x'" in capsys.readouterr().err

    for flags, expected in (
        (["--lora-modules", f"a0={dirs['a0']}"], "--lora-modules needs --enable-lora"),
        (["--enable-lora", "--lora-modules", f"a0={dirs['a0']}", f"a0={dirs['a1']}"], "distinct LoRA module names"),
        (["--enable-lora", "--lora-modules", f"{MODEL}={dirs['a0']}", "--served-model-name", MODEL], "other than"),
        (["--enable-lora", "--max-lora-rank", "4", "--lora-modules", f"a0={dirs['a0']}"], "max_lora_rank=4"),
    ):
        assert cli.main([*common, *flags]) == 1, flags
        err = capsys.readouterr().err
        lines = [line for line in err.strip().splitlines() if line.startswith("linrec:")]
        assert "Traceback" not in err and len(lines) == 1 and expected in lines[0], err

    def no_engine(*args, **kwargs):
        raise AssertionError("the model was loaded before --lora-modules without --enable-lora was refused")

    monkeypatch.setattr("linrec.server.app.AsyncLLM", no_engine)  # refused before minutes of model loading
    assert cli.main([*common, "--lora-modules", f"a0={dirs['a0']}"]) == 1
    assert "--lora-modules needs --enable-lora" in capsys.readouterr().err

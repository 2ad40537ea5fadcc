"""The Responses API and the state API over HTTP, through the official `openai` client: a continuation equals one
plain request over the whole conversation's tokens, the stream's events in OpenAI's order and shapes, what is
stored and who may see it (store=false, DELETE, another tenant, another model), export -> import and fork, a bad
import refused in one line beside a request that does not notice, a stored response surviving a restart, and
linrec_client's methods against the same server."""

from __future__ import annotations

import json

import httpx
import pytest
from safetensors.torch import load as load_safetensors

import linrec_client as lc
from linrec.engine.async_llm import AsyncLLM
from linrec.engine.config import EngineConfig

openai = pytest.importorskip("openai")

MODEL = "demo"
GREEDY = {"model": MODEL, "temperature": 0, "max_output_tokens": 4, "extra_body": {"ignore_eos": True}}
PLACEHOLDER = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]


def stored_tokens(server, response_id: str, cache_salt: str | None = None) -> list[int]:
    """Every token of a stored conversation, from its export (the safetensors' `token_ids`)."""
    params = {"cache_salt": cache_salt} if cache_salt is not None else None
    answer = httpx.get(f"{server.v1}/states/{response_id}", params=params, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/octet-stream"
    return load_safetensors(answer.content)["token_ids"].tolist()


def tokenize(server, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    body = {"messages": messages, "add_generation_prompt": add_generation_prompt}
    return httpx.post(server.base_url + "/tokenize", json=body, timeout=30).json()["tokens"]


def segment(server, messages: list[dict]) -> list[int]:
    """The tokens a continuation adds: the messages rendered after an assistant turn (docs/responses.md)."""
    head = tokenize(server, PLACEHOLDER, False)
    whole = tokenize(server, PLACEHOLDER + messages, True)
    assert whole[: len(head)] == head
    return whole[len(head) :]


def complete(server, prompt: list[int], max_tokens: int = 4) -> str:
    out = server.client().completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    return out.choices[0].text


def not_found(call) -> openai.NotFoundError:
    with pytest.raises(openai.NotFoundError) as info:
        call()
    assert info.value.body["code"] == "state_not_found"
    return info.value


def test_a_continuation_equals_one_request_over_the_whole_conversation(live_server) -> None:
    client = live_server.client()
    first = client.responses.create(input="Hi", instructions="Be brief.", **GREEDY)
    assert first.id.startswith("resp_") and len(first.id) == 5 + 32
    assert first.object == "response" and first.status == "incomplete" and first.model == MODEL
    assert first.incomplete_details.reason == "max_output_tokens" and first.output[0].status == "incomplete"
    prompt = tokenize(
        live_server, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True
    )
    assert first.usage.input_tokens == len(prompt) and first.usage.output_tokens == 4
    assert first.usage.total_tokens == len(prompt) + 4
    conversation = stored_tokens(live_server, first.id)
    assert conversation[: len(prompt)] == prompt and len(conversation) == len(prompt) + 4
    assert first.output_text == complete(live_server, prompt)

    # Turn 2: a list of messages with input_text parts; only the new segment is prefilled.
    new = [{"role": "user", "content": [{"type": "input_text", "text": "And"}, {"type": "input_text", "text": " so?"}]}]
    second = client.responses.create(input=new, previous_response_id=first.id, **GREEDY)
    added = segment(live_server, [{"role": "user", "content": "And so?"}])
    whole = conversation + added
    assert second.previous_response_id == first.id
    assert second.output_text == complete(live_server, whole)
    assert second.usage.input_tokens == len(whole)
    assert second.usage.input_tokens_details.cached_tokens >= len(conversation) - 1  # only the last was not fed
    assert stored_tokens(live_server, second.id)[: len(whole)] == whole

    # The earlier response is still there: a second branch from it with the same input answers the same.
    again = client.responses.create(input=new, previous_response_id=first.id, **GREEDY)
    assert again.id != second.id and again.output_text == second.output_text
    # Instructions on a continuation: a system message at the front of the segment (not carried over).
    steered = client.responses.create(input="ok", instructions="Sys", previous_response_id=first.id, **GREEDY)
    added = segment(live_server, [{"role": "system", "content": "Sys"}, {"role": "user", "content": "ok"}])
    assert steered.output_text == complete(live_server, conversation + added)
    assert steered.usage.input_tokens == len(conversation + added)

    # GET returns the stored record: the same response object, usage and output included.
    got = client.responses.retrieve(second.id)
    assert got.model_dump() == second.model_dump()


def test_stream_events_in_openai_order_and_shapes(live_server) -> None:
    from openai.types.responses import (
        ResponseCompletedEvent,
        ResponseCreatedEvent,
        ResponseIncompleteEvent,
        ResponseTextDeltaEvent,
    )

    client = live_server.client()
    events = list(client.responses.create(input="Tell me", stream=True, metadata={"k": "v"}, **GREEDY))
    kinds = [e.type for e in events]
    deltas = [e for e in events if isinstance(e, ResponseTextDeltaEvent)]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, done = events[0], events[-1]
    assert isinstance(created, ResponseCreatedEvent) and isinstance(done, ResponseIncompleteEvent)
    assert created.response.status == "in_progress" and created.response.output == []
    assert created.response.id == done.response.id and created.response.metadata == {"k": "v"}
    text = "".join(d.delta for d in deltas)
    assert events[-4].text == text and events[-3].part.text == text and events[-2].item.content[0].text == text
    assert {(d.item_id, d.output_index, d.content_index) for d in deltas} <= {(events[2].item.id, 0, 0)}
    assert done.response.output_text == text and done.response.usage.output_tokens == 4
    assert client.responses.retrieve(done.response.id).model_dump() == done.response.model_dump()
    # The same non-streamed, and a stream that ends by itself (EOS or a stop string) completes.
    assert client.responses.create(input="Tell me", **GREEDY).output_text == text
    events = list(
        client.responses.create(
            input="Tell me", stream=True, model=MODEL, temperature=0, max_output_tokens=8, extra_body={"stop": text[:1]}
        )
    )
    assert isinstance(events[-1], ResponseCompletedEvent) and events[-1].response.status == "completed"
    assert events[-1].response.incomplete_details is None
    # On the wire: `event: <type>` before each `data:` line, and no [DONE].
    body = {"input": "x", "stream": True, "max_output_tokens": 2}
    with httpx.stream("POST", live_server.v1 + "/responses", json=body, timeout=30) as answer:
        lines = [line for line in answer.iter_lines() if line]
    assert lines[0] == "event: response.created" and lines[1].startswith("data: {")
    assert lines[-2] == "event: response.incomplete" and "[DONE]" not in lines[-1]


def test_what_is_stored_and_who_may_see_it(live_server) -> None:
    client = live_server.client()
    unstored = client.responses.create(input="Hi", store=False, **GREEDY)
    assert unstored.store is False
    not_found(lambda: client.responses.retrieve(unstored.id))
    error = not_found(lambda: client.responses.create(input="Go", previous_response_id=unstored.id, **GREEDY))
    assert error.body["param"] == "previous_response_id"
    not_found(lambda: client.responses.retrieve("resp_" + "0" * 32))

    # Another tenant (cache_salt) sees nothing: GET, continue, fork, export, delete.
    salted = {**GREEDY, "extra_body": {"ignore_eos": True, "cache_salt": "tenant-a"}}
    mine = client.responses.create(input="Hi", **salted)
    not_found(lambda: client.responses.retrieve(mine.id))
    not_found(lambda: client.responses.retrieve(mine.id, extra_query={"cache_salt": "tenant-b"}))
    assert client.responses.retrieve(mine.id, extra_query={"cache_salt": "tenant-a"}).id == mine.id
    other = {**GREEDY, "extra_body": {"ignore_eos": True, "cache_salt": "tenant-b"}}
    not_found(lambda: client.responses.create(input="Go", previous_response_id=mine.id, **other))
    assert client.responses.create(input="Go", previous_response_id=mine.id, **salted).status == "incomplete"
    for method, path in [("POST", f"/responses/{mine.id}/fork"), ("GET", f"/states/{mine.id}")]:
        assert httpx.request(method, live_server.v1 + path, timeout=30).status_code == 404
    assert httpx.delete(f"{live_server.v1}/responses/{mine.id}", params={"cache_salt": "b"}).status_code == 404

    # DELETE answers OpenAI's object; then the id is gone for everything.
    answer = httpx.delete(f"{live_server.v1}/responses/{mine.id}", params={"cache_salt": "tenant-a"})
    assert answer.json() == {"id": mine.id, "object": "response", "deleted": True}
    not_found(lambda: client.responses.retrieve(mine.id, extra_query={"cache_salt": "tenant-a"}))
    not_found(lambda: client.responses.delete(mine.id, extra_query={"cache_salt": "tenant-a"}))
    plain = client.responses.create(input="Hi", **GREEDY)
    assert client.responses.delete(plain.id) is None  # the openai client's answer
    not_found(lambda: client.responses.create(input="Go", previous_response_id=plain.id, **GREEDY))

    # Another model: a name this server does not serve is the model's 404 before any state is looked up.
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(input="Hi", model="gpt-4o")
    assert info.value.body["code"] == "model_not_found"


def test_refusals_name_the_field(live_server) -> None:
    client = live_server.client()
    cases = [
        ({"tools": [{"type": "function", "name": "f"}]}, "tools"),
        ({"background": True}, "background"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"text": {"format": {"type": "json_object"}}}, "text"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
        ({"previous_response_id": "../etc/passwd"}, "previous_response_id"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"n": 2}, "n"),
    ]
    for extra, param in cases:
        body = {"model": MODEL, "input": "Hi", "max_output_tokens": 1, **extra}
        answer = httpx.post(live_server.v1 + "/responses", json=body, timeout=30)
        assert answer.status_code == 400, (extra, answer.text)
        assert answer.json()["error"]["param"] == param, (extra, answer.text)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(input="Hi", model=MODEL, max_output_tokens=0)


def test_export_import_and_fork_continue_as_the_original(live_server) -> None:
    client = live_server.client()
    original = client.responses.create(input="Hi", **GREEDY)
    turn = {"input": "Next", "previous_response_id": original.id, **GREEDY}
    want = client.responses.create(**turn).output_text

    blob = httpx.get(f"{live_server.v1}/states/{original.id}", timeout=30).content
    imported = httpx.post(live_server.v1 + "/states", content=blob, timeout=30)
    assert imported.status_code == 200, imported.text
    state = imported.json()
    assert state["object"] == "state" and state["id"].startswith("resp_") and state["id"] != original.id
    assert state["num_tokens"] == original.usage.total_tokens and state["model"] == MODEL
    record = client.responses.retrieve(state["id"])  # the exported record, under its new id
    assert record.id == state["id"] and record.output_text == original.output_text
    assert client.responses.create(**{**turn, "previous_response_id": state["id"]}).output_text == want
    named = httpx.post(live_server.v1 + "/states", params={"id": "my-copy.1"}, content=blob, timeout=30)
    assert named.json()["id"] == "my-copy.1"
    again = httpx.post(live_server.v1 + "/states", params={"id": "my-copy.1"}, content=blob, timeout=30)
    assert again.status_code == 400 and again.json()["error"]["param"] == "id"  # in use

    # A fork is independent: the original deleted, the fork continues exactly as the original did.
    fork = httpx.post(f"{live_server.v1}/responses/{original.id}/fork", timeout=30).json()
    assert fork["object"] == "response" and fork["id"] != original.id
    assert client.responses.create(**{**turn, "previous_response_id": fork["id"], "input": "Other"}).status
    client.responses.delete(original.id)
    assert client.responses.create(**{**turn, "previous_response_id": fork["id"]}).output_text == want
    assert client.responses.retrieve(fork["id"]).output_text == original.output_text


def test_a_bad_import_is_one_line_and_nobody_else_notices(live_server, tools) -> None:
    client = live_server.client()
    steady = {**GREEDY, "input": "Steady", "max_output_tokens": 12}
    want = client.responses.create(**steady).output_text
    events = iter(client.responses.create(stream=True, **steady))
    seen = [next(events) for _ in range(5)]  # created ... the first text delta: the request is running
    assert seen[-1].type == "response.output_text.delta"
    bodies = [b"", b"junk", b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", _foreign_state()]
    for body in bodies:
        answer = httpx.post(live_server.v1 + "/states", content=body, timeout=30)
        assert answer.status_code == 400, answer.text
        message = answer.json()["error"]["message"]
        assert "\n" not in message and message.startswith("expected"), message
    rest = list(events)
    assert rest[-1].type == "response.incomplete" and rest[-1].response.output_text == want
    assert client.responses.create(**steady).output_text == want
    # An import over --max-request-body-bytes is refused before it is read (docs/responses.md).
    blob = httpx.get(f"{live_server.v1}/states/{rest[-1].response.id}", timeout=30).content
    with tools.run_app(tools.app_over(live_server.llm, max_request_body_bytes=len(blob) - 1)) as base_url:
        answer = httpx.post(base_url + "/v1/states", content=blob, timeout=30)
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"
        assert httpx.post(base_url + "/v1/states", content=blob[: len(blob) // 2], timeout=30).status_code == 400


def _foreign_state() -> bytes:
    """A safetensors file with linrec's metadata but another model's key."""
    import torch
    from safetensors.torch import save

    meta = {"format": "linrec_state", "format_version": "1", "model": "another-model", "dtype": "float32"}
    return save({"token_ids": torch.tensor([1, 2], dtype=torch.int64)}, metadata=meta)


def test_a_template_that_cannot_be_cut_refuses_continuations(tmp_path, tools) -> None:
    """A template that renders the last message differently has no segment to cut: a 400 naming the field."""
    from linrec.models.demo import write_demo_model

    path = write_demo_model(tmp_path / "model", "liger_gla")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if loop.last %}<last>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    llm = AsyncLLM(EngineConfig(model=str(path), device="cpu", max_num_seqs=4, max_model_len=96))
    try:
        with tools.run_app(tools.app_over(llm)) as base_url:
            client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
            first = client.responses.create(input="Hi", **GREEDY)  # a first turn needs no cut
            with pytest.raises(openai.BadRequestError) as info:
                client.responses.create(input="Go", previous_response_id=first.id, **GREEDY)
            assert info.value.body["param"] == "previous_response_id" and "prefix" in info.value.body["message"]
    finally:
        llm.shutdown()


def test_a_stored_response_survives_a_restart(make_server, tmp_path) -> None:
    store = str(tmp_path / "states")
    with make_server(max_model_len=96, state_store=store) as server:
        client = server.client()
        first = client.responses.create(input="Hi", **GREEDY)
        want = client.responses.create(input="Next", previous_response_id=first.id, **GREEDY).output_text
    with make_server(max_model_len=96, state_store=store) as server:
        client = server.client()
        assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
        assert client.responses.create(input="Next", previous_response_id=first.id, **GREEDY).output_text == want


def test_a_stored_response_continues_only_on_its_own_model(tmp_path, tools) -> None:
    """A response made on a LoRA adapter is not found by the base model (and the other way round), but is by
    its adapter; a name the server does not serve is the model's own 404."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import torch

    from linrec.models.demo import demo_llama_config
    from linrec.models.tokenizer import write_byte_tokenizer

    config = transformers.LlamaConfig(**demo_llama_config())
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    write_byte_tokenizer(tmp_path / "base")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    adapter = peft.get_peft_model(transformers.LlamaForCausalLM(config), lora)
    with torch.no_grad():  # peft zero-inits lora_B: make the adapter change the output
        for name, param in adapter.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.5)
    adapter.save_pretrained(str(tmp_path / "sql"))
    engine = EngineConfig(
        model=str(tmp_path / "base"),
        linearize="liger-gla",
        device="cpu",
        dtype="float32",
        max_num_seqs=4,
        max_model_len=128,
        enable_lora=True,
        max_loras=1,
        max_lora_rank=4,
    )
    llm = AsyncLLM(engine)
    try:
        with tools.run_app(tools.app_over(llm, lora_modules=(("sql", str(tmp_path / "sql")),))) as base_url:
            client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
            greedy = {**GREEDY, "model": "sql"}
            on_adapter = client.responses.create(input="Hi", **greedy)
            assert on_adapter.model == "sql"
            not_found(lambda: client.responses.create(input="Go", previous_response_id=on_adapter.id, **GREEDY))
            assert client.responses.create(input="Go", previous_response_id=on_adapter.id, **greedy).model == "sql"
            on_base = client.responses.create(input="Hi", **GREEDY)
            not_found(lambda: client.responses.create(input="Go", previous_response_id=on_base.id, **greedy))
            with pytest.raises(openai.NotFoundError) as info:
                client.responses.create(input="Go", previous_response_id=on_base.id, **{**GREEDY, "model": "x"})
            assert info.value.body["code"] == "model_not_found"
    finally:
        llm.shutdown()


def test_linrec_client_methods_against_the_server(live_server) -> None:
    with lc.Client(live_server.base_url, max_retries=0) as client:
        first = client.responses("Hi", temperature=0, max_output_tokens=4, ignore_eos=True)
        assert isinstance(first, lc.Response) and first.status == "incomplete"
        with client.responses(
            "More", previous_response_id=first.id, stream=True, temperature=0, max_output_tokens=4, ignore_eos=True
        ) as stream:
            events = list(stream)
        assert events[0].type == "response.created" and stream.final_response.status == "incomplete"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert stream.final_response.output_text == text
        assert client.retrieve_response(stream.final_response.id).output_text == text
        blob = client.export_state(first.id)
        state = client.import_state(blob)
        assert isinstance(state, lc.State) and state.num_tokens == first.usage.total_tokens
        fork = client.fork_response(first.id)
        assert fork.id not in (first.id, state.id)
        assert client.delete_response(first.id).deleted is True
        with pytest.raises(lc.NotFoundError) as info:
            client.retrieve_response(first.id)
        assert info.value.code == "state_not_found"
        with pytest.raises(lc.BadRequestError):
            client.import_state(b"junk")

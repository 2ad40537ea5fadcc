"""Stored states (engine/state_store.py): a continuation from a stored end state equals sending the whole conversation
again, whatever tier the state was in (pool row, host, disk, a restarted engine, an export imported elsewhere),
for every family, with adapters and with layer routes; and what is not yours (another model, adapter, tenant,
an expired or deleted id) is not found."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from linrec import LLM
from linrec.engine.request import EngineRequest
from linrec.engine.sampling_params import InvalidRequestError, SamplingParams
from linrec.engine.state_store import InvalidStateError, StateNotFoundError
from linrec.models.demo import write_seeded_model

FAMILIES = ("liger_gla", "gla", "gated_deltanet", "mamba2", "lolcats_llama")
NUM_LAYERS = 4
# Without the prefix cache, resending a conversation prefills all of it: the reference owes nothing to any state.
CPU = dict(device="cpu", dtype="float32", enable_prefix_caching=False)
# Three turns of 30 new tokens each: the conversation outgrows the Liger window (64 keys) in the third.
TURNS = [[(11 * i + 7 * t + 3) % 250 + 1 for i in range(30)] for t in range(3)]
pytestmark = pytest.mark.usefixtures("one_thread")


def greedy(max_tokens: int = 5, logprobs: int | None = 2) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp(f"store-{request.param}") / "model"
    write_seeded_model(path, request.param, {"num_hidden_layers": NUM_LAYERS})
    return path


def converse(llm: LLM, turns, prefix: str, **kwargs) -> tuple[list, list[int]]:
    """Each turn continuing the previous one's stored state; (each turn's output, the whole conversation)."""
    outputs, conversation, previous = [], [], None
    for t, tokens in enumerate(turns):
        out = llm.generate([tokens], greedy(), store_state=f"{prefix}{t}", resume_state=previous, **kwargs)[0]
        outputs.append(out.outputs[0])
        conversation += tokens + out.outputs[0].token_ids
        previous = f"{prefix}{t}"
    return outputs, conversation


def resend(llm: LLM, turns, outputs, **kwargs) -> list:
    """Each turn as one plain request holding the whole conversation so far."""
    conversation, again = [], []
    for tokens, out in zip(turns, outputs):
        conversation += tokens
        again.append(llm.generate([conversation], greedy(), **kwargs)[0].outputs[0])
        conversation += out.token_ids
    return again


def assert_same(a, b) -> None:
    assert a.token_ids == b.token_ids
    assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_a_continuation_equals_sending_the_whole_conversation_again(model_dir, prefix_caching):
    llm = LLM(str(model_dir), **{**CPU, "enable_prefix_caching": prefix_caching})
    outputs, _ = converse(llm, TURNS, "c")
    for a, b in zip(outputs, resend(LLM(str(model_dir), **CPU), TURNS, outputs)):
        assert_same(a, b)
    stats = llm.engine.states.stats
    assert stats.saves == 3 and stats.resumes == 2


def test_a_continuation_prefills_only_the_stored_last_token_and_the_new_ones(model_dir):
    llm = LLM(str(model_dir), **CPU)
    engine = llm.engine
    llm.generate([TURNS[0]], greedy(), store_state="p0")
    before = engine.scheduler.prefix_stats.num_prefill_tokens
    engine.add_request(EngineRequest("next", TURNS[1], greedy(), resume_state="p0"))
    last = None
    while engine.has_unfinished():
        for delta in engine.step():
            last = delta
    fed = engine.scheduler.prefix_stats.num_prefill_tokens - before
    assert fed == len(TURNS[1]) + 1  # the new turn and the stored last token, never the history
    assert last.num_prompt_tokens == len(TURNS[0]) + 5 + len(TURNS[1])
    assert last.num_cached_tokens == len(TURNS[0]) + 5 - 1


def test_states_pushed_to_host_and_disk_and_a_restart_continue_exactly(model_dir, tmp_path):
    """One pool row for stored states and no host bytes: every state goes row -> host -> disk; the file holds
    the state bit for bit, and a new engine on the same directory continues it."""
    store = tmp_path / "states"
    plain = LLM(str(model_dir), **CPU)
    outputs, _ = converse(plain, TURNS[:2], "m")
    reference = plain.engine.export_state("m1")
    llm = LLM(str(model_dir), max_device_states=1, state_store_host_bytes=0, state_store=str(store), **CPU)
    tiered, _ = converse(llm, TURNS[:2], "m")
    assert [o.token_ids for o in tiered] == [o.token_ids for o in outputs]
    states = llm.engine.states
    assert llm.engine.state_info("m0").tier == "disk"  # pushed out by m1's row, then out of the host
    assert llm.engine.state_info("m1").tier == "device"
    assert _tensors(llm.engine.export_state("m1")) == _tensors(reference)  # bit for bit, tokens included
    assert states.stats.spills_to_host >= 1 and states.stats.spills_to_disk >= 1
    llm.engine.close()  # shutdown: m1 goes to the directory too
    again = LLM(str(model_dir), state_store=str(store), **CPU)
    assert again.engine.state_info("m1").tier == "disk"
    third = again.generate([TURNS[2]], greedy(), resume_state="m1")[0].outputs[0]
    assert_same(third, plain.generate([TURNS[2]], greedy(), resume_state="m1")[0].outputs[0])
    assert again.engine.states.stats.restores == 1


def _tensors(blob: bytes) -> dict:
    from safetensors.torch import load

    return {name: t.tolist() for name, t in load(blob).items()}


def test_an_imported_state_continues_as_the_exported_one(model_dir, tmp_path):
    llm = LLM(str(model_dir), **CPU)
    converse(llm, TURNS[:1], "e")
    blob = llm.engine.export_state("e0")
    other = LLM(str(model_dir), **CPU)  # another engine: the same model elsewhere
    info = other.engine.import_state(blob, "imported", meta={"note": "x"})
    assert info.tier == "host" and info.meta == {"note": "x"} and info.num_tokens == len(TURNS[0]) + 5
    assert_same(
        other.generate([TURNS[1]], greedy(), resume_state="imported")[0].outputs[0],
        llm.generate([TURNS[1]], greedy(), resume_state="e0")[0].outputs[0],
    )
    fork = llm.engine.fork_state("e0", "e0-fork")
    llm.engine.delete_state("e0")
    assert fork.num_tokens == info.num_tokens
    assert llm.generate([TURNS[1]], greedy(), resume_state="e0-fork")[0].outputs[0].token_ids == (
        other.generate([TURNS[1]], greedy(), resume_state="imported")[0].outputs[0].token_ids
    )


def test_imports_that_are_not_this_models_state_are_refused_in_one_line(model_dir, tmp_path):
    from safetensors.torch import load, save

    llm = LLM(str(model_dir), **CPU)
    converse(llm, TURNS[:1], "i")
    blob = llm.engine.export_state("i0")
    tensors = load(blob)
    import json
    import struct

    (size,) = struct.unpack("<Q", blob[:8])
    metadata = json.loads(blob[8 : 8 + size])["__metadata__"]
    name = next(n for n in tensors if n.startswith("state."))
    cases = [
        (b"not a state", "expected a safetensors"),
        (save({"x": torch.zeros(1)}), "expected a safetensors file with linrec's metadata"),
        (save(tensors, metadata={**metadata, "model": "other"}), "expected a state of this model"),
        (save(tensors, metadata={**metadata, "dtype": "bfloat16"}), "expected a state in float32"),
        (save({**tensors, name: torch.zeros(3)}, metadata=metadata), f"expected '{name}' float32"),
        (save({k: v for k, v in tensors.items() if k != name}, metadata=metadata), f"expected tensor '{name}'"),
        (save(tensors, metadata={**metadata, "format_version": "9"}), "expected state format version 1"),
    ]
    for data, message in cases:
        with pytest.raises(InvalidStateError, match=message) as info:
            llm.engine.import_state(data, "bad")
        assert "\n" not in str(info.value)
    with pytest.raises(InvalidStateError, match="expected the cache_salt"):
        llm.engine.import_state(blob, "salted", cache_salt="tenant-b")
    with pytest.raises(InvalidRequestError, match="expected a state id"):
        llm.engine.import_state(blob, "../../etc/passwd")
    assert llm.generate([TURNS[1]], greedy(), resume_state="i0")  # nobody else noticed


def test_what_is_not_yours_is_not_found(model_dir):
    llm = LLM(str(model_dir), state_ttl=3600.0, **CPU)
    engine = llm.engine
    llm.generate([TURNS[0]], greedy(), store_state="mine", cache_salt="tenant-a")
    for kwargs in ({}, {"cache_salt": "tenant-b"}):  # no salt, another salt
        with pytest.raises(StateNotFoundError):
            llm.generate([TURNS[1]], greedy(), resume_state="mine", **kwargs)
        with pytest.raises(StateNotFoundError):
            engine.state_info("mine", kwargs.get("cache_salt"))
    with pytest.raises(StateNotFoundError):
        llm.generate([TURNS[1]], greedy(), resume_state="nobody")
    assert llm.generate([TURNS[1]], greedy(), resume_state="mine", cache_salt="tenant-a")
    engine.states.get("mine", "tenant-a").created_at -= 7200  # an hour past its ttl
    with pytest.raises(StateNotFoundError):
        engine.state_info("mine", "tenant-a")
    assert engine.states.stats.expirations == 1 and len(engine.states) == 0
    llm.generate([TURNS[0]], greedy(), store_state="gone")
    engine.delete_state("gone")
    with pytest.raises(StateNotFoundError):
        engine.delete_state("gone")
    with pytest.raises(InvalidRequestError, match="expected n=1 to store the end state"):
        llm.generate([TURNS[0]], SamplingParams(n=2, max_tokens=2), store_state="two")
    assert not engine.has_unfinished() and engine.stats().num_slots_used == 0


def test_a_state_deleted_while_its_continuation_waits_still_loads(model_dir):
    llm = LLM(str(model_dir), max_num_seqs=1, **CPU)
    engine = llm.engine
    converse(llm, TURNS[:1], "w")
    expected = llm.generate([TURNS[1]], greedy(), resume_state="w0")[0].outputs[0].token_ids
    engine.add_request(EngineRequest("busy", TURNS[2], greedy(20)))
    engine.step()  # the only slot is taken: the continuation waits
    engine.add_request(EngineRequest("waits", TURNS[1], greedy(), resume_state="w0"))
    engine.delete_state("w0")
    got = []
    while engine.has_unfinished():
        got += [t for d in engine.step() if d.request_id == "waits" for t in d.token_ids]
    assert got == expected and len(engine.states) == 0


def test_adapters_and_routes_are_part_of_the_stored_state(tmp_path):
    from linrec.bench.sparse import write_equivalent_lora
    from linrec.engine.adapters import LoRARequest

    path = write_seeded_model(tmp_path / "m", "liger_gla", {"num_hidden_layers": NUM_LAYERS})
    llm = LLM(str(path), enable_lora=True, max_loras=2, max_lora_rank=64, **CPU)
    projections = {name: (m.in_features, m.out_features) for name, m in llm.engine.model.projections().items()}
    lora = LoRARequest("lora", 1, str(write_equivalent_lora(tmp_path / "lora", projections, 0.5, seed=1)))
    for prefix, kwargs in (
        ("l", {"lora_request": lora}),
        ("s", {"layer_route": (1, 0, 1, 0)}),
        ("r", {"layer_route": (1, 2, 1, 1)}),
        ("lr", {"lora_request": lora, "layer_route": (2, 0, 1, 1)}),
    ):
        outputs, _ = converse(llm, TURNS, prefix, **kwargs)
        for a, b in zip(outputs, resend(llm, TURNS, outputs, **kwargs)):
            assert_same(a, b)
    assert llm.engine.state_info("r2").layer_route == (1, 2, 1, 1)
    with pytest.raises(StateNotFoundError):  # the state is the adapter's: the base model cannot continue it
        llm.generate([TURNS[0]], greedy(), resume_state="l2")
    with pytest.raises(InvalidRequestError, match=r"expected the stored state's layer route \[1, 0, 1, 0\]"):
        llm.generate([TURNS[0]], greedy(), resume_state="s2", layer_route=(1, 1, 1, 0))
    assert llm.engine.stats().num_state_rows_used == 0


def test_an_auto_route_is_decided_once_and_its_continuations_keep_it(tmp_path):
    import json

    from linrec.models.router import write_random_routers

    path = write_seeded_model(tmp_path / "m", "gated_deltanet", {"num_hidden_layers": NUM_LAYERS})
    router = tmp_path / "router"
    write_random_routers(router, NUM_LAYERS, json.loads((path / "config.json").read_text())["hidden_size"], seed=3)
    llm = LLM(str(path), router=str(router), **CPU)
    outputs, _ = converse(llm, TURNS, "a", layer_route="auto")
    decided = outputs[0].layer_route
    assert decided is not None and all(o.layer_route == decided for o in outputs)
    for a, b in zip(outputs, resend(llm, TURNS, outputs, layer_route=decided)):
        assert_same(a, b)


def test_a_state_store_that_is_no_writable_directory_is_one_line(tmp_path):
    path = write_seeded_model(tmp_path / "m", "mamba2", {"num_hidden_layers": NUM_LAYERS})
    afile = tmp_path / "a-file"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"^expected --state-store to be a directory linrec can write, got '.*a-file'"):
        LLM(str(path), state_store=str(afile), **CPU)


def test_a_state_that_cannot_be_kept_loses_only_itself(tmp_path, monkeypatch):
    """A disk that refuses the write drops that state (counted); a store that raises leaves the request answered;
    the engine is not reset and serves the next request."""
    from linrec.engine.state_store import StateStore

    path = write_seeded_model(tmp_path / "m", "gla", {"num_hidden_layers": NUM_LAYERS})
    llm = LLM(str(path), max_device_states=0, state_store_host_bytes=0, state_store=str(tmp_path / "s"), **CPU)

    def full_disk(self, entry):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StateStore, "_write", full_disk)
    scheduler = llm.engine.scheduler
    out = llm.generate([TURNS[0]], greedy(), store_state="lost")[0].outputs[0]
    assert out.finish_reason == "length" and llm.engine.states.stats.drops == 1
    with pytest.raises(StateNotFoundError):
        llm.engine.state_info("lost")
    monkeypatch.setattr(StateStore, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken")))
    assert llm.generate([TURNS[0]], greedy(), store_state="broken")[0].outputs[0].finish_reason == "length"
    assert llm.engine.scheduler is scheduler  # no reset
    assert llm.generate([TURNS[1]], greedy())[0].outputs[0].token_ids


def test_continuations_of_long_conversations_are_not_long_prompts(tmp_path):
    """A continuation prefills its new tokens only: however long the stored conversation, it is admitted as the
    short prompt it is, all of them in one step (found by bench multiturn: past the long-prompt threshold they
    were admitted one per step)."""
    path = write_seeded_model(tmp_path / "m", "liger_gla", {"num_hidden_layers": NUM_LAYERS})
    llm = LLM(str(path), max_num_seqs=8, max_num_batched_tokens=64, **CPU)  # long: over 16 tokens to prefill
    engine = llm.engine
    for i in range(4):
        llm.generate([TURNS[i % 3]], greedy(2), store_state=f"long{i}")
    for i in range(4):
        engine.add_request(EngineRequest(f"next{i}", [7, 8, 9], greedy(2), resume_state=f"long{i}"))
    original, outs = engine.scheduler.schedule, []
    engine.scheduler.schedule = lambda: outs.append(original()) or outs[-1]
    while engine.has_unfinished():
        engine.step()
    first = outs[0]  # the stored last token and the 3 new ones, of every continuation
    assert len(first.sequences) == 4 and all(len(s.token_ids) == 4 for s in first.sequences)


def test_an_engine_reset_unpins_the_continuations_it_fails(tmp_path):
    path = write_seeded_model(tmp_path / "m", "mamba2", {"num_hidden_layers": NUM_LAYERS})
    llm = LLM(str(path), max_num_seqs=1, **CPU)
    engine = llm.engine
    llm.generate([TURNS[0]], greedy(), store_state="kept")
    engine.add_request(EngineRequest("busy", TURNS[1], greedy(20)))
    engine.step()
    engine.add_request(EngineRequest("waits", TURNS[2], greedy(), resume_state="kept"))  # no slot: it waits
    assert engine.states.get("kept").pins == 1
    engine.reset()
    assert engine.states.get("kept").pins == 0 and not engine.has_unfinished()
    assert llm.generate([TURNS[2]], greedy(), resume_state="kept")[0].outputs[0].token_ids


def test_a_refused_continuation_leaves_its_state_unpinned(model_dir):
    """A route other than the stored one, or a conversation past max_model_len, is refused in one line, and the
    stored state is free to move again (no pin left behind)."""
    llm = LLM(str(model_dir), max_model_len=200, **CPU)
    engine = llm.engine
    llm.generate([TURNS[0]], greedy(), store_state="s", layer_route=(1, 0, 1, 1))
    cases = [
        (dict(layer_route=(1, 1, 1, 0)), r"^expected the stored state's layer route \[1, 0, 1, 1\]"),
        (dict(max_tokens=170), r"^the conversation has 65 tokens and max_tokens is 170; .* 200 tokens"),
    ]
    for kwargs, message in cases:
        params = greedy(kwargs.pop("max_tokens", 5))
        with pytest.raises(InvalidRequestError, match=message):
            engine.add_request(EngineRequest("x", TURNS[1][:30], params, resume_state="s", **kwargs))
        assert engine.states.get("s").pins == 0 and not engine.has_unfinished()
    assert llm.generate([TURNS[1][:30]], greedy(), resume_state="s")[0].outputs[0].token_ids


def test_bad_state_store_and_route_row_flags_are_one_line_errors(model_dir):
    from linrec.cli import main
    from linrec.engine.config import EngineConfig

    for name, bad in (
        ("max_device_states", -1),
        ("state_store_host_bytes", 1.5),
        ("state_store_max_bytes", True),
        ("route_state_rows", -2),
    ):
        with pytest.raises(ValueError, match=f"^expected {name} as an int >= 0, got {bad!r}$"):
            EngineConfig(model=str(model_dir), **{name: bad})
    for bad in (0, -1.0, "soon"):
        with pytest.raises(ValueError, match=r"^expected state_ttl > 0 \(seconds\)"):
            EngineConfig(model=str(model_dir), state_ttl=bad)
    with pytest.raises(SystemExit):  # argparse: a usage error naming the flag
        main(["serve", "--state-store-max-bytes", "12x"])

"""One request must never hurt another: what a step will index is validated at the door, and a step that
still raises fails only the requests it can be traced to while the engine goes on."""

from __future__ import annotations

import pytest

from linrec import LLM, SamplingParams
from linrec.engine.request import EngineRequest
from linrec.engine.sampling_params import MAX_LOGPROBS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, InvalidRequestError


def greedy(max_tokens: int = 6, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        # The report's request: min_tokens masks the stop ids, indexing the logits with 99999 (or -1).
        (dict(min_tokens=1, stop_token_ids=[99999]), "stop_token_ids"),
        (dict(min_tokens=1, stop_token_ids=[-1]), "stop_token_ids"),
        (dict(stop_token_ids=[99999]), "stop_token_ids"),
        (dict(logit_bias={99999: 1.0}), "logit_bias"),
    ],
)
def test_ids_a_step_would_index_are_refused_before_the_engine(demo_model_dir, params, param):
    llm = LLM(demo_model_dir(), max_num_seqs=4)
    with pytest.raises(InvalidRequestError) as info:
        llm.engine.add_request(EngineRequest("bad", [1, 2, 3], greedy(**params)))
    assert info.value.param == param
    assert not llm.engine.has_unfinished()
    assert llm.generate([[1, 2, 3]], greedy())[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(logit_bias={1: float("nan")}), "logit_bias"),
        (dict(logprobs=MAX_LOGPROBS + 1), "logprobs"),
        (dict(stop=["x"] * (MAX_STOP_STRINGS + 1)), "stop"),
        (dict(stop=["x" * (MAX_STOP_STRING_CHARS + 1)]), "stop"),
        (dict(stop_token_ids=list(range(1025))), "stop_token_ids"),
    ],
)
def test_sampling_params_limits_name_the_field(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


# -- a step that raises ------------------------------------------------------------------------------

MARKER = [201, 202, 203]  # a prompt holding this run of tokens is the "poisoned" one


def is_poisoned(request) -> bool:
    ids = request.prompt_token_ids
    return any(ids[i : i + len(MARKER)] == MARKER for i in range(len(ids)))


def request_of(engine, seq):
    """The live request behind a scheduled sequence (the scheduler's output names it by id only)."""
    return engine.scheduler._step[seq.request_id]


class Faults:
    """Wraps the runner's forward: a step raises when `should_fail(sequences)` says so, after the forward
    already ran (so the step's states are left half updated, as a real fault would leave them)."""

    def __init__(self, engine, should_fail):
        self.engine, self.should_fail, self.num_raised = engine, should_fail, 0
        self._forward = engine.runner._forward
        engine.runner._forward = self

    def __call__(self, seqs, *args):
        hidden = self._forward(seqs, *args)
        if self.should_fail(seqs):
            self.num_raised += 1
            raise RuntimeError(f"injected fault #{self.num_raised}")
        return hidden


def prompts_for(num: int, seed: int, shared_prefix: list[int] | None = None) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    prefix = shared_prefix or []
    return [prefix + [rng.randrange(1, 200) for _ in range(rng.randint(3, 20))] for _ in range(num)]


def run(engine, prompts: dict[str, list[int]], params: SamplingParams) -> dict[str, dict[int, tuple]]:
    """Every prompt through EngineCore directly: request id -> sample index -> (token ids, finish reason)."""
    for rid, prompt in prompts.items():
        engine.add_request(EngineRequest(rid, prompt, params))
    out: dict[str, dict[int, tuple]] = {rid: {} for rid in prompts}
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for delta in engine.step():
            tokens, _ = out[delta.request_id].get(delta.index, ([], None))
            out[delta.request_id][delta.index] = (tokens + delta.token_ids, delta.finish_reason)
    assert not engine.has_unfinished()
    return out


def assert_clean(engine) -> None:
    assert engine.scheduler.allocator.num_used == 0 and engine.scheduler.num_suspects == 0
    if engine.prefix_cache is not None:
        engine.prefix_cache.check()


@pytest.mark.parametrize("family", ["liger_gla", "mamba2"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_a_request_that_makes_steps_fail_fails_alone_and_others_are_untouched(demo_model_dir, family, phase):
    params = greedy(max_tokens=12)  # each quarantine round lets the culprit sample once more: room for 4 rounds
    prompts = {f"r{i}": p for i, p in enumerate(prompts_for(6, seed=1))}
    clean = run(LLM(demo_model_dir(family), max_num_seqs=8).engine, prompts, params)

    llm = LLM(demo_model_dir(family), max_num_seqs=8, max_num_batched_tokens=64)
    engine = llm.engine
    poisoned_prompt = [5, 6, *MARKER, 7]

    def should_fail(seqs):
        # prefill: the poisoned prompt's first chunk; decode: once it has generated 2 tokens
        for s in seqs:
            late = phase == "prefill" or s.start_position >= len(poisoned_prompt) + 1
            if is_poisoned(request_of(engine, s)) and late:
                return True
        return False

    faults = Faults(engine, should_fail)
    got = run(engine, {**prompts, "poison": poisoned_prompt}, params)
    assert got["poison"][0][1] == "error"
    assert {rid: got[rid] for rid in prompts} == clean  # every other request: the same tokens, as if nothing happened
    # Once in the batch, then once per bisection round of the 7 quarantined requests, the last one alone.
    assert 2 <= faults.num_raised <= 2 + 3
    stats = engine.stats()
    assert (stats.num_step_failures, stats.num_failed_requests, stats.num_quarantined) == (faults.num_raised, 1, 0)
    assert_clean(engine)
    # The engine goes on serving.
    assert run(engine, {"after": prompts["r0"]}, params)["after"] == clean["r0"]


def test_a_transient_fault_fails_nobody(demo_model_dir):
    params = greedy(max_tokens=6, n=2)
    prompts = {f"r{i}": p for i, p in enumerate(prompts_for(5, seed=2))}
    clean = run(LLM(demo_model_dir(), max_num_seqs=16).engine, prompts, params)
    engine = LLM(demo_model_dir(), max_num_seqs=16, max_num_batched_tokens=32).engine
    faults = Faults(engine, lambda seqs: len(seqs) >= 4 and engine.stats().num_step_failures == 0)
    got = run(engine, prompts, params)
    assert faults.num_raised == 1 and got == clean
    assert engine.stats().num_failed_requests == 0
    assert_clean(engine)


def test_faults_with_the_prefix_cache_keep_it_consistent(demo_model_dir):
    """Shared prefixes, branch-point snapshots and end states in flight when steps fail: the snapshots the
    failed steps wrote are dropped, nobody loads a half-written row, outputs match a clean run."""
    params = greedy(max_tokens=5)
    shared = list(range(1, 41))
    prompts = {f"r{i}": p for i, p in enumerate(prompts_for(8, seed=3, shared_prefix=shared))}
    clean = run(LLM(demo_model_dir(), max_num_seqs=4, enable_prefix_caching=False).engine, prompts, params)
    engine = LLM(demo_model_dir(), max_num_seqs=4, max_num_batched_tokens=24, max_cached_states=8).engine
    step_index = iter(range(10_000))
    Faults(engine, lambda seqs: next(step_index) % 5 == 2)  # every fifth step fails, whatever it holds
    got = run(engine, {**prompts, "poison": [*shared, *MARKER]}, params)
    # Faults that strike a batch are transient here: a quarantine step holds one request, and some of those
    # fail too; whoever fails, everyone else's tokens are exact.
    failed = {rid for rid, samples in got.items() if samples[0][1] == "error"}
    assert {rid: got[rid] for rid in prompts if rid not in failed} == {
        rid: clean[rid] for rid in prompts if rid not in failed
    }
    assert engine.stats().num_failed_requests == len(failed)
    assert_clean(engine)


def test_a_fault_in_the_engines_own_bookkeeping_resets_it_and_it_goes_on(demo_model_dir):
    engine = LLM(demo_model_dir(), max_num_seqs=4).engine
    params = greedy(max_tokens=4)
    engine.add_request(EngineRequest("a", [1, 2, 3], params))
    engine.add_request(EngineRequest("b", [4, 5, 6], params))
    engine.step()
    update = engine.scheduler.update

    def broken_update(*args):
        raise KeyError("injected bookkeeping bug")

    engine.scheduler.update = broken_update
    deltas = engine.step()
    assert sorted((d.request_id, d.finish_reason) for d in deltas) == [("a", "error"), ("b", "error")]
    assert engine.scheduler.update is not broken_update and update is not None  # a new scheduler
    assert not engine.has_unfinished()
    assert_clean(engine)
    assert run(engine, {"c": [1, 2, 3]}, params)["c"][0][1] == "length"


def test_a_detokenizer_error_fails_only_its_request(demo_model_dir):
    params = greedy(max_tokens=5)
    prompts = {f"r{i}": p for i, p in enumerate(prompts_for(4, seed=4))}
    clean = run(LLM(demo_model_dir(), max_num_seqs=8).engine, prompts, params)
    engine = LLM(demo_model_dir(), max_num_seqs=8).engine
    tokenizer = engine.outputs.tokenizer
    decode = tokenizer.decode

    def broken_decode(token_ids, *args, **kwargs):
        # The decode window holds the last prompt tokens: only the poisoned prompt's text breaks.
        if any(list(token_ids[i : i + len(MARKER)]) == MARKER for i in range(len(token_ids))):
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "injected")
        return decode(token_ids, *args, **kwargs)

    tokenizer.decode = broken_decode
    try:
        got = run(engine, {**prompts, "poison": [9, *MARKER]}, params)
    finally:
        tokenizer.decode = decode
    assert got["poison"][0][1] == "error" and {rid: got[rid] for rid in prompts} == clean
    assert engine.stats().num_failed_requests == 1
    assert_clean(engine)


def test_async_callers_of_a_failed_request_get_an_error_that_quotes_nobody(demo_model_dir):
    import asyncio

    from linrec.engine.async_llm import AsyncLLM, EngineDeadError, RequestFailedError
    from linrec.engine.config import EngineConfig

    llm = AsyncLLM(EngineConfig(model=demo_model_dir(), max_num_seqs=8))
    try:
        Faults(llm.engine, lambda seqs: any(is_poisoned(request_of(llm.engine, s)) for s in seqs))
        secret = [150, 151, 152, 153]  # another user's prompt: must appear in no error

        async def collect(prompt):
            return [d async for d in llm.generate(prompt, greedy(max_tokens=6))]

        async def main():
            others = [asyncio.ensure_future(collect(secret + [i])) for i in range(3)]
            with pytest.raises(RequestFailedError) as info:
                await collect([1, *MARKER])
            return info.value, await asyncio.gather(*others)

        error, others = asyncio.run(main())
        assert all(deltas[-1].finish_reason == "length" for deltas in others)
        assert "150" not in str(error) and "201" not in str(error)
        llm.check_health()
    finally:
        llm.shutdown()

    # When the engine thread itself dies, queued and later callers hear of it at once, and health says so.
    dead = AsyncLLM(EngineConfig(model=demo_model_dir(), max_num_seqs=2))
    try:

        def crash():
            raise SystemExit("injected: the engine thread dies")

        dead.engine.step = crash

        async def ask():
            return [d async for d in dead.generate([1, 2], greedy(max_tokens=2))]

        with pytest.raises(EngineDeadError):
            asyncio.run(asyncio.wait_for(ask(), timeout=30))
        with pytest.raises(EngineDeadError):
            asyncio.run(asyncio.wait_for(ask(), timeout=30))
        with pytest.raises(EngineDeadError, match="SystemExit"):
            dead.check_health()
    finally:
        dead.shutdown()

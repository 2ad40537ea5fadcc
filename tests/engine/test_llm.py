"""The engine end to end on the tiny demo models: batching, chunking, slots, forks, stops, seeds."""

from __future__ import annotations

import random

import pytest

from linrec import LLM, SamplingParams
from linrec.engine.request import EngineRequest, RequestStatus

FAMILIES = ["liger_gla", "gla", "gated_deltanet", "mamba2", "lolcats_llama"]


def random_prompts(num: int, lo: int, hi: int, vocab: int = 256, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(num)]


def greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_alone_equals_batched_and_any_chunking(demo_model_dir, family):
    prompts = random_prompts(32, 1, 24, seed=1)
    alone = LLM(demo_model_dir(family), max_num_seqs=1, max_num_batched_tokens=512)
    expected = alone.generate([prompts[0]], greedy(8))[0].outputs[0].token_ids

    batched = LLM(demo_model_dir(family), max_num_seqs=32, max_num_batched_tokens=512)
    outs = batched.generate(prompts, greedy(8))
    assert outs[0].outputs[0].token_ids == expected

    # A budget of 33 tokens: 32 decodes leave 1 prefill token per step, so prompts are chunked
    # into single tokens mixed with other requests' decodes.
    chunked = LLM(demo_model_dir(family), max_num_seqs=32, max_num_batched_tokens=33)
    outs_chunked = chunked.generate(prompts, greedy(8))
    assert [o.outputs[0].token_ids for o in outs_chunked] == [o.outputs[0].token_ids for o in outs]


def test_reused_slot_leaks_nothing(demo_model_dir):
    llm = LLM(demo_model_dir(), max_num_seqs=1, max_num_batched_tokens=64)
    probe = random_prompts(1, 9, 9, seed=3)[0]
    fresh = llm.generate([probe], greedy())[0].outputs[0].token_ids
    # A long previous owner of the only slot, then the probe again in that same slot.
    llm.generate(random_prompts(1, 200, 200, seed=4), greedy(max_tokens=30))
    again = llm.generate([probe], greedy())[0].outputs[0].token_ids
    assert again == fresh
    # And the pool really is zeroed on hand-over: the slot is reset before its next prefill.
    pool = llm.engine.pool
    assert any(t[1].abs().sum() > 0 for layer in pool.layers for t in layer.values())
    pool.reset([1])
    assert all(t[1].abs().sum() == 0 for layer in pool.layers for t in layer.values())


def test_abort_frees_the_slot_within_one_step(demo_model_dir):
    llm = LLM(demo_model_dir(), max_num_seqs=2, max_num_batched_tokens=64)
    engine = llm.engine
    engine.add_request(EngineRequest("long", [1, 2, 3], greedy(max_tokens=1000)))
    engine.add_request(EngineRequest("other", [4, 5, 6], greedy(max_tokens=1000)))
    engine.step()
    assert engine.scheduler.allocator.num_free == 0
    engine.abort(["long"])
    assert engine.scheduler.allocator.num_free == 1
    engine.add_request(EngineRequest("next", [7, 8], greedy(max_tokens=2)))
    engine.step()
    assert "next" in {r.request_id for r in engine.scheduler.running}
    engine.abort(["other", "next"])
    assert engine.scheduler.allocator.num_free == 2 and not engine.has_unfinished()


def test_n_samples_fork_from_one_prefill(demo_model_dir):
    llm = LLM(demo_model_dir(), max_num_seqs=8, max_num_batched_tokens=64)
    prompt = random_prompts(1, 50, 50, seed=5)[0]
    computed: list[int] = []
    execute = llm.engine.runner.execute

    def counting_execute(out):
        computed.append(out.num_batched_tokens)
        return execute(out)

    llm.engine.runner.execute = counting_execute
    single = llm.generate([prompt], greedy(max_tokens=6))[0].outputs[0].token_ids
    computed.clear()
    out = llm.generate([prompt], greedy(max_tokens=6, n=3))[0]
    # The prompt is prefilled once; then 3 samples each feed 5 tokens back (the 6th is only sampled).
    assert sum(computed) == len(prompt) + 3 * 5
    assert [o.token_ids for o in out.outputs] == [single] * 3
    seeded = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))[0]
    texts = [o.token_ids for o in seeded.outputs]
    assert len({tuple(t) for t in texts}) > 1, "forked samples with their own generators should differ"


def test_stop_string_split_across_tokens(demo_model_dir):
    llm = LLM(demo_model_dir(), max_num_seqs=4)
    params = greedy(max_tokens=40)
    full = llm.generate(["Once upon a time"], params)[0].outputs[0]
    text = full.text
    # Pick a stop string of several characters from the middle: on a byte-level tokenizer every
    # character is its own token, so the match spans token boundaries.
    stop = text[10:14]
    assert len(stop.encode()) >= 2
    out = llm.generate(["Once upon a time"], greedy(max_tokens=40, stop=[stop]))[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_seeded_sampling_reproduces_whatever_the_batch(demo_model_dir):
    llm = LLM(demo_model_dir(), max_num_seqs=16)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    prompt = random_prompts(1, 12, 12, seed=6)[0]
    alone = llm.generate([prompt], params)[0].outputs[0].token_ids
    others = random_prompts(7, 3, 30, seed=8)
    mixed = llm.generate(
        others[:3] + [prompt] + others[3:],
        [SamplingParams(temperature=1.0, max_tokens=16)] * 3
        + [params]
        + [SamplingParams(temperature=1.0, max_tokens=16)] * 4,
    )
    assert mixed[3].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate([prompt], other_seed)[0].outputs[0].token_ids != alone


def test_state_bytes_do_not_grow_with_context(demo_model_dir):
    llm = LLM(demo_model_dir(), max_num_seqs=2, max_num_batched_tokens=1024, max_model_len=8192)
    pool = llm.engine.pool
    per_request, total = pool.bytes_per_request, pool.total_bytes
    llm.generate(random_prompts(1, 16, 16)[0:1], greedy(max_tokens=2))
    assert (pool.bytes_per_request, pool.total_bytes) == (per_request, total)
    llm.generate(random_prompts(1, 4096, 4096)[0:1], greedy(max_tokens=2))
    assert (pool.bytes_per_request, pool.total_bytes) == (per_request, total)
    assert total == per_request * pool.num_rows
    assert pool.num_rows == 1 + pool.num_slots + pool.num_snapshot_rows + pool.num_store_rows


def test_chat_uses_the_template_and_logprobs_are_returned(demo_model_dir):
    llm = LLM(demo_model_dir())
    out = llm.chat([{"role": "user", "content": "hi"}], greedy(max_tokens=4, logprobs=3))[0]
    sample = out.outputs[0]
    assert len(sample.logprobs) == 4
    for token_id, lp in zip(sample.token_ids, sample.logprobs):
        assert lp.token_id == token_id and len(lp.top) == 3
        assert lp.top[0][1] >= lp.top[-1][1] and lp.logprob <= 0
        # greedy picks the most likely token under the raw distribution
        assert lp.top[0][0] == token_id
    assert llm.tokenizer.decode(out.prompt_token_ids).endswith("<|assistant|>")


def test_bad_requests_are_refused_and_the_engine_goes_on(demo_model_dir):
    llm = LLM(demo_model_dir(), max_model_len=64)
    with pytest.raises(ValueError, match="token ids"):
        llm.engine.add_request(EngineRequest("bad", [10**9], greedy()))
    with pytest.raises(ValueError, match="max_model_len"):
        llm.engine.add_request(EngineRequest("long", list(range(60)), greedy(max_tokens=10)))
    with pytest.raises(ValueError, match="non-empty"):
        llm.engine.add_request(EngineRequest("empty", [], greedy()))
    assert llm.generate([[1, 2, 3]], greedy(max_tokens=3))[0].outputs[0].finish_reason == "length"
    assert not any(r.status is RequestStatus.RUNNING for r in llm.engine.scheduler.requests.values())

"""Prefix-state cache: the radix tree alone, the scheduler in plain data, and the engine cached == uncached."""

from __future__ import annotations

import random

import pytest

from linrec import LLM, SamplingParams
from linrec.engine.prefix_cache import PrefixCache, PrefixKey
from linrec.engine.request import Request
from linrec.engine.scheduler import Scheduler, StepResult

KEY = PrefixKey("m")
FAMILIES = ["liger_gla", "mamba2", "lolcats_llama"]


def greedy(max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def tokens(n: int, seed: int, vocab: int = 256) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


# -- the radix tree ----------------------------------------------------------------------------------


def test_insert_splits_at_the_exact_token_and_match_is_token_granular():
    cache = PrefixCache(rows=[10, 11, 12], state_bytes=100)
    a = cache.insert_path(KEY, [1, 2, 3, 4, 5])
    b = cache.insert_path(KEY, [1, 2, 3, 9])
    assert (a.depth, b.depth) == (5, 4)
    branch = a.parent
    assert branch is b.parent and branch.depth == 3 and branch.tokens == [1, 2, 3] and branch.ref == 2
    assert a.tokens == [4, 5] and b.tokens == [9]
    # A snapshot after exactly 2 tokens splits [1, 2, 3] again, mid-edge.
    s2 = cache.save(KEY, [1, 2], cache.allocate_row(), is_ready=True)
    assert s2.depth == 2 and s2.tokens == [1, 2] and branch.parent is s2 and branch.tokens == [3]
    s4 = cache.save(KEY, [1, 2, 3, 4], cache.allocate_row(), is_ready=True)
    cache.check()
    # The deepest ready snapshot within the limit, at any token.
    assert cache.path_info(KEY, [1, 2, 3, 4, 5, 6], 6).hit is s4
    assert cache.path_info(KEY, [1, 2, 3, 4, 5, 6], 3).hit is s2
    assert cache.path_info(KEY, [1, 2, 7], 3).hit is s2
    assert cache.path_info(KEY, [1, 7], 2).hit is None
    assert cache.path_info(PrefixKey("m", cache_salt="x"), [1, 2, 3, 4, 5], 5).hit is None
    # A snapshot not yet written is not a hit.
    s3 = cache.save(KEY, [1, 2, 3], cache.allocate_row(), is_ready=False)
    assert cache.path_info(KEY, [1, 2, 3, 9, 9], 4).hit is s2
    cache.mark_ready(s3)
    assert cache.path_info(KEY, [1, 2, 3, 9, 9], 4).hit is s3
    assert cache.num_free_rows == 0 and cache.num_snapshots == 3


def test_release_prunes_and_branches_are_where_paths_part():
    cache = PrefixCache(rows=[1], state_bytes=1)
    a = cache.insert_path(KEY, [1, 2, 3, 4])
    b = cache.insert_path(KEY, [1, 2, 3, 5, 6])
    c = cache.insert_path(KEY, [1, 2, 3, 5, 6, 7, 8])
    info = cache.path_info(KEY, [1, 2, 3, 5, 6, 7, 8], 7)
    # a leaves after 3 tokens; b ends after 5 (c goes on): both are branch points on c's path.
    assert [n.depth for n in info.branches] == [3, 5]
    assert [n.depth for n in cache.path_info(KEY, [1, 2, 3, 4], 4).branches] == [3]
    cache.release_path(c)
    cache.release_path(b)
    assert cache.path_info(KEY, [1, 2, 3, 4], 4).branches == []
    cache.release_path(a)
    cache.check()
    assert not cache.root(KEY).children


def test_eviction_by_value_never_touches_a_snapshot_in_use():
    cache = PrefixCache(rows=[1, 2, 3], state_bytes=10)
    deep = cache.save(KEY, tokens(100, 1), cache.allocate_row(), is_ready=True)
    shallow = cache.save(KEY, tokens(20, 2), cache.allocate_row(), is_ready=True)
    pending = cache.save(KEY, tokens(5, 3), cache.allocate_row(), is_ready=False)
    assert cache.value(deep) > cache.value(shallow)
    # Full: the least valuable evictable one goes (the pending one is worth less but is being written).
    shallow.pins += 1
    assert not cache.is_evictable(pending) and not cache.is_evictable(shallow)
    with pytest.raises(RuntimeError, match="in use"):
        cache.evict(shallow)
    row = cache.allocate_row()
    assert row == 1 and deep.row is None and shallow.row == 2 and pending.row == 3
    cache.save(KEY, tokens(50, 4), row, is_ready=True)
    # Nothing evictable worth less than what an opportunistic save would bring: no row.
    cache.mark_ready(pending)
    assert cache.allocate_row(min_value=cache.value(pending)) is None
    cache.touch(pending)  # hits raise a snapshot's value
    assert cache.num_evictions == 1
    cache.check()


def test_value_counts_tokens_beyond_the_ancestor_and_the_path_cap_holds():
    cache = PrefixCache(rows=list(range(1, 10)), state_bytes=1, max_snapshots_per_path=3)
    path = tokens(100, 5)
    nodes = [cache.save(KEY, path[:d], cache.allocate_row(), is_ready=True) for d in (10, 60, 70)]
    assert [cache.value(n) for n in nodes] == [10, 50, 10]
    cache.touch(nodes[0])
    assert cache.value(nodes[0]) == 20
    # A fourth snapshot on the path pushes out the least valuable one above it (depth 70; 10 tokens, older).
    fourth = cache.save(KEY, path[:90], cache.allocate_row(), is_ready=True)
    assert fourth is not None and nodes[2].row is None and cache.num_snapshots == 3
    cache.check()


# -- the scheduler in plain data ---------------------------------------------------------------------


def make_scheduler(num_rows: int = 8, group: bool = True, **kwargs) -> tuple[Scheduler, PrefixCache]:
    cache = PrefixCache(rows=list(range(100, 100 + num_rows)), state_bytes=1)
    args = dict(num_slots=4, max_num_seqs=4, max_num_batched_tokens=64, max_waiting_requests=64)
    args.update(kwargs)
    return Scheduler(**args, prefix_cache=cache, group_prefixes=group), cache


def request(rid: str, prompt: list[int], max_tokens: int = 2, salt: str | None = None) -> Request:
    params = SamplingParams(max_tokens=max_tokens)
    return Request(rid, prompt, params, cache_key=PrefixKey("m", cache_salt=salt))


def step(sched: Scheduler, out=None):
    """Schedule (unless given the output) and update with token 7 for every sample."""
    out = sched.schedule() if out is None else out
    return out, sched.update(out, StepResult({r.request_id: 7 for r, _ in out.samples}))


def run_to_end(sched: Scheduler, cache: PrefixCache, max_steps: int = 200) -> list:
    outs = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return outs
        out, _ = step(sched)
        outs.append(out)
        cache.check()
    raise AssertionError("the scheduler did not finish")


def test_grouping_prefills_the_shared_prefix_once_and_followers_load_it():
    sched, cache = make_scheduler()
    system = tokens(40, 1)
    for i in range(4):
        sched.add_request(request(f"r{i}", system + tokens(5, 10 + i)))
    out = sched.schedule()
    # One leader prefills exactly up to the branch point (40 tokens) and saves there; the rest wait.
    assert [(len(s.token_ids), s.start_position) for s in out.sequences] == [(40, 0)]
    assert len(out.saves) == 1 and out.saves[0][0] == out.sequences[0].slot_id
    assert sched.num_waiting == 3 and not out.loads
    step(sched, out)
    out = sched.schedule()
    loaded = {slot: src for src, slot in out.loads}
    followers = [s for s in out.sequences if s.slot_id in loaded]
    assert len(followers) == 3 and all(s.start_position == 40 and len(s.token_ids) == 5 for s in followers)
    assert len(set(loaded.values())) == 1  # all load the one snapshot
    step(sched, out)
    run_to_end(sched, cache)
    assert sched.prefix_stats.num_prefill_tokens == 45 + 3 * 5
    assert sched.prefix_stats.num_hits == 3 and sched.prefix_stats.num_hit_tokens == 3 * 40


def test_leader_prefill_chunked_across_the_branch_point():
    sched, cache = make_scheduler(max_num_batched_tokens=20, min_snapshot_tokens=4)
    system = tokens(50, 2)
    sched.add_request(request("a", system + tokens(6, 3)))
    sched.add_request(request("b", system + tokens(6, 4)))
    ends = []
    for _ in range(5):
        out, _ = step(sched)
        ends += [s.start_position + len(s.token_ids) for s in out.sequences if s.start_position < 50]
        if out.loads:
            break
    # 20-token chunks, the third cut at the branch point (50); the follower waits for it (it would
    # gain 10 tokens over the chunk-end snapshot at 40) and starts from there.
    assert ends == [20, 40, 50]
    assert [s.start_position for s in out.sequences if (s.slot_id in {d for _, d in out.loads})] == [50]
    run_to_end(sched, cache)


def test_without_grouping_a_later_prompt_saves_where_it_parts_from_the_cache():
    sched, cache = make_scheduler(group=False)
    system = tokens(40, 5)
    sched.add_request(request("a", system + tokens(30, 6)))
    run_to_end(sched, cache)  # leaves snapshots at a's prompt end and end state, none at 40
    sched.add_request(request("b", system + tokens(30, 7)))
    out = sched.schedule()
    assert out.sequences[0].start_position == 0 and len(out.sequences[0].token_ids) == 40
    assert out.saves
    step(sched, out)
    run_to_end(sched, cache)
    sched.add_request(request("c", system + tokens(30, 8)))
    out = sched.schedule()
    assert out.loads and out.sequences[0].start_position == 40


def test_a_cache_salt_mismatch_never_hits():
    sched, cache = make_scheduler()
    system = tokens(40, 9)
    first = system + tokens(5, 1)
    sched.add_request(request("a", first, salt="tenant-a"))
    sched.add_request(request("b", system + tokens(5, 2), salt="tenant-b"))
    sched.add_request(request("c", system + tokens(5, 3)))
    outs = run_to_end(sched, cache)
    assert not any(o.loads for o in outs) and sched.prefix_stats.num_hits == 0
    # b and c hold states of the shared system prompt (chunk ends) under their own salts: drop them.
    for node in cache.snapshots():
        if node.depth != len(first) and cache.is_evictable(node):
            cache.evict(node)
    # a's conversation goes on: the same tokens hit a's prompt-end state only under a's salt.
    follow_up = first + [7] + tokens(5, 4)
    for salt in ("tenant-b", None, "tenant-a"):
        sched.add_request(request(f"d-{salt}", follow_up, salt=salt))
        outs = run_to_end(sched, cache)
        loads = [s.start_position for o in outs for s in o.sequences if o.loads]
        assert loads == ([len(first)] if salt == "tenant-a" else []), salt
        for node in cache.snapshots():  # drop what this request saved under its salt
            if node.depth != len(first) and cache.is_evictable(node):
                cache.evict(node)


def test_followers_pin_their_snapshot_until_loaded_under_eviction_pressure():
    # 2 snapshot rows, 1 slot: followers wait for the slot while other saves want rows.
    sched, cache = make_scheduler(num_rows=2, num_slots=1, max_num_seqs=1)
    system = tokens(40, 11)
    for i in range(3):
        sched.add_request(request(f"g{i}", system + tokens(20, 20 + i), max_tokens=3))
    evicted = []
    evict = cache.evict

    def checked_evict(node):
        assert node.pins == 0 and node.is_ready and node.claimed_by is None and not node.followers
        evicted.append(node.depth)
        return evict(node)

    cache.evict = checked_evict
    outs = run_to_end(sched, cache)
    assert sum(len(o.loads) for o in outs) == 2 and sched.prefix_stats.num_hit_tokens == 80
    assert evicted  # end states and prompt ends competed for the 2 rows
    assert all(node.pins == 0 for node in cache.snapshots())


# -- the engine: cached == uncached ------------------------------------------------------------------


def branching_prompts() -> list[list[int]]:
    """Two levels of sharing (2 systems x 2 documents x 3 questions), a prompt that extends another and
    two identical prompts; every branch point lies >= 16 tokens (MIN_SNAPSHOT_TOKENS) past the last."""
    prompts = []
    for s in range(2):
        system = tokens(37, 100 + s)
        for d in range(2):
            doc = tokens(23, 200 + 10 * s + d)
            prompts += [system + doc + tokens(17 + q, 300 + 100 * s + 10 * d + q) for q in range(3)]
    prompts.append(prompts[0] + tokens(20, 400))
    prompts.append(list(prompts[4]))
    return prompts


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_outputs_with_the_cache_equal_without(demo_model_dir, family):
    prompts = branching_prompts()
    path = demo_model_dir(family)
    expected = LLM(path, enable_prefix_caching=False).generate(prompts, greedy())
    expected_ids = [o.outputs[0].token_ids for o in expected]
    # 24-token budget: leaders' prefills are chunked across the branch points.
    for grouping, budget in ((True, 2048), (True, 24), (False, 24)):
        llm = LLM(path, prefix_grouping=grouping, max_num_seqs=8, max_num_batched_tokens=budget)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy())]
        assert got == expected_ids, (grouping, budget)
        stats = llm.engine.stats()
        assert stats.prefix_cache_hits > 0
        assert stats.prefill_tokens_computed + stats.prefix_cache_hit_tokens == sum(len(p) for p in prompts)
        llm.engine.prefix_cache.check()
        if grouping:
            # Each shared prefix prefilled once: the distinct tokens of the prompt set, plus the last
            # token of the two prompts that end at a branch point (a hit leaves it to prefill). With
            # 24-token chunks a follower may start from a chunk-end snapshot < 16 tokens short of its
            # branch point rather than wait a step for it.
            limit = distinct_tokens(prompts) + 2 if budget == 2048 else 1.1 * distinct_tokens(prompts)
            assert stats.prefill_tokens_computed <= limit


def distinct_tokens(prompts: list[list[int]]) -> int:
    return len({tuple(p[: i + 1]) for p in prompts for i in range(len(p))})


@pytest.mark.parametrize("family", FAMILIES)
def test_n_samples_and_multi_turn_resume_from_cached_states(demo_model_dir, family):
    path = demo_model_dir(family)
    off = LLM(path, enable_prefix_caching=False)
    on = LLM(path, max_num_seqs=8)
    forked = tokens(30, 8)
    params = greedy(10, n=3)
    assert [o.token_ids for o in on.generate([forked, forked[:20]], params)[0].outputs] == [
        o.token_ids for o in off.generate([forked], params)[0].outputs
    ]
    turn1 = tokens(40, 7)
    # Multi-turn: the next prompt is the whole conversation; it resumes from the end state of the last
    # turn, which holds prompt + output[:-1] (the last sampled token was never fed).
    conversation, question = list(turn1), []
    for turn in range(3):
        before = on.engine.stats().prefix_cache_hit_tokens
        out = on.generate([conversation], greedy(12))[0].outputs[0].token_ids
        assert out == off.generate([conversation], greedy(12))[0].outputs[0].token_ids
        if turn:
            # everything but the new question and the previous turn's last sampled token was loaded
            assert on.engine.stats().prefix_cache_hit_tokens - before == len(conversation) - 1 - len(question)
        question = tokens(5, 50 + turn)
        conversation = conversation + out + question


def test_chat_turns_hit_the_previous_turn(demo_model_dir):
    llm = LLM(demo_model_dir())
    off = LLM(demo_model_dir(), enable_prefix_caching=False)
    messages = [{"role": "system", "content": "You are terse. " * 4}, {"role": "user", "content": "Say hi."}]
    first = llm.chat(messages, greedy(12))[0].outputs[0]
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Again."}]
    before = llm.engine.stats().prefix_cache_hit_tokens
    second = llm.chat(messages, greedy(12))[0].outputs[0]
    assert second.token_ids == off.chat(messages, greedy(12))[0].outputs[0].token_ids
    assert llm.engine.stats().prefix_cache_hit_tokens - before >= 40


def test_salted_requests_do_not_share_states(demo_model_dir):
    llm = LLM(demo_model_dir())
    prompt = tokens(60, 3)
    a = llm.generate([prompt], greedy(), cache_salt="a")
    stats = llm.engine.stats()
    b = llm.generate([prompt], greedy(), cache_salt="b")
    assert llm.engine.stats().prefix_cache_hits == stats.prefix_cache_hits
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids
    # (A hit leaves the last prompt token to prefill, so the same prompt again would only hit a chunk end.)
    llm.generate([prompt + [1, 2, 3]], greedy(), cache_salt="a")
    assert llm.engine.stats().prefix_cache_hits == stats.prefix_cache_hits + 1


def test_slots_and_snapshots_stay_within_the_memory_budget(demo_model_dir):
    probe = LLM(demo_model_dir(), enable_prefix_caching=False, max_num_seqs=1)
    per_state = probe.engine.bytes_per_request
    budget = 7 * per_state + per_state // 2  # 7 rows: 4 slots + 3 snapshot rows
    llm = LLM(demo_model_dir(), max_num_seqs=4, state_memory=budget, max_num_batched_tokens=32)
    pool = llm.engine.pool
    assert (pool.num_slots, pool.num_snapshot_rows) == (4, 3)
    assert (pool.num_rows - 1) * per_state <= budget
    held = []
    step = llm.engine.step

    def watched_step():
        deltas = step()
        stats = llm.engine.stats()
        held.append((stats.num_slots_used + stats.prefix_cache_states) * per_state)
        return deltas

    llm.engine.step = watched_step
    prompts = [tokens(30, g) + tokens(8, 100 + i) for g in range(4) for i in range(3)]
    expected = LLM(demo_model_dir(), enable_prefix_caching=False).generate(prompts, greedy())
    got = llm.generate(prompts, greedy())
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert max(held) <= budget and llm.engine.stats().prefix_cache_evictions > 0

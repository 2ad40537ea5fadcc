"""Per-request layer routes (skip / execute / repeat), end to end on the CPU, against checkpoints no routing code
produced: the same checkpoint rewritten by the route (a skipped layer's weights removed, a repeated layer's
duplicated, the layers renumbered and num_hidden_layers edited), served plainly. Every family.

The rewritten model runs each layer on its own state, as the routed request does (a repeated layer's second pass
on its second lane), so tokens must be equal and logprobs equal to fp32 rounding (the routed forward runs the
same ops on sub-batches of rows: measured differences are printed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from linrec import LLM
from linrec.engine.request import EngineRequest
from linrec.engine.sampling_params import InvalidRequestError, SamplingParams
from linrec.models.demo import write_seeded_model
from linrec.models.router import load_routers, write_random_routers

FAMILIES = ("liger_gla", "gla", "gated_deltanet", "mamba2", "lolcats_llama")
NUM_LAYERS = 4
ATOL = 1e-4
PROMPTS = [[72, 101, 108, 108, 111], list(range(40, 53)), [(7 * i + 3) % 256 for i in range(24)]]
CPU = dict(device="cpu", dtype="float32", enable_prefix_caching=False)
ROUTES = [(1, 0, 1, 0), (1, 2, 1, 1), (2, 0, 1, 2)]  # skip {1, 3}; repeat 1; repeat, skip and repeat
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices (tests/conftest.py)


def greedy(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=3)


def rewrite_by_route(src: Path, dst: Path, route: tuple[int, ...]) -> Path:
    """The checkpoint at `src` with its layers as `route` runs them: layer i kept route[i] times, in order."""
    shutil.copytree(src, dst)
    config = json.loads((src / "config.json").read_text())
    order = [i for i, count in enumerate(route) for _ in range(count)]
    weights = load_file(str(src / "model.safetensors"))
    out = {}
    for name, tensor in weights.items():
        parts = name.split(".")
        if "layers" not in parts:
            out[name] = tensor
            continue
        at = parts.index("layers") + 1
        for new, old in enumerate(order):
            if int(parts[at]) == old:
                out[".".join([*parts[:at], str(new), *parts[at + 1 :]])] = tensor.clone()
    config["num_hidden_layers"] = len(order)
    (dst / "config.json").write_text(json.dumps(config))
    save_file(out, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory) -> tuple[str, Path]:
    path = tmp_path_factory.mktemp(f"route-{request.param}") / "model"
    write_seeded_model(path, request.param, {"num_hidden_layers": NUM_LAYERS})
    return request.param, path


def run(llm: LLM, prompts, route=None, max_tokens: int = 6):
    outs = llm.generate(prompts, greedy(max_tokens), layer_route=route)
    return [o.outputs[0] for o in outs]


def max_logprob_diff(a, b) -> float:
    assert a.token_ids == b.token_ids
    return max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs))


def test_a_route_equals_the_checkpoint_rewritten_by_it(family_dir, tmp_path):
    family, path = family_dir
    routed = LLM(
        str(path), max_num_seqs=8, max_num_batched_tokens=16, **CPU
    )  # chunked prefill: 24-token prompt in two steps
    for k, route in enumerate(ROUTES):
        rewritten = LLM(
            str(rewrite_by_route(path, tmp_path / f"r{k}", route)), max_num_seqs=8, max_num_batched_tokens=16, **CPU
        )
        ref = run(rewritten, PROMPTS)
        got = run(routed, PROMPTS, route)
        worst = max(max_logprob_diff(g, r) for g, r in zip(got, ref))
        print(f"{family} route {route}: max |logprob diff| against the rewritten checkpoint {worst:.2e}")
        assert worst < ATOL
    plain = run(routed, PROMPTS)
    assert all(a.token_ids != b.token_ids for a, b in zip(run(routed, PROMPTS, ROUTES[0]), plain))


def test_a_mixed_batch_of_routes_equals_each_request_alone(family_dir):
    family, path = family_dir
    llm = LLM(str(path), **CPU)
    routes = [None, *ROUTES, (1, 1, 1, 1), (0, 0, 0, 0)]
    prompts = [PROMPTS[i % 3] for i in range(len(routes))]
    alone = [run(llm, [p], r)[0] for p, r in zip(prompts, routes)]
    outs = llm.generate(prompts, greedy(), layer_route=routes)
    together = [o.outputs[0] for o in outs]
    worst = max(max_logprob_diff(t, a) for t, a in zip(together, alone))
    print(f"{family}: mixed routes vs alone, max |logprob diff| {worst:.2e}")
    assert worst < ATOL


def test_an_all_ones_route_is_bit_identical_to_no_route(family_dir):
    _family, path = family_dir
    llm = LLM(str(path), **CPU)
    plain = run(llm, PROMPTS)
    ones = run(llm, PROMPTS, (1,) * NUM_LAYERS)
    assert [(o.token_ids, o.logprobs) for o in ones] == [(o.token_ids, o.logprobs) for o in plain]


def test_prefix_cache_keeps_routes_apart_and_cached_equals_uncached(family_dir):
    """A skip route's prefix snapshot serves a later request on the same route (a hit, and the same tokens as
    without the cache) and never one on another route or on none (no hit)."""
    _family, path = family_dir
    prompts = [[(5 * i + 1) % 256 for i in range(40)]] * 2
    cached = LLM(str(path), device="cpu", dtype="float32", enable_prefix_caching=True)
    uncached = LLM(str(path), **CPU)
    skip = (1, 0, 1, 1)
    for _ in range(2):  # the prompt, then its branch point one token short of its end: snapshots of the route
        run(cached, prompts[:1], skip)
    for route, hit in ((None, False), ((0, 1, 1, 1), False), (skip, True)):
        before = cached.engine.stats().prefix_cache_hits
        got = run(cached, prompts[1:], route)
        assert (cached.engine.stats().prefix_cache_hits > before) == hit, route
        ref = run(uncached, prompts[1:], route)
        assert got[0].token_ids == ref[0].token_ids, route
        assert max_logprob_diff(got[0], ref[0]) < ATOL


def test_bad_routes_are_refused_in_one_line(family_dir):
    _family, path = family_dir
    llm = LLM(str(path), **CPU)
    cases = [((1, 1, 1), "expected a layer route of 4 counts in {0, 1, 2}"), ((1, 3, 1, 1), "counts in {0, 1, 2}")]
    for route, message in cases:
        with pytest.raises(InvalidRequestError, match=message.replace("{", r"\{").replace("}", r"\}")):
            llm.engine.add_request(EngineRequest("x", [1, 2], greedy(), layer_route=route))
    with pytest.raises(InvalidRequestError, match="expected n=1 with a route that repeats a layer"):
        params = SamplingParams(max_tokens=2, n=2)
        llm.engine.add_request(EngineRequest("y", [1, 2], params, layer_route=(1, 2, 1, 1)))
    assert run(llm, PROMPTS[:1])  # the engine keeps serving


# ----------------------------------------------------------------------------------------------- routers


@pytest.fixture(scope="module")
def routed_engine(family_dir, tmp_path_factory) -> tuple[str, Path, Path]:
    family, path = family_dir
    config = json.loads((path / "config.json").read_text())
    router = tmp_path_factory.mktemp(f"router-{family}") / "router"
    write_random_routers(router, NUM_LAYERS, config["hidden_size"], seed=3)
    return family, path, router


def test_auto_routes_equal_the_explicit_route_they_decide(routed_engine):
    """The routers decide a route per prompt at its first prefill step; serving that route explicitly, and the
    checkpoint rewritten by it, give the same tokens. Different prompts and skip biases give different routes."""
    family, path, router = routed_engine
    llm = LLM(str(path), router=str(router), **CPU)
    prompts = PROMPTS + [[(11 * i + 5) % 256 for i in range(30)], [3] * 9]
    auto = run(llm, prompts, "auto")
    routes = [o.layer_route for o in auto]
    print(f"{family}: routes decided {routes}")
    assert all(r is not None and len(r) == NUM_LAYERS for r in routes)
    explicit = [run(llm, [p], r)[0] for p, r in zip(prompts, routes)]
    for a, e in zip(auto, explicit):
        assert max_logprob_diff(a, e) < ATOL
    skippy = llm.generate(prompts, greedy(), layer_route="auto", layer_route_skip_bias=50.0)
    assert all(o.outputs[0].layer_route == (0,) * NUM_LAYERS for o in skippy)  # a large bias skips every layer
    assert len(set(routes)) > 1  # the seeded routers route by the input


def test_auto_routes_beside_others_equal_each_alone(routed_engine):
    _family, path, router = routed_engine
    llm = LLM(str(path), router=str(router), max_num_seqs=8, max_num_batched_tokens=16, **CPU)
    routes = ["auto", None, ROUTES[1], "auto"]
    prompts = [PROMPTS[i % 3] for i in range(len(routes))]
    alone = [run(llm, [p], r)[0] for p, r in zip(prompts, routes)]
    together = [o.outputs[0] for o in llm.generate(prompts, greedy(), layer_route=routes)]
    assert [t.layer_route for t in together] == [a.layer_route for a in alone]
    assert max(max_logprob_diff(t, a) for t, a in zip(together, alone)) < ATOL


def test_router_files_are_checked_in_one_line(routed_engine, tmp_path):
    family, path, router = routed_engine
    with pytest.raises(InvalidRequestError, match="expected layer routers for layer_route 'auto'"):
        LLM(str(path), **CPU).engine.add_request(EngineRequest("a", [1, 2], greedy(), layer_route="auto"))
    hidden = json.loads((path / "config.json").read_text())["hidden_size"]
    wrong = write_random_routers(tmp_path / "wrong", NUM_LAYERS + 1, hidden)
    with pytest.raises(ValueError, match=f"expected num_layers {NUM_LAYERS} .the model's., got {NUM_LAYERS + 1}"):
        load_routers(wrong, NUM_LAYERS, hidden, "cpu")
    with pytest.raises(ValueError, match=f"expected hidden_size {hidden + 1} .the model's., got {hidden}"):
        load_routers(router, NUM_LAYERS, hidden + 1, "cpu")
    broken = tmp_path / "broken"
    shutil.copytree(router, broken)
    tensors = load_file(str(broken / "router.safetensors"))
    del tensors["layers.2.out.bias"]
    save_file(tensors, str(broken / "router.safetensors"))
    with pytest.raises(ValueError, match=r"expected tensor 'layers.2.out.bias' \[3\], missing"):
        load_routers(broken, NUM_LAYERS, hidden, "cpu")
    with pytest.raises(FileNotFoundError, match="expected a router file"):
        load_routers(tmp_path / "nowhere", NUM_LAYERS, hidden, "cpu")
    del family


def test_routes_with_lora_and_sparse_adapters_beside_each_other_equal_each_alone(tmp_path):
    """A routed layer's sub-batch carries its rows' LoRA slots and sparse add-on: LoRA and sparse requests on
    routes, beside each other and base requests, get what they get alone, and the adapters change the tokens."""
    from linrec.bench.sparse import sparse_deltas, write_equivalent_lora
    from linrec.engine.adapters import LoRARequest
    from linrec.models.sparse import write_sparse_delta

    path = write_seeded_model(tmp_path / "m", "liger_gla", {"num_hidden_layers": NUM_LAYERS})
    llm = LLM(str(path), enable_lora=True, max_loras=2, max_lora_rank=64, **CPU)
    projections = {name: (m.in_features, m.out_features) for name, m in llm.engine.model.projections().items()}
    lora = LoRARequest("lora", 1, str(write_equivalent_lora(tmp_path / "lora", projections, 0.5, seed=1)))
    sparse_dir = write_sparse_delta(tmp_path / "sparse", sparse_deltas(projections, 0.5, seed=2))
    sparse = LoRARequest("sparse", 2, str(sparse_dir))
    cases = [(lora, ROUTES[0]), (sparse, ROUTES[1]), (None, ROUTES[2]), (lora, None), (sparse, ROUTES[0])]
    prompts = [PROMPTS[i % 3] for i in range(len(cases))]
    alone = []
    for prompt, (adapter, route) in zip(prompts, cases):
        alone.append(llm.generate([prompt], greedy(), lora_request=adapter, layer_route=route)[0].outputs[0])
    outs = llm.generate(prompts, greedy(), lora_request=[a for a, _ in cases], layer_route=[r for _, r in cases])
    together = [o.outputs[0] for o in outs]
    assert max(max_logprob_diff(t, a) for t, a in zip(together, alone)) < ATOL
    base = [llm.generate([p], greedy(), layer_route=r)[0].outputs[0] for p, (_, r) in zip(prompts, cases)]
    assert all(t.token_ids != b.token_ids for t, b, (a, _) in zip(together, base, cases) if a is not None)


def test_routed_decode_steps_never_replay_a_cuda_graph(family_dir):
    """Captured decode graphs run the plain layer loop: the runner must run routed steps eagerly. A stand-in for
    the graphs (CUDA is not here) records every replay; routed requests' decode steps make none, and an
    unrouted one does (the stand-in is wired)."""
    _family, path = family_dir
    llm = LLM(str(path), **CPU)
    replays = []

    class Graphs:
        max_batch_size = 8

        def replay(self, *args):
            replays.append(args)
            raise RuntimeError("replayed")

    llm.engine.runner.decode_graphs = Graphs()
    ref = run(LLM(str(path), **CPU), PROMPTS, ROUTES[1])
    assert [o.token_ids for o in run(llm, PROMPTS, ROUTES[1])] == [o.token_ids for o in ref]
    assert not replays
    llm.generate(PROMPTS[:1], greedy(2))  # the replay raises: the engine ends the request with an error
    assert replays


def most_running_while(llm: LLM, prompts, routes) -> tuple[list, int, dict]:
    """Each answer, the most sequences any step ran, and the engine's row stats at that step."""
    scheduler, engine = llm.engine.scheduler, llm.engine
    original = scheduler.schedule
    most: dict = {"running": 0, "stats": None}

    def watch():
        out = original()
        if len(out.sequences) > most["running"]:
            most["running"], most["stats"] = len(out.sequences), engine.stats()
        return out

    scheduler.schedule = watch
    try:
        outs = [o.outputs[0] for o in llm.generate(prompts, greedy(), layer_route=routes)]
    finally:
        scheduler.schedule = original
    return outs, most["running"], most["stats"]


def test_state_memory_follows_the_route_skipped_rows_serve_other_requests(family_dir):
    """A pool of 2 slots runs 2 requests without a route at once, but 4 whose routes skip complementary halves
    of the layers (each layer's 2 rows are enough); the rows held and their bytes follow the routes, and every
    answer equals the request alone."""
    _family, path = family_dir
    probe = LLM(str(path), **CPU)
    per_request = probe.engine.bytes_per_request
    del probe
    llm = LLM(str(path), max_num_seqs=4, state_memory=2 * per_request, **CPU)
    assert llm.engine.num_slots == 2
    halves = [(1, 1, 0, 0), (0, 0, 1, 1)] * 2
    prompts = [PROMPTS[i % 3] for i in range(4)]
    alone = [run(llm, [p], r)[0] for p, r in zip(prompts, halves)]
    together, most, stats = most_running_while(llm, prompts, halves)
    assert most == 4 and stats.num_slots_used == 4
    assert stats.num_state_rows_used == stats.num_state_rows_total == 2 * NUM_LAYERS
    assert stats.state_bytes_used == 2 * per_request  # four requests, two requests' worth of state
    assert max(max_logprob_diff(t, a) for t, a in zip(together, alone)) < ATOL
    _outs, most, stats = most_running_while(llm, prompts, None)
    assert most == 2 and stats.state_bytes_used == 2 * per_request
    after = llm.engine.stats()
    assert after.num_state_rows_used == after.num_slots_used == after.state_bytes_used == 0  # all given back


def test_a_repeat_holds_a_second_row_of_each_repeated_layer_only(family_dir):
    """With 3 slots (12 layer rows), two requests repeating different layers hold 5 rows each and run together;
    a request without a route then finds no whole slot and waits; one without a route and one repeat share the
    12 rows. Every answer equals the request alone."""
    _family, path = family_dir
    probe = LLM(str(path), **CPU)
    per_request = probe.engine.bytes_per_request
    del probe
    llm = LLM(str(path), max_num_seqs=4, state_memory=3 * per_request, **CPU)
    routes = [(1, 2, 1, 1), (1, 1, 2, 1), None]
    alone = [run(llm, [p], r)[0] for p, r in zip(PROMPTS, routes)]
    together, most, stats = most_running_while(llm, PROMPTS, routes)
    assert most == 2 and stats.num_state_rows_used == 10  # 4 + 1 each: the third waits for a whole slot
    assert stats.state_bytes_used == 2 * per_request + 2 * per_request // NUM_LAYERS
    assert max(max_logprob_diff(t, a) for t, a in zip(together, alone)) < ATOL
    assert llm.engine.stats().num_state_rows_used == 0
    plain = [None, (1, 1, 2, 1)]
    _outs, most, stats = most_running_while(llm, PROMPTS[:2], plain)
    assert most == 2 and stats.num_state_rows_used == 9  # a slot, and a repeat: they share 12 rows


def test_an_engine_with_one_row_per_layer_refuses_repeats_in_one_line(family_dir):
    _family, path = family_dir
    llm = LLM(str(path), max_num_seqs=1, **CPU)
    for route in ((1, 2, 1, 1), "auto"):
        with pytest.raises(InvalidRequestError, match=r"^expected a pool of 2 or more request rows to repeat a layer"):
            llm.engine.add_request(EngineRequest("x", [1, 2], greedy(), layer_route=route))
    assert run(llm, PROMPTS[:1], ROUTES[0])  # skips need fewer rows, not more


def test_per_prompt_arguments_of_the_wrong_length_are_refused_in_one_line(family_dir):
    """LLM.generate takes one value for every prompt or one per prompt, for sampling params, adapters and routes
    alike; a list of the wrong length names the argument."""
    from linrec.engine.adapters import LoRARequest

    _family, path = family_dir
    llm = LLM(str(path), **CPU)
    two = PROMPTS[:2]
    for kwargs, what in (
        ({"sampling_params": [greedy()] * 3}, "SamplingParams"),
        ({"lora_request": [None, LoRARequest("x", 1, "nowhere"), None]}, "lora_request"),
        ({"layer_route": [None, ROUTES[0], "auto"]}, "layer_route"),
    ):
        with pytest.raises(ValueError, match=f"^expected one {what} per prompt, got 3 for 2$"):
            llm.generate(two, **kwargs)
    assert [o.outputs[0].layer_route for o in llm.generate(two, greedy(), layer_route=[ROUTES[0], None])] == [
        ROUTES[0],
        None,
    ]


def test_bad_routing_flags_are_one_line_errors(family_dir, tmp_path):
    _family, path = family_dir
    with pytest.raises(FileNotFoundError, match="^expected a router file .*router_config.json .docs/routing.md.$"):
        LLM(str(path), router=str(tmp_path / "nowhere"), **CPU)


def test_a_failed_step_rebuilds_routed_requests_on_their_own_rows(family_dir):
    """A step that raises quarantines its requests and rebuilds their states: routed ones (rows per layer, second
    lanes) are reset and prefilled again on their own rows, answer as if nothing happened, and give every row
    back; the request the fault is traced to fails alone."""
    _family, path = family_dir
    routes = [ROUTES[0], ROUTES[1], ROUTES[2], None]
    prompts = [PROMPTS[i % 3] for i in range(4)]
    llm = LLM(str(path), max_num_seqs=8, **CPU)
    clean = [run(llm, [p], r, max_tokens=12)[0] for p, r in zip(prompts, routes)]  # room for 4 quarantine rounds
    engine = llm.engine
    forward = engine.runner._forward
    poison = [5, 6, 201, 202, 203, 7]
    raised = []

    def failing(seqs, *args):
        hidden = forward(seqs, *args)  # the states are half updated, as a real fault would leave them
        if any(s.request_id == "poison" and s.start_position > len(poison) for s in seqs):
            raised.append(1)
            raise RuntimeError("injected fault")
        return hidden

    engine.runner._forward = failing
    for i, (p, r) in enumerate(zip(prompts, routes)):
        engine.add_request(EngineRequest(f"r{i}", p, greedy(12), layer_route=r))
    engine.add_request(EngineRequest("poison", poison, greedy(12), layer_route=ROUTES[1]))
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            tokens[delta.request_id] = tokens.get(delta.request_id, []) + delta.token_ids
            reasons[delta.request_id] = delta.finish_reason or reasons.get(delta.request_id)
    assert raised and reasons["poison"] == "error"
    assert [tokens[f"r{i}"] for i in range(4)] == [c.token_ids for c in clean]
    stats = engine.stats()
    assert stats.num_state_rows_used == stats.num_slots_used == 0 and engine.scheduler.num_suspects == 0


def test_n_samples_of_a_skip_route_fork_onto_rows_of_their_own(family_dir):
    """n > 1 with a route that skips layers: the children hold rows of the executed layers only and fork the
    parent's prefilled state into them; beside a request without a route, every greedy sample equals the
    request alone."""
    _family, path = family_dir
    llm = LLM(str(path), max_num_seqs=8, **CPU)
    alone = run(llm, PROMPTS[:1], ROUTES[0])[0].token_ids
    plain = run(llm, PROMPTS[1:2])[0].token_ids
    three = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=3)
    outs = llm.generate(PROMPTS[:2], [three, greedy()], layer_route=[ROUTES[0], None])
    assert [o.token_ids for o in outs[0].outputs] == [alone] * 3 and outs[1].outputs[0].token_ids == plain
    assert llm.engine.stats().num_state_rows_used == 0


def test_an_auto_request_aborted_while_its_deciding_step_runs_gives_back_every_row(routed_engine):
    """The routers decide during the step; an abort that lands before the scheduler folds the step in has given
    back the request's rows already, and the decided route must not give them back twice."""
    _family, path, router = routed_engine
    llm = LLM(str(path), router=str(router), max_num_seqs=4, **CPU)
    engine = llm.engine
    forward = engine.runner._forward

    def aborting(seqs, *args):
        hidden = forward(seqs, *args)
        engine.abort(["auto"])
        return hidden

    engine.runner._forward = aborting
    engine.add_request(EngineRequest("auto", PROMPTS[1], greedy(), layer_route="auto"))
    scheduler = engine.scheduler
    engine.step()
    engine.runner._forward = forward
    assert engine.scheduler is scheduler  # no bookkeeping failure (which resets the engine)
    assert not engine.has_unfinished() and engine.stats().num_state_rows_used == 0
    assert run(llm, PROMPTS[:1], "auto")  # and the engine serves the next one


def test_route_state_rows_give_repeats_their_second_rows(family_dir):
    """Two requests repeating every layer need 4 rows of each layer: with 2 slots they take turns, and 2 rows of
    --route-state-rows let them run together."""
    _family, path = family_dir
    repeat = (2, 2, 2, 2)
    _outs, most, _stats = most_running_while(LLM(str(path), max_num_seqs=2, **CPU), PROMPTS[:2], repeat)
    assert most == 1
    llm = LLM(str(path), max_num_seqs=2, route_state_rows=2, **CPU)
    assert llm.engine.num_slots == 4
    outs, most, stats = most_running_while(llm, PROMPTS[:2], repeat)
    assert most == 2 and stats.num_state_rows_used == 4 * NUM_LAYERS
    assert [o.token_ids for o in outs] == [run(llm, [p], repeat)[0].token_ids for p in PROMPTS[:2]]


def test_a_route_packed_into_one_row_id_runs_the_plain_path_where_everyone_executes(family_dir):
    """The allocator packs a skip route into one row id when it can; that id goes as the sequence's slot, so a layer
    every sequence runs takes the plain path (no sub-batch), and the answer is the request's alone."""
    from linrec.models.batch import ForwardBatch

    _family, path = family_dir
    llm = LLM(str(path), max_num_seqs=4, **CPU)
    alone = run(llm, PROMPTS[:1], ROUTES[0])[0]
    scheduler = llm.engine.scheduler
    original, outs = scheduler.schedule, []
    scheduler.schedule = lambda: outs.append(original()) or outs[-1]
    selects = []
    select = ForwardBatch.select
    ForwardBatch.select = lambda self, *a: selects.append(a) or select(self, *a)
    try:
        together = run(llm, [PROMPTS[0], PROMPTS[0]], [ROUTES[0], ROUTES[0]])
    finally:
        ForwardBatch.select = select
    rows = [set(s.layer_rows) - {0} for s in outs[0].sequences]
    assert all(len(r) == 1 for r in rows) and [s.slot_id for s in outs[0].sequences] == [r.pop() for r in rows]
    assert not selects  # both skip layers 1 and 3: every layer is run by both or by neither
    assert [o.token_ids for o in together] == [alone.token_ids] * 2

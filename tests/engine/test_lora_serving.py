"""Per-request LoRA serving, end to end on the CPU, against references nobody here wrote.

- PEFT itself, unmerged: transformers' Mamba2 wrapped by PEFT, and linrec's own GLA, Gated DeltaNet and
  Liger-GLA models wrapped by PEFT (their projections are nn.Linear subclasses, so PEFT's lora.Linear runs
  its own B(A x) * scaling on them); greedy by full forwards, no cache.
- The adapter merged at load (LLM(merge_lora=...)), whose weights equal PEFT's merge_and_unload()
  (tests/models/test_lora.py).

Adapters come from PEFT with every LoRA tensor random and nonzero (PEFT zero-initializes B, which would make
any serving path look right), or are written by hand in PEFT's format where a test needs exact tensors.
Tolerances are fp32: per request the engine adds scaling * B (A x) to W x, a merge adds scaling * B A to W
first, and the two differ by rounding only (measured: 1e-6 to 3e-5 on logits and logprobs; greedy margins are
0.001 to 0.01, so every token comparison is far from a tie).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from linrec import LLM
from linrec.engine.adapters import AdapterExistsError, AdapterNotFoundError, LoRARequest
from linrec.engine.request import CompletionOutput, EngineRequest
from linrec.engine.sampling_params import InvalidRequestError, SamplingParams
from linrec.models.batch import ForwardBatch
from linrec.models.demo import demo_llama_config
from linrec.models.loader import load_model
from linrec.models.lora import place_lora_adapter, read_lora_adapter
from linrec.models.tokenizer import DEMO_VOCAB_SIZE, demo_special_token_ids, write_byte_tokenizer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# fp32: logits and logprobs of two LoRA paths equal in exact arithmetic (printed by each test: <= 3e-5).
ATOL = 1e-4
MAX_TOKENS = 8
# Three prompts of 5, 13 and 24 byte tokens (24 >= the prefix cache's minimum snapshot of 16 tokens).
PROMPTS = [[72, 101, 108, 108, 111], list(range(40, 53)), [(7 * i + 3) % 256 for i in range(24)]]
CPU = dict(device="cpu", dtype="float32")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these matrices are tiny, and on a shared 2-core machine a second thread only waits
    for the other tenant (measured: 5 ms instead of 20 us per [40, 64] x [64, 64] matmul under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def greedy(max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


# ---------------------------------------------------------------------------------------------- helpers


def randomize_lora(peft_model, seed: int, std: float = 0.3) -> None:
    """Make every LoRA tensor of a PeftModel random and nonzero, B included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def peft_adapter(model: torch.nn.Module, adapter_dir: Path, seed: int, **lora_config):
    """Wrap `model` (in place) with a random nonzero PEFT LoRA adapter, save it, return the PeftModel."""
    peft_model = peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **lora_config))
    randomize_lora(peft_model, seed)
    peft_model.eval()
    peft_model.save_pretrained(str(adapter_dir))
    return peft_model


def write_adapter(adapter_dir: Path, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, **config):
    """PEFT's adapter format by hand: {module: (lora_A [r, in], lora_B [out, r])}."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    targets = sorted({module.rsplit(".", 1)[-1] for module in tensors})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": targets, **config}
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    flat = {}
    for module, (a, b) in tensors.items():
        flat[f"base_model.model.{module}.lora_A.weight"] = a.clone()
        flat[f"base_model.model.{module}.lora_B.weight"] = b.clone()
    save_file(flat, str(adapter_dir / "adapter_model.safetensors"))
    return adapter_dir


def random_pair(rank: int, n_in: int, n_out: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, n_in, generator=generator) * 0.3, torch.randn(n_out, rank, generator=generator) * 0.3


def linrec_forward(model, ids: list[int], batch: ForwardBatch | None = None) -> torch.Tensor:
    """linrec's full-sequence logits [T, V] from a fresh state (no engine, no cache)."""
    batch = batch or ForwardBatch.build([len(ids)])
    return model.compute_logits(model(torch.tensor(ids), batch, model.allocate_state(2)))


@torch.no_grad()
def slot_logits(model_dir, adapter_dir, ids: list[int], max_rank: int = 8, **load: str) -> torch.Tensor:
    """linrec's raw logits [T, V] with the adapter in device slot 0 of every projection: the model path the
    engine serves a request with (place_lora_adapter, Projection slots, lora_add_), without the engine."""
    model = load_model(model_dir, **CPU, **load)
    model.enable_lora(1, max_rank)
    projections = model.projections()
    shapes = {name: (p.in_features, p.out_features) for name, p in projections.items()}
    weights = place_lora_adapter(read_lora_adapter(adapter_dir), "ref", shapes, max_rank, torch.float32)
    for name, proj in projections.items():
        proj.set_lora_slot(0, *weights.modules.get(name, (None, None)))
    return linrec_forward(model, ids, ForwardBatch.build([len(ids)], adapter_slots=[0], num_adapter_slots=1))


@torch.no_grad()
def full_forward_greedy(logits_of, prompt: list[int], num_tokens: int = MAX_TOKENS):
    """Greedy by a full forward over the whole sequence at each step. logits_of(ids) -> [T, V].
    Returns the tokens and each step's last-position logits [num_tokens, V]."""
    ids, steps = list(prompt), []
    for _ in range(num_tokens):
        logits = logits_of(ids)[-1].float()
        steps.append(logits)
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :], torch.stack(steps)


def margin(logits: torch.Tensor) -> float:
    """Smallest gap between the best and second-best logit over steps [N, V]: the distance from a tie."""
    top2 = logits.topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def logprobs_vs_logits(ours: CompletionOutput, logits: torch.Tensor) -> float:
    """Max |engine logprob - log_softmax(reference logits)| over each step's sampled and top tokens."""
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert ours.logprobs is not None and len(ours.logprobs) == len(ref)
    return max(
        abs(v - ref[i, t].item()) for i, lp in enumerate(ours.logprobs) for t, v in [(lp.token_id, lp.logprob), *lp.top]
    )


def logprobs_diff(ours: CompletionOutput, ref: CompletionOutput) -> float:
    """Max |logprob difference| of two samples with the same tokens: the sampled token's and the top-k values
    in rank order (two near-equal alternatives may trade places)."""
    assert ours.token_ids == ref.token_ids
    diff = 0.0
    for a, b in zip(ours.logprobs, ref.logprobs):
        diff = max(diff, abs(a.logprob - b.logprob), *(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)))
    return diff


def first(outputs) -> list[CompletionOutput]:
    return [o.outputs[0] for o in outputs]


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def drain(engine, out: dict[str, list[int]] | None = None, record=None) -> dict[str, list[int]]:
    """Step the engine to the end, adding each request's sample-0 tokens to `out` ({request id: tokens}).
    record(engine) runs after each step."""
    out = {} if out is None else out
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.index == 0:
                out.setdefault(delta.request_id, []).extend(delta.token_ids)
        if record is not None:
            record(engine)
    return out


def one_line(exc_info: pytest.ExceptionInfo) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message, message
    return message


# --------------------------------------------------------------------------------- Llama as Liger-GLA


def build_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **demo_llama_config(),
        initializer_range=0.1,  # peaked logits: greedy choices far from ties
        **demo_special_token_ids(),
    )
    return transformers.LlamaForCausalLM(config).eval()


ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# Four adapters (ranks 2..8, scalings from alpha/r, rsLoRA and per-module patterns) for one max_lora_rank=8.
LLAMA_ADAPTERS = {
    "all_r8": dict(r=8, lora_alpha=16, target_modules=ATTN + MLP),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"], use_rslora=True),
    "patterns": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={"layers.1.self_attn.v_proj": 3},
    ),
    "kv_mlp": dict(r=6, lora_alpha=3, target_modules=["k_proj", "up_proj", "down_proj"]),
}
LIGER = dict(linearize="liger-gla", **CPU)
LORA = dict(enable_lora=True, max_lora_rank=8)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> SimpleNamespace:
    """A tiny Llama served as Liger-GLA, four PEFT adapters, and references: each adapter merged at load
    (an LLM per adapter) and the base model without LoRA, greedy with logprobs=5 over PROMPTS."""
    root = tmp_path_factory.mktemp("lora-llama")
    model_dir = root / "llama"
    build_llama().save_pretrained(str(model_dir), safe_serialization=True)
    write_byte_tokenizer(model_dir)
    paths = {}
    for seed, (name, config) in enumerate(LLAMA_ADAPTERS.items(), start=1):
        paths[name] = str(root / name)
        peft_adapter(build_llama(), root / name, seed, **config)
    # references never use the prefix cache: what they say depends on nothing but the weights
    merged = {
        name: LLM(str(model_dir), merge_lora=path, enable_prefix_caching=False, **LIGER) for name, path in paths.items()
    }
    base = LLM(str(model_dir), enable_prefix_caching=False, **LIGER)
    params = greedy(logprobs=5)
    refs = {name: first(llm.generate(PROMPTS, params)) for name, llm in merged.items()}
    refs[None] = first(base.generate(PROMPTS, params))
    for name in paths:  # each adapter changes what the model says: a no-op serving path cannot pass
        assert [o.token_ids for o in refs[name]] != [o.token_ids for o in refs[None]], name
    return SimpleNamespace(root=root, dir=str(model_dir), paths=paths, merged=merged, base=base, refs=refs)


def lora_requests(llama, names) -> list[LoRARequest | None]:
    ids = {name: i for i, name in enumerate(LLAMA_ADAPTERS, start=1)}
    return [None if n is None else LoRARequest(n, ids[n], llama.paths[n]) for n in names]


def test_liger_per_request_equals_merged_and_peft_unmerged(llama):
    """Four adapters and the base model in one batch == each adapter merged at load; and == PEFT's unmerged
    LoRA on linrec's Liger-GLA model (PEFT applies rank_pattern, alpha_pattern and rsLoRA itself)."""
    llm = LLM(llama.dir, max_loras=4, **LORA, **LIGER)
    names = [*LLAMA_ADAPTERS, None]
    prompts = [p for _ in names for p in PROMPTS]
    requests = [r for r in lora_requests(llama, names) for _ in PROMPTS]
    outs = first(llm.generate(prompts, greedy(logprobs=5), lora_request=requests))
    worst = 0.0
    for i, name in enumerate(names):
        for ours, ref in zip(outs[3 * i : 3 * i + 3], llama.refs[name]):
            assert ours.token_ids == ref.token_ids, name
            worst = max(worst, logprobs_diff(ours, ref))
    print(f"liger-gla per-request vs merged: max |logprob diff| {worst:.2e}")
    assert worst < ATOL

    for name, path in llama.paths.items():
        peft_model = peft.PeftModel.from_pretrained(load_model(llama.dir, **LIGER), path).eval()
        lp_diff, logit_diff, gap = 0.0, 0.0, float("inf")
        for ours, prompt in zip(outs[3 * names.index(name) :], PROMPTS):
            expected, logits = full_forward_greedy(partial(linrec_forward, peft_model), prompt)
            assert ours.token_ids == expected, name
            lp_diff, gap = max(lp_diff, logprobs_vs_logits(ours, logits)), min(gap, margin(logits))
            sequence = prompt + expected
            with torch.no_grad():
                theirs = linrec_forward(peft_model, sequence)
            raw = slot_logits(llama.dir, path, sequence, linearize="liger-gla")
            logit_diff = max(logit_diff, (raw - theirs).abs().max().item())
        print(
            f"liger-gla {name} vs PEFT unmerged: max |logprob diff| {lp_diff:.2e}, "
            f"max |raw logit diff| {logit_diff:.2e}, greedy margin {gap:.3f}"
        )
        assert lp_diff < ATOL and logit_diff < ATOL


def test_mixed_batch_equals_each_request_alone_and_slots_are_reused(llama):
    """Adapters and base requests batched == each run alone; with 2 slots for 4 adapters, requests wait for a
    slot (never more than 2 adapters running) and each still gets its own adapter."""
    names = [None, "all_r8", "rslora", None, "patterns", "kv_mlp", "rslora", "all_r8"]
    prompts = [PROMPTS[i % 3] for i in range(len(names))]
    requests = lora_requests(llama, names)
    llm = LLM(llama.dir, max_loras=4, **LORA, **LIGER)
    alone = [tokens(llm.generate([p], greedy(), lora_request=r))[0] for p, r in zip(prompts, requests)]
    assert alone == [llama.refs[n][i % 3].token_ids for i, n in enumerate(names)]
    assert tokens(llm.generate(prompts, greedy(), lora_request=requests)) == alone

    two = LLM(llama.dir, max_loras=2, **LORA, **LIGER)
    for request in requests:
        if request is not None and request.lora_name not in two.engine.adapters:
            two.engine.adapters.load(request.lora_name, request.lora_path)
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        two.engine.add_request(EngineRequest(str(i), prompt, greedy(), lora_name=name))
    seen = SimpleNamespace(max_running=0, waited=False)

    def record(engine) -> None:
        stats = engine.stats()
        seen.max_running = max(seen.max_running, len(stats.running_lora_adapters))
        seen.waited |= bool(set(stats.waiting_lora_adapters) - set(stats.running_lora_adapters))

    out = drain(two.engine, record=record)
    assert [out[str(i)] for i in range(len(names))] == alone
    assert seen.max_running == 2 and seen.waited


def test_base_requests_bit_identical_with_lora_enabled(llama):
    """Base requests on an engine with LoRA slots (alone, or batched with adapter requests) give exactly the
    tokens and logprob floats of an engine without LoRA, in the same batch shape."""
    params = greedy(logprobs=5)
    without = first(LLM(llama.dir, **LIGER).generate(PROMPTS * 2, params))
    base_only = first(LLM(llama.dir, max_loras=2, **LORA, **LIGER).generate(PROMPTS * 2, params))
    assert [(o.token_ids, o.logprobs) for o in base_only] == [(o.token_ids, o.logprobs) for o in without]

    # Without the prefix cache: with it, the base model's repeated prompts would share a prefill where the
    # adapter's do not, and a different batch shape rounds differently (a different GEMM blocking).
    without = first(LLM(llama.dir, enable_prefix_caching=False, **LIGER).generate(PROMPTS * 2, params))
    llm = LLM(llama.dir, max_loras=2, enable_prefix_caching=False, **LORA, **LIGER)
    requests = [None] * 3 + lora_requests(llama, ["all_r8", "rslora", "all_r8"])
    mixed = first(llm.generate(PROMPTS * 2, params, lora_request=requests))
    assert [(o.token_ids, o.logprobs) for o in mixed[:3]] == [(o.token_ids, o.logprobs) for o in without[:3]]
    assert [o.token_ids for o in mixed[3:]] != [o.token_ids for o in without[3:]]


def test_fused_qkv_and_gate_up_adapter_equals_split(llama):
    """lora_B rows stacked q, k, v (gate, up) under one shared lora_A == the same adapter split by module."""
    generator = torch.Generator().manual_seed(7)
    hidden, q_out, kv_out, inter, rank = 64, 64, 32, 96, 4
    fused, split = {}, {}
    for layer in range(2):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        a, b = random_pair(rank, hidden, q_out + 2 * kv_out, generator)
        fused[f"{attn}.qkv_proj"] = (a, b)
        for part, rows in zip(["q", "k", "v"], b.split([q_out, kv_out, kv_out])):
            split[f"{attn}.{part}_proj"] = (a, rows)
        a, b = random_pair(rank, hidden, 2 * inter, generator)
        fused[f"{mlp}.gate_up_proj"] = (a, b)
        for part, rows in zip(["gate", "up"], b.split([inter, inter])):
            split[f"{mlp}.{part}_proj"] = (a, rows)
    write_adapter(llama.root / "fused", fused, rank, lora_alpha=6)
    write_adapter(llama.root / "split", split, rank, lora_alpha=6)
    llm = LLM(llama.dir, max_loras=2, **LORA, **LIGER)
    requests = [LoRARequest("fused", 1, str(llama.root / "fused"))] * 3
    requests += [LoRARequest("split", 2, str(llama.root / "split"))] * 3
    outs = first(llm.generate(PROMPTS * 2, greedy(logprobs=5), lora_request=requests))
    diff = max(logprobs_diff(f, s) for f, s in zip(outs[:3], outs[3:]))
    print(f"fused vs split adapter: max |logprob diff| {diff:.2e}")
    assert diff < ATOL
    assert [o.token_ids for o in outs[:3]] != [o.token_ids for o in llama.refs[None]]


def test_refusals_are_one_line_and_the_engine_keeps_serving(llama):
    """Every adapter per-request serving cannot take is refused with one line naming what was expected; nothing
    is registered or queued, and the engine goes on serving base and adapter requests."""
    root, generator = llama.root / "bad", torch.Generator().manual_seed(3)
    q = "model.layers.0.self_attn.q_proj"
    bad: dict[str, tuple[Path, type[Exception], list[str]]] = {}
    bad["missing"] = (root / "nowhere", FileNotFoundError, ["nowhere", "does not exist"])
    dora = write_adapter(root / "dora", {q: random_pair(4, 64, 64, generator)}, 4, use_dora=True)
    bad["dora"] = (dora, ValueError, ["DoRA"])
    rotary = "model.layers.0.self_attn.rotary"
    path = write_adapter(root / "rotary", {rotary: random_pair(4, 64, 64, generator)}, 4)
    bad["rotary"] = (path, ValueError, [rotary, "not a projection"])
    path = write_adapter(root / "lm_head", {"lm_head": random_pair(4, 64, DEMO_VOCAB_SIZE, generator)}, 4)
    bad["lm_head"] = (path, ValueError, ["'lm_head'", "not a projection"])
    path = write_adapter(root / "rank16", {q: random_pair(16, 64, 64, generator)}, 16)
    bad["rank16"] = (path, ValueError, ["rank 16", "max_lora_rank=8"])
    peft_adapter(
        build_llama(), root / "saves", 1, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    bad["saves"] = (root / "saves", ValueError, ["modules_to_save", "lm_head"])
    peft_adapter(build_llama(), root / "embed", 1, r=4, lora_alpha=8, target_modules=["embed_tokens"])
    bad["embed"] = (root / "embed", ValueError, ["model.embed_tokens", "embedding"])

    llm = LLM(llama.dir, max_loras=2, **LORA, **LIGER)
    for name, (path, error, expected) in bad.items():
        with pytest.raises(error) as e:
            llm.generate([PROMPTS[0]], greedy(), lora_request=LoRARequest(name, 1, str(path)))
        message = one_line(e)
        assert all(s in message for s in expected), (name, message)
        assert name not in llm.engine.adapters and not llm.engine.has_unfinished()

    with pytest.raises(AdapterNotFoundError) as e:
        llm.engine.add_request(EngineRequest("r", PROMPTS[0], greedy(), lora_name="never-loaded"))
    assert "never-loaded" in one_line(e) and not llm.engine.has_unfinished()
    llm.engine.adapters.load("dup", llama.paths["rslora"])
    with pytest.raises(AdapterExistsError) as e:
        llm.engine.adapters.load("dup", llama.paths["all_r8"])
    assert "dup" in one_line(e) and [a.name for a in llm.engine.adapters.list()] == ["dup"]

    # still serving: base and adapter requests, each its own reference
    requests = [None, LoRARequest("dup", 1, ""), *lora_requests(llama, ["all_r8"])]
    assert tokens(llm.generate(PROMPTS, greedy(), lora_request=requests)) == [
        llama.refs[None][0].token_ids,
        llama.refs["rslora"][1].token_ids,
        llama.refs["all_r8"][2].token_ids,
    ]

    # an engine without enable_lora refuses adapters by name (the LLM front end and the engine request)
    with pytest.raises(ValueError) as e:
        llama.base.generate([PROMPTS[0]], greedy(), lora_request=lora_requests(llama, ["all_r8"])[0])
    assert "enable_lora=True" in one_line(e)
    with pytest.raises(InvalidRequestError) as e:
        llama.base.engine.add_request(EngineRequest("r", PROMPTS[0], greedy(), lora_name="all_r8"))
    assert "enable-lora" in one_line(e) and not llama.base.engine.has_unfinished()
    assert tokens(llama.base.generate([PROMPTS[0]], greedy())) == [llama.refs[None][0].token_ids]


def test_unload_while_running_and_reload(llama):
    """Requests running on an adapter finish on it after an unload, while the other slot serves two more
    adapters in turn; a new request for the unloaded name is refused; the name loads again, even onto another
    directory: a new adapter, never the old one's slot contents or prefix-cache states."""
    llm = LLM(llama.dir, max_loras=2, **LORA, **LIGER)  # with the prefix cache (on by default)
    engine = llm.engine
    engine.adapters.load("a", llama.paths["all_r8"])
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(EngineRequest(f"a{i}", prompt, greedy(), lora_name="a"))
        engine.add_request(EngineRequest(f"base{i}", prompt, greedy()))
    out: dict[str, list[int]] = {}
    for _ in range(3):  # prefill and a first few decodes
        for delta in engine.step():
            out.setdefault(delta.request_id, []).extend(delta.token_ids)
    assert engine.has_unfinished() and engine.stats().running_lora_adapters == ("a",)
    engine.adapters.unload("a")
    with pytest.raises(AdapterNotFoundError) as e:
        engine.add_request(EngineRequest("late", PROMPTS[0], greedy(), lora_name="a"))
    assert "'a'" in one_line(e)
    for name in ["rslora", "kv_mlp"]:  # one free slot for both: they take it in turn, "a" keeps its own
        engine.adapters.load(name, llama.paths[name])
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(EngineRequest(f"{name}{i}", prompt, greedy(), lora_name=name))
    drain(engine, out)
    for name, ref in [("a", "all_r8"), ("base", None), ("rslora", "rslora"), ("kv_mlp", "kv_mlp")]:
        assert [out[f"{name}{i}"] for i in range(3)] == [o.token_ids for o in llama.refs[ref]], name

    # continuations of "a"'s conversations: under the old adapter they would resume from its end states
    follow_ups = [prompt + out[f"a{i}"] + PROMPTS[0] for i, prompt in enumerate(PROMPTS)]
    for ref in ["kv_mlp", "all_r8"]:
        got = tokens(llm.generate(follow_ups, greedy(), lora_request=LoRARequest("a", 1, llama.paths[ref])))
        assert got == tokens(llama.merged[ref].generate(follow_ups, greedy())), ref
        llm.engine.adapters.unload("a")


def test_host_tier_of_one_rereads_adapters_from_disk(llama):
    """max_cpu_loras=1 (and one device slot): two adapters used alternately, then together, each request
    still gets its own adapter."""
    llm = LLM(llama.dir, max_loras=1, max_cpu_loras=1, **LORA, **LIGER)
    a, b = lora_requests(llama, ["rslora", "patterns"])
    for request in [a, b, a, b]:
        got = tokens(llm.generate(PROMPTS, greedy(), lora_request=request))
        assert got == [o.token_ids for o in llama.refs[request.lora_name]], request.lora_name
        assert llm.engine.adapters.num_host == 1
    together = tokens(llm.generate(PROMPTS * 2, greedy(), lora_request=[a, b, a, b, a, b]))
    refs = llama.refs
    assert together == [refs[n][i % 3].token_ids for i, n in enumerate(["rslora", "patterns"] * 3)]


def test_prefix_cache_keeps_adapters_apart(llama):
    """A conversation continued under adapter B, then the base model, then adapter A, after its first turn ran
    under A: only A's continuation resumes from A's end state; B and the base model prefill from scratch and
    give their own references (a state is never shared across adapters). n=2 seeded samples under an
    adapter == those under merge_lora."""
    llm = LLM(llama.dir, max_loras=2, enable_prefix_caching=True, **LORA, **LIGER)
    a, b = lora_requests(llama, ["all_r8", "kv_mlp"])
    first_turn = tokens(llm.generate([PROMPTS[2]], greedy(), lora_request=a))[0]
    assert first_turn == llama.refs["all_r8"][2].token_ids
    # A's end state holds prompt + output[:-1] (the last sampled token was never fed): a prefix of this
    follow_up = PROMPTS[2] + first_turn + PROMPTS[0]
    for request, name in [(b, "kv_mlp"), (None, None), (a, "all_r8")]:
        before = llm.engine.stats().prefix_cache_hit_tokens
        got = tokens(llm.generate([follow_up], greedy(), lora_request=request))
        reference = llama.merged[name] if name is not None else llama.base
        assert got == tokens(reference.generate([follow_up], greedy())), name
        num_hit = llm.engine.stats().prefix_cache_hit_tokens - before
        assert num_hit == (len(PROMPTS[2]) + MAX_TOKENS - 1 if name == "all_r8" else 0), name

    prompt = PROMPTS[2]
    sampled = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=MAX_TOKENS, ignore_eos=True)
    request = lora_requests(llama, ["rslora"])[0]
    ours = [s.token_ids for s in llm.generate([prompt], sampled, lora_request=request)[0].outputs]
    merged = [s.token_ids for s in llama.merged["rslora"].generate([prompt], sampled)[0].outputs]
    print(f"n=2 seeded samples under the adapter: {ours}")
    assert ours == merged


def test_engine_request_validation(llama):
    llm = LLM(llama.dir, max_loras=1, **LORA, **LIGER)
    for route in [(1,), (1, 1, 1), (1, 3), (1, -1)]:
        with pytest.raises(InvalidRequestError) as e:
            llm.engine.add_request(EngineRequest("r", PROMPTS[0], greedy(), layer_route=route))
        assert "layer route of 2 counts" in one_line(e), route
    with pytest.raises(InvalidRequestError) as e:
        llm.engine.add_request(EngineRequest("r", PROMPTS[0], greedy(), cache_salt=""))
    assert "cache_salt" in one_line(e)
    assert not llm.engine.has_unfinished()


# ----------------------------------------------------------------------- Mamba2, GLA, Gated DeltaNet


def test_mamba2_matches_peft_on_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """transformers' Mamba2ForCausalLM with a PEFT LoRA on in_proj and out_proj, unmerged == linrec serving
    the saved adapter per request (greedy tokens and logprobs), and == the model path's raw logits."""
    from linrec.models.mamba2 import Mamba2ForCausalLM

    config = {**Mamba2ForCausalLM.demo_hf_config(), "vocab_size": DEMO_VOCAB_SIZE, **demo_special_token_ids()}
    torch.manual_seed(0)
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**config)).eval()
    with torch.no_grad():  # transformers sets norms, D and conv biases to constants: perturb them
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith((".D", "conv1d.bias", "dt_bias")):
                p.add_(0.3 * torch.randn_like(p))
    model_dir, adapter_dir = tmp_path / "mamba2", tmp_path / "adapter"
    hf.save_pretrained(str(model_dir), safe_serialization=True)
    write_byte_tokenizer(model_dir)
    # PEFT refuses out_proj on Mamba because mamba_ssm's fused training kernel reads out_proj.weight directly;
    # in eval mode transformers' Mamba2Mixer calls self.out_proj(...) (its torch path, the only one on the
    # CPU), so PEFT's LoRA runs there. Proven at the end: the unmerged model equals PEFT's own merge.
    monkeypatch.setattr(peft.tuners.tuners_utils, "_check_lora_target_modules_mamba", lambda *args: None)
    peft_model = peft_adapter(hf, adapter_dir, 5, r=4, lora_alpha=8, target_modules=["in_proj", "out_proj"])
    assert not peft_model.training

    @torch.no_grad()
    def peft_logits(ids: list[int]) -> torch.Tensor:
        return peft_model(torch.tensor([ids])).logits[0]

    llm = LLM(str(model_dir), max_loras=1, **LORA, **CPU)
    outs = first(llm.generate(PROMPTS[:2], greedy(logprobs=20), lora_request=LoRARequest("m", 1, str(adapter_dir))))
    assert [o.token_ids for o in outs] != tokens(llm.generate(PROMPTS[:2], greedy()))
    lp_diff, logit_diff, gap, sequences = 0.0, 0.0, float("inf"), []
    for ours, prompt in zip(outs, PROMPTS):
        expected, logits = full_forward_greedy(peft_logits, prompt)
        assert ours.token_ids == expected
        lp_diff, gap = max(lp_diff, logprobs_vs_logits(ours, logits)), min(gap, margin(logits))
        sequence = prompt + expected
        theirs = peft_logits(sequence)
        sequences.append((sequence, theirs))
        logit_diff = max(logit_diff, (slot_logits(model_dir, adapter_dir, sequence) - theirs).abs().max().item())
    print(
        f"mamba2 vs PEFT unmerged: max |logprob diff| {lp_diff:.2e}, max |raw logit diff| {logit_diff:.2e}, "
        f"greedy margin {gap:.3f}"
    )
    assert lp_diff < ATOL and logit_diff < ATOL

    merged = peft_model.merge_and_unload()  # in place: last
    with torch.no_grad():
        diff = max((merged(torch.tensor([s])).logits[0] - t).abs().max().item() for s, t in sequences)
    assert diff < ATOL, f"PEFT's unmerged Mamba2 differs from its merge by {diff:.2e}: a LoRA did not run"


# Families whose every projection PEFT wraps on linrec's own model (no transformers class to wrap instead).
PEFT_TARGETS = {
    "lolcats_llama": ["q_proj", "k_proj", "v_proj", "o_proj", *MLP],
    "gla": ["q_proj", "k_proj", "v_proj", "g_proj", "gk_proj.0", "gk_proj.1", "o_proj", *MLP],
    "gated_deltanet": ["q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj", *MLP],
}


@pytest.mark.parametrize("family", sorted(PEFT_TARGETS))
def test_fla_families_match_peft_unmerged_and_merged(demo_model_dir, family: str, tmp_path: Path):
    """fla GLA / Gated DeltaNet / LoLCATs with a LoRA on every projection, the recurrent ones (gates, decays, betas)
    included: PEFT wrapping linrec's model, unmerged == per request == merged at load."""
    model_dir, adapter_dir = demo_model_dir(family), tmp_path / "adapter"
    peft_model = peft_adapter(
        load_model(model_dir, **CPU), adapter_dir, 9, r=4, lora_alpha=8, target_modules=PEFT_TARGETS[family]
    )
    adapted = {name.removesuffix(".weight") for name in read_lora_adapter(adapter_dir).deltas}
    assert adapted == set(load_model(model_dir, **CPU).projections()), "every projection carries a LoRA"

    llm = LLM(model_dir, max_loras=1, **LORA, **CPU)
    request = LoRARequest(family, 1, str(adapter_dir))
    outs = first(llm.generate(PROMPTS, greedy(logprobs=20), lora_request=request))
    refs = first(LLM(model_dir, merge_lora=str(adapter_dir), **CPU).generate(PROMPTS, greedy(logprobs=20)))
    assert [o.token_ids for o in outs] != tokens(llm.generate(PROMPTS, greedy()))
    lp_diff, merged_diff, logit_diff, gap = 0.0, 0.0, 0.0, float("inf")
    for ours, ref, prompt in zip(outs, refs, PROMPTS):
        expected, logits = full_forward_greedy(lambda ids: linrec_forward(peft_model, ids), prompt)
        assert ours.token_ids == expected == ref.token_ids
        lp_diff, gap = max(lp_diff, logprobs_vs_logits(ours, logits)), min(gap, margin(logits))
        merged_diff = max(merged_diff, logprobs_diff(ours, ref))
        sequence = prompt + expected
        with torch.no_grad():
            theirs = linrec_forward(peft_model, sequence)
        logit_diff = max(logit_diff, (slot_logits(model_dir, adapter_dir, sequence) - theirs).abs().max().item())
    print(
        f"{family} vs PEFT unmerged: max |logprob diff| {lp_diff:.2e}, max |raw logit diff| {logit_diff:.2e}; "
        f"vs merged: {merged_diff:.2e}; greedy margin {gap:.3f}"
    )
    assert lp_diff < ATOL and logit_diff < ATOL and merged_diff < ATOL

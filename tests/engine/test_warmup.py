"""The warm-up (engine/warmup.py): its shapes fit the engine and cover the specialization classes it claims,
and it leaves the engine exactly as it was (pool, stats, prefix cache, every generator), so that greedy,
seeded and unseeded sampled outputs are the same with and without it, on the torch backend and on the triton
backend under TRITON_INTERPRET=1. The compile watch is wired through a fake."""

from __future__ import annotations

import logging

import pytest
import torch

from linrec.engine import warmup
from linrec.engine.config import EngineConfig
from linrec.engine.core import EngineCore
from linrec.engine.llm import LLM
from linrec.engine.sampling_params import SamplingParams
from linrec.kernels.toolchain import CompileWatch

FAMILIES = ["liger_gla", "gla", "gated_deltanet", "mamba2", "lolcats_llama"]
PROMPTS = [[5, 77, 190, 3, 41], [200, 13, 8, 99, 150, 7, 64, 32, 1], [88, 120]]


def test_warmup_runs_on_cuda_only_by_default():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not warmup.is_enabled("auto", cpu) and warmup.is_enabled("auto", cuda)
    assert warmup.is_enabled("on", cpu) and not warmup.is_enabled("off", cuda)
    with pytest.raises(ValueError, match="expected warmup auto, on or off"):
        warmup.is_enabled("yes", cpu)
    assert EngineConfig().warmup == "auto"
    with pytest.raises(ValueError, match="expected warmup in"):
        EngineConfig(warmup="always")


@pytest.mark.parametrize("max_num_seqs, budget, max_model_len", [(64, 2048, 32768), (4, 32, 64), (1, 8, 16)])
def test_forward_shapes_fit_the_engine(max_num_seqs, budget, max_model_len):
    shapes = warmup.forward_shapes(max_num_seqs, budget, max_model_len, eager_decode=True)
    assert shapes
    for shape in shapes:
        assert 1 <= len(shape.seq_lens) <= max_num_seqs
        assert shape.num_tokens <= budget
        assert all(s + n <= max_model_len for s, n in zip(shape.start_positions, shape.seq_lens))
    assert len({(s.seq_lens, s.start_positions) for s in shapes}) == len(shapes)


def test_forward_shapes_cover_the_specialization_classes():
    shapes = warmup.forward_shapes(64, 2048, 32768, eager_decode=False)
    prefills = [s for s in shapes if 1 not in s.seq_lens]
    lengths = {n for s in prefills for n in s.seq_lens}
    assert any(n % 16 for n in lengths) and any(n % 16 == 0 for n in lengths)
    assert {len(s.seq_lens) for s in prefills} >= {1, 3, 16}  # N == 1, odd, a multiple of 16
    assert 2048 in lengths  # the largest chunk a step holds
    assert any(any(p > 0 for p in s.start_positions) for s in prefills)  # a resumed prefill
    # Mixed steps: decodes first, then the prefill rows at every 2-adic class of their row offset.
    leading = set()
    for s in shapes:
        if 1 in s.seq_lens and not all(n == 1 for n in s.seq_lens):
            num_decodes = next(i for i, n in enumerate(s.seq_lens) if n != 1)
            leading.add(num_decodes)
    assert {1, 2, 4, 8, 16} <= leading
    assert any(s.seq_lens[0] == 1 and 1 in s.seq_lens[2:] and s.seq_lens[1] > 1 for s in shapes)  # interleaved
    assert not any(all(n == 1 for n in s.seq_lens) for s in shapes)  # decode: the graphs captured it
    eager = warmup.forward_shapes(64, 2048, 32768, eager_decode=True)
    decode_batches = {len(s.seq_lens) for s in eager if all(n == 1 for n in s.seq_lens)}
    assert decode_batches == {1, 3, 16, 64}


def test_sampler_cases_reach_every_path():
    cases = dict(warmup.sampler_cases())
    params = [p for ps in cases.values() for p in ps]
    assert any(p.temperature == 0 for p in params) and any(p.temperature > 0 for p in params)
    assert any(p.logprobs for p in params) and any(p.seed is not None for p in params)
    assert any(p.top_k > 0 and p.top_p < 1 for p in params) and any(p.min_p > 0 for p in params)
    assert any(p.repetition_penalty != 1 and p.presence_penalty and p.frequency_penalty for p in params)
    assert any(p.logit_bias and p.min_tokens for p in params)
    # the full-sort path: top_k on some sampled rows only, with top_p
    assert any(any(p.top_k > 0 for p in ps) and not all(p.top_k > 0 for p in ps) for ps in cases.values())


def _snapshot(engine: EngineCore) -> dict:
    return {
        "pool": [{name: t.clone() for name, t in layer.items()} for layer in engine.pool.layers],
        "stats": engine.stats(),
        "free_slots": engine.scheduler.allocator.num_free,
        "engine_rng": engine.runner.sampler.generator.get_state(),
        "torch_rng": torch.random.get_rng_state(),
        "seeded": dict(engine.runner._generators),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_run_warmup_leaves_the_engine_as_it_was(demo_model_dir, family):
    engine = EngineCore(
        EngineConfig(demo_model_dir(family), kernel_backend="torch", max_num_seqs=4, max_num_batched_tokens=32)
    )
    assert engine.warmup_report is None  # auto: not on the CPU
    before = _snapshot(engine)
    shapes = warmup.forward_shapes(4, 32, engine.max_model_len, eager_decode=True)
    report = warmup.run_warmup(
        engine.model,
        engine.pool,
        engine.device,
        engine.vocab_size,
        engine.eos_token_ids,
        shapes,
        warmup.sampler_cases(),
    )
    assert report.num_forwards == len(shapes) and report.num_sampler_batches == len(warmup.sampler_cases())
    after = _snapshot(engine)
    for layer_before, layer_after in zip(before["pool"], after["pool"]):
        for name, tensor in layer_before.items():
            assert torch.equal(tensor, layer_after[name]), name  # row 0 restored, no other row touched
    assert after["stats"] == before["stats"] and after["free_slots"] == before["free_slots"]
    assert torch.equal(after["engine_rng"], before["engine_rng"])
    assert torch.equal(after["torch_rng"], before["torch_rng"])
    assert after["seeded"] == before["seeded"] == {}
    assert engine.prefix_cache is not None and engine.prefix_cache.num_snapshots == 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_outputs_are_the_same_with_and_without_warmup(demo_model_dir, backend):
    """Greedy, seeded and unseeded sampled requests (the unseeded ones draw from the engine's generator)
    through chunked prefills beside decodes: the same tokens and logprobs whether the engine warmed up."""
    requests = [
        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.9, top_k=20, seed=1234, max_tokens=4, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, max_tokens=4, ignore_eos=True),
    ]
    outputs = {}
    for setting in ("off", "on"):
        llm = LLM(
            demo_model_dir("liger_gla"),
            kernel_backend=backend,
            max_num_seqs=3,
            max_num_batched_tokens=8,
            max_model_len=64,
            warmup=setting,
        )
        report = llm.engine.warmup_report
        assert (report is None) == (setting == "off")
        results = llm.generate(PROMPTS, requests)
        outputs[setting] = [(c.token_ids, [lp.logprob for lp in c.logprobs or []]) for r in results for c in r.outputs]
        stats = llm.engine.stats()
        assert stats.num_slots_used == 0 and stats.num_step_failures == 0
        outputs[setting].append((stats.prefix_cache_queries, stats.prefill_tokens_computed, stats.prefix_cache_saves))
    assert outputs["on"] == outputs["off"]


def test_lora_warmup_runs_each_shape_with_adapters_beside_base_rows(demo_model_dir):
    """With LoRA on, every shape is warmed up a second time with an adapter on every other sequence (the
    shrink/expand kernels' own specializations); the warm-up still leaves the outputs as they were."""
    shapes = warmup.forward_shapes(4, 64, 256, eager_decode=True, lora=True)
    base = [s for s in shapes if s.adapter_slots is None]
    with_lora = [s for s in shapes if s.adapter_slots is not None]
    assert len(base) == len(with_lora) and all(s.what.endswith("with LoRA") for s in with_lora)
    assert all(s.adapter_slots[0] == 0 and set(s.adapter_slots) <= {0, -1} for s in with_lora)
    assert any(-1 in s.adapter_slots for s in with_lora)  # base rows beside adapted ones
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2)
    outputs = {}
    for setting in ("off", "on"):
        llm = LLM(
            demo_model_dir("liger_gla"),
            kernel_backend="triton",
            max_num_seqs=3,
            max_num_batched_tokens=8,
            max_model_len=64,
            warmup=setting,
            enable_lora=True,
            max_loras=2,
            max_lora_rank=4,
        )
        report = llm.engine.warmup_report
        assert (report is None) == (setting == "off")
        if report is not None:
            assert report.num_forwards == len(warmup.forward_shapes(3, 8, 64, eager_decode=True, lora=True))
        results = llm.generate(PROMPTS, params)
        outputs[setting] = [(c.token_ids, [lp.logprob for lp in c.logprobs]) for r in results for c in r.outputs]
    assert outputs["on"] == outputs["off"]


class _CompilingModel(torch.nn.Module):
    """A model stand-in whose forward 'compiles' a kernel (calls the watch as Triton's hook would) on the
    first call of each token count."""

    def __init__(self, watch: CompileWatch, vocab_size: int = 11):
        super().__init__()
        self.watch, self.vocab_size, self.seen = watch, vocab_size, set()

    def forward(self, input_ids, batch, state):
        if input_ids.shape[0] not in self.seen:
            self.seen.add(input_ids.shape[0])
            self.watch(key="k", repr="fake_kernel[...]", fn=None, compile=None)
        return torch.zeros(input_ids.shape[0], 4)

    def compute_logits(self, hidden):
        return torch.zeros(hidden.shape[0], self.vocab_size)


class _FakePool:
    def __init__(self):
        self.layers = [{"recurrent": torch.zeros(3, 2)}]


def test_warmup_arms_the_compile_watch(caplog):
    watch = CompileWatch()
    model = _CompilingModel(watch)
    shapes = [warmup.ForwardShape("a", (3,), (0,)), warmup.ForwardShape("b", (1, 4), (0, 0))]
    watch(key="k", repr="capture_kernel[...]", fn=None, compile=None)  # before the warm-up (graph capture)
    with caplog.at_level(logging.WARNING, logger="linrec.kernels.toolchain"):
        report = warmup.run_warmup(model, _FakePool(), torch.device("cpu"), 11, (2,), shapes, [], watch=watch)
        assert not caplog.records  # compilations before and during the warm-up are no bug
        assert report.num_compilations == 2 and report.num_startup_compilations == 3
        assert "3 Triton compilations at start-up (2 in the warm-up)" in report.summary()
        model(torch.zeros(7, dtype=torch.int64), None, None)  # a request's new shape, after the warm-up
    assert watch.num_late_compilations == 1
    [record] = caplog.records
    assert "fake_kernel" in record.getMessage() and "after warm-up" in record.getMessage()


def test_late_compilations_reach_the_engine_stats(demo_model_dir, monkeypatch):
    """What /metrics serves as linrec:kernel_compilations_after_warmup_total: the installed watch's count."""
    from linrec.engine import core
    from linrec.engine.llm import LLM

    engine = LLM(demo_model_dir(), max_num_seqs=2).engine
    assert engine.stats().num_kernel_compilations_after_warmup == 0  # no Triton watch in this process
    watch = CompileWatch()
    with watch.warming_up():
        watch(key="k", repr="warm_kernel[...]", fn=None, compile=None)
    watch(key="k2", repr="late_kernel[...]", fn=None, compile=None)
    monkeypatch.setattr(core, "current_compile_watch", lambda: watch)
    assert engine.stats().num_kernel_compilations_after_warmup == 1


def test_warmup_without_a_watch_says_so():
    model = _CompilingModel(CompileWatch())
    report = warmup.run_warmup(
        model, _FakePool(), torch.device("cpu"), 11, (2,), [warmup.ForwardShape("a", (3,), (0,))], []
    )
    assert report.num_compilations is None and "not counted" in report.summary()


class _FailingModel(_CompilingModel):
    def forward(self, input_ids, batch, state):
        raise ValueError("misaligned address")


def test_a_failing_forward_names_its_shape():
    with pytest.raises(RuntimeError, match=r"warm-up failed on b \(seq_lens \[1, 4\].*misaligned address"):
        warmup.run_warmup(
            _FailingModel(CompileWatch()),
            _FakePool(),
            torch.device("cpu"),
            11,
            (2,),
            [warmup.ForwardShape("b", (1, 4), (0, 0))],
            [],
        )

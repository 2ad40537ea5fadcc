"""CUDA graphs for decode-only steps: buckets, the runner's replay path (on the CPU with each "graph" an
eager call over the same static, padded buffers), the enforce_eager switch, the capture safety of every
family's decode forward (no host syncs, no data-dependent shapes), and on a GPU replay == eager."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from linrec import LLM, SamplingParams, cli
from linrec.cli.common import engine_config_from_args
from linrec.engine.config import EngineConfig
from linrec.engine.cuda_graphs import DecodeGraphs, batch_size_buckets

PROMPTS = [[5, 17, 99, 3, 250, 41, 8], [7], [200, 1, 64, 64], [9, 9], [31, 4, 15]]


def greedy(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)


def test_buckets():
    assert batch_size_buckets(1) == [1]
    assert batch_size_buckets(3) == [1, 2, 3]
    assert batch_size_buckets(8) == [1, 2, 4, 8]
    assert batch_size_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_size_buckets(256)[-3:] == [240, 248, 256]
    with pytest.raises(ValueError, match="max_batch_size >= 1"):
        batch_size_buckets(0)


def test_enforce_eager_flag_and_no_graphs_on_cpu(demo_model_dir):
    args = cli.build_parser().parse_args(["generate", "--prompt", "x", "--enforce-eager"])
    assert engine_config_from_args(args).enforce_eager is True
    args = cli.build_parser().parse_args(["generate", "--prompt", "x"])
    assert engine_config_from_args(args).enforce_eager is EngineConfig().enforce_eager is False
    llm = LLM(demo_model_dir("mamba2"), device="cpu", max_num_seqs=2)
    assert llm.engine.runner.decode_graphs is None  # graphs are a CUDA thing: off on the CPU automatically
    assert llm.engine.can_replay_cuda_graphs is False  # what `linrec bench decode` reports
    graphs = DecodeGraphs(llm.engine.model, llm.engine.pool, torch.device("cpu"), 2)
    with pytest.raises(ValueError, match="CUDA device"):
        graphs.capture()


class _EagerGraph:
    """Stands in for a captured graph: replay() runs the forward the capture would have recorded."""

    def __init__(self, graphs: EagerReplayGraphs, size: int, with_lora: bool):
        self.graphs, self.size, self.with_lora = graphs, size, with_lora

    def replay(self) -> None:
        g = self.graphs
        g.num_replays += 1
        # capture() builds the batch (and the LoRA mapping, on the device) inside the graph: so does each replay
        batch = g._batch(self.size, self.with_lora)
        g._outputs[self.size, self.with_lora] = g.model(g._inputs[0, : self.size], batch, g.pool.layers)


class EagerReplayGraphs(DecodeGraphs):
    """DecodeGraphs whose 'graphs' are eager calls of the same forward on the same static buffers and the
    same padded batch that capture() would record: the replay bookkeeping, testable without a GPU."""

    def capture(self) -> None:
        self.num_replays = 0
        for size in self.buckets:
            for with_lora in self._variants():
                self._graphs[size, with_lora] = _EagerGraph(self, size, with_lora)


FAMILIES = ["liger_gla", "gla", "gated_deltanet", "mamba2", "lolcats_llama"]


class CaptureSafetyMode(TorchDispatchMode):
    """Records what a CUDA graph cannot replay faithfully, as the forward runs on the CPU:
    - host syncs: .item(), bool(t), int(t) reach aten._local_scalar_dense; .tolist(), .cpu() and .numpy()
      dispatch nothing on a CPU tensor, so those methods are watched when code in `modules` calls them (the
      Triton interpreter's own host copies are not the forward's);
    - ops whose output shape depends on tensor values: nonzero, masked_select, unique, boolean-mask
      indexing, repeat_interleave without output_size;
    - host data copied in by the forward: torch.tensor(list) reaches aten.lift_fresh (baked in at capture).
    """

    UNSAFE = (
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.masked_select",
        "aten.unique_consecutive",
        "aten.unique_dim",
        "aten._unique",
        "aten._unique2",
        "aten.lift_fresh",
    )
    HOST_READS = ("tolist", "cpu", "numpy")

    def __init__(self, modules: tuple[str, ...] = ("linrec.",)):
        super().__init__()
        self.modules = modules
        self.unsafe: list[str] = []
        self._patched: dict[str, object] = {}

    def __enter__(self):
        for name in self.HOST_READS:
            self._patched[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._watch(name, getattr(torch.Tensor, name)))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._patched.items():
            if original is None:
                delattr(torch.Tensor, name)  # back to the inherited C method
            else:
                setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def _watch(self, name: str, method):
        def watched(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(self.modules):
                self.unsafe.append(f"Tensor.{name} in {caller}")
            return method(tensor, *args, **kwargs)

        return watched

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if name in self.UNSAFE:
            self.unsafe.append(name)
        elif name in ("aten.index", "aten.index_put", "aten.index_put_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.unsafe.append(f"{name} with a boolean mask")
        elif name == "aten.repeat_interleave" and isinstance(args[-1] if args else None, torch.Tensor):
            if kwargs.get("output_size") is None:
                self.unsafe.append(f"{name} without output_size")
        return func(*args, **kwargs)


def test_capture_safety_mode_catches_syncs_and_data_dependent_shapes():
    x = torch.arange(6.0)
    for unsafe in (
        lambda: x.sum().item(),
        lambda: x.tolist(),
        lambda: x.cpu(),
        lambda: x.numpy(),
        lambda: bool(x[0] > 0),
        lambda: torch.nonzero(x),
        lambda: x[x > 2],
        lambda: x.masked_select(x > 2),
        lambda: torch.tensor([1, 2]),
        lambda: torch.repeat_interleave(x, torch.tensor([1, 0, 2, 1, 1, 1])),
    ):
        with CaptureSafetyMode(modules=(__name__,)) as mode:
            unsafe()
        assert mode.unsafe, "the mode must flag what a CUDA graph cannot capture"
    assert "tolist" not in torch.Tensor.__dict__  # the watch is undone on exit
    with CaptureSafetyMode(modules=(__name__,)) as mode:
        idx = torch.arange(3)
        y = x[idx] * 2 + x.index_select(0, idx)
        x.index_put_((idx,), y)
        torch.repeat_interleave(x, torch.ones(6, dtype=torch.int64), output_size=6)
    assert mode.unsafe == []


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_decode_forward_is_capture_safe(demo_model_dir, family, backend, lora):
    """The forward a DecodeGraphs bucket captures, with real values in its static buffers (tokens, positions
    past the window, out-of-order slots, adapters mixed with none, and a padding row), does no host sync and
    no data-dependent op: the LoRA variant groups the tokens by adapter on the device."""
    if lora and backend == "triton" and family != "liger_gla":
        pytest.skip("the LoRA kernels are the same for every family: one family under the interpreter suffices")
    extra = {"enable_lora": True, "max_loras": 2, "max_lora_rank": 4} if lora else {}
    llm = LLM(demo_model_dir(family), device="cpu", kernel_backend=backend, max_num_seqs=4, **extra)
    graphs = DecodeGraphs(llm.engine.model, llm.engine.pool, torch.device("cpu"), 4, num_adapter_slots=2 * lora)
    # ids, positions, slots, adapter slots
    graphs._inputs[:, :4] = torch.tensor([[5, 17, 99, 0], [70, 3, 0, 0], [2, 4, 1, 0], [1, -1, 0, -1]])
    with torch.inference_mode(), CaptureSafetyMode() as mode:
        hidden = graphs.model(graphs._inputs[0, :4], graphs._batch(4, with_lora=lora), graphs.pool.layers)
    assert hidden.shape[0] == 4 and torch.isfinite(hidden).all()
    assert mode.unsafe == [], f"{family} ({backend}) decode forward cannot be captured: {mode.unsafe}"


def test_replay_refuses_negative_slots(demo_model_dir):
    llm = LLM(demo_model_dir("mamba2"), device="cpu", max_num_seqs=2)
    graphs = EagerReplayGraphs(llm.engine.model, llm.engine.pool, torch.device("cpu"), 2)
    graphs.capture()
    with pytest.raises(ValueError, match="slot ids >= 0"):
        graphs.replay([5, 6], [3, 4], [1, -1])
    assert graphs.num_replays == 0


@pytest.mark.parametrize(
    "family,backend,num_prompts",
    # triton runs under the interpreter, whose cost grows with the rows: 3 sequences padded to bucket 4
    [*((family, "triton", 3) for family in FAMILIES), ("liger_gla", "torch", 5), ("mamba2", "torch", 5)],
)
def test_replay_path_pads_to_buckets_and_matches_eager(demo_model_dir, family, backend, num_prompts, monkeypatch):
    """Decode steps of 5 (or 3) sequences go through bucket 8 (or 4) padded with the null slot, over the
    captured batch's zero host copies; the tokens and logprobs equal the eager engine's, so the decode path
    reads no per-step host value and padding rows touch no request's state."""
    prompts = PROMPTS[:num_prompts]
    eager = LLM(demo_model_dir(family), device="cpu", kernel_backend=backend, max_num_seqs=5)
    expected = [o.outputs[0] for o in eager.generate(prompts, greedy(5))]

    llm = LLM(demo_model_dir(family), device="cpu", kernel_backend=backend, max_num_seqs=5)
    runner = llm.engine.runner
    # buckets 1, 2, 4, 8 for at most 5 sequences: 5 decodes run padded to 8 rows, 3 or 4 padded to 4
    graphs = EagerReplayGraphs(llm.engine.model, llm.engine.pool, torch.device("cpu"), 8)
    graphs.capture()
    monkeypatch.setattr(runner, "decode_graphs", graphs)
    got = [o.outputs[0] for o in llm.generate(prompts, greedy(5))]
    assert graphs.num_replays >= 4, "decode-only steps must go through the replay path"
    for a, b in zip(expected, got):
        assert b.token_ids == a.token_ids
        assert all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(a.logprobs, b.logprobs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["liger_gla", "gla", "gated_deltanet", "mamba2"])
def test_graph_replay_tokens_equal_eager_on_cuda(demo_model_dir, family, monkeypatch):
    eager = LLM(demo_model_dir(family), device="cuda", max_num_seqs=8, enforce_eager=True)
    assert eager.engine.runner.decode_graphs is None and not eager.engine.can_replay_cuda_graphs
    expected = [o.outputs[0] for o in eager.generate(PROMPTS, greedy(10))]

    llm = LLM(demo_model_dir(family), device="cuda", max_num_seqs=8)
    graphs = llm.engine.runner.decode_graphs
    assert graphs is not None and graphs.buckets == [1, 2, 4, 8] and llm.engine.can_replay_cuda_graphs
    replays = []
    replay = graphs.replay
    monkeypatch.setattr(graphs, "replay", lambda *args: replays.append(len(args[0])) or replay(*args))
    got = [o.outputs[0] for o in llm.generate(PROMPTS, greedy(10))]
    assert 5 in replays, f"expected decode steps of 5 sequences replayed (padded to 8), got {replays}"
    for a, b in zip(expected, got):
        assert b.token_ids == a.token_ids
        assert all(abs(x.logprob - y.logprob) < 1e-3 for x, y in zip(a.logprobs, b.logprobs))
    # the pool's real slots end as eager left them: the graphs wrote only the null slot beyond the batch
    assert llm.generate(PROMPTS[:1], greedy(4))[0].outputs[0].token_ids == expected[0].token_ids[:4]

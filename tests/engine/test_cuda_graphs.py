"""CUDA graphs for decode-only steps: buckets, the runner's replay path (on the CPU with each "graph" an
eager call over the same static, padded buffers), the enforce_eager switch, and on a GPU replay == eager."""

from __future__ import annotations

import pytest
import torch

from linrec import LLM, SamplingParams
from linrec.engine.config import EngineConfig
from linrec.engine.cuda_graphs import DecodeGraphs, batch_size_buckets
from linrec.server import cli

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
    assert cli.engine_config_from_args(args).enforce_eager is True
    args = cli.build_parser().parse_args(["generate", "--prompt", "x"])
    assert cli.engine_config_from_args(args).enforce_eager is EngineConfig().enforce_eager is False
    llm = LLM(demo_model_dir("mamba2"), device="cpu", max_num_seqs=2)
    assert llm.engine.runner.decode_graphs is None  # graphs are a CUDA thing: off on the CPU automatically
    graphs = DecodeGraphs(llm.engine.model, llm.engine.pool, torch.device("cpu"), 2)
    with pytest.raises(ValueError, match="CUDA device"):
        graphs.capture()


class _EagerGraph:
    """Stands in for a captured graph: replay() runs the forward the capture would have recorded."""

    def __init__(self, graphs: EagerReplayGraphs, size: int):
        self.graphs, self.size, self.batch = graphs, size, graphs._batch(size)

    def replay(self) -> None:
        g = self.graphs
        g.num_replays += 1
        g._outputs[self.size] = g.model(g._inputs[0, : self.size], self.batch, g.pool.layers)


class EagerReplayGraphs(DecodeGraphs):
    """DecodeGraphs whose 'graphs' are eager calls of the same forward on the same static buffers and the
    same padded batch that capture() would record: the replay bookkeeping, testable without a GPU."""

    def capture(self) -> None:
        self.num_replays = 0
        for size in self.buckets:
            self._graphs[size] = _EagerGraph(self, size)


@pytest.mark.parametrize("family,backend", [("liger_gla", "torch"), ("gated_deltanet", "triton"), ("mamba2", "torch")])
def test_replay_path_pads_to_buckets_and_matches_eager(demo_model_dir, family, backend, monkeypatch):
    """Decode steps of 5, 4, ... sequences go through buckets 8 and 4 padded with the null slot; the tokens
    and logprobs equal the eager engine's, so padding rows touch no request's state."""
    eager = LLM(demo_model_dir(family), device="cpu", kernel_backend=backend, max_num_seqs=5)
    expected = [o.outputs[0] for o in eager.generate(PROMPTS, greedy())]

    llm = LLM(demo_model_dir(family), device="cpu", kernel_backend=backend, max_num_seqs=5)
    runner = llm.engine.runner
    # buckets 1, 2, 4, 8 for at most 5 sequences: 5 decodes run padded to 8 rows, 3 or 4 padded to 4
    graphs = EagerReplayGraphs(llm.engine.model, llm.engine.pool, torch.device("cpu"), 8)
    graphs.capture()
    monkeypatch.setattr(runner, "decode_graphs", graphs)
    got = [o.outputs[0] for o in llm.generate(PROMPTS, greedy())]
    assert graphs.num_replays >= 4, "decode-only steps must go through the replay path"
    for a, b in zip(expected, got):
        assert b.token_ids == a.token_ids
        assert all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(a.logprobs, b.logprobs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["liger_gla", "gla", "gated_deltanet", "mamba2"])
def test_graph_replay_tokens_equal_eager_on_cuda(demo_model_dir, family, monkeypatch):
    eager = LLM(demo_model_dir(family), device="cuda", max_num_seqs=8, enforce_eager=True)
    assert eager.engine.runner.decode_graphs is None
    expected = [o.outputs[0] for o in eager.generate(PROMPTS, greedy(10))]

    llm = LLM(demo_model_dir(family), device="cuda", max_num_seqs=8)
    graphs = llm.engine.runner.decode_graphs
    assert graphs is not None and graphs.buckets == [1, 2, 4, 8]
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

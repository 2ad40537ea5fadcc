"""CUDA graphs for decode-only steps: the model forward captured once per batch-size bucket, then replayed.

A decode step of a recurrent model is hundreds of small kernel launches (per layer: projections, short
convs, the state update, norms) over a few bytes per request; at small batch the launches, not the GPU,
set the pace. Capturing the forward once per batch size and replaying it removes that overhead.

What a replay needs to be correct:
- Static inputs: input_ids, positions and slot_ids live in buffers allocated once; a step copies its
  values in and pads the rest of its bucket with token 0 at position 0 in the null slot 0, which the
  decode kernels skip (the torch decode paths write it, and nothing reads it).
- The state pool's tensors never move (the pool resets and copies rows in place), so the captured
  kernels read and write the live states.
- The captured forward must not depend on host values that change between steps: the decode paths read
  only tensors (positions, slot_ids) and the host copies that are the same for every decode step of a
  bucket (seq_lens all 1). The ForwardBatch captured here carries slot_ids_host and start_positions of
  zeros; a decode path that branched on their real values would be wrong under replay. None does: the
  decode paths branch only on is_decode and, for Mamba2's SSD, on every slot id being >= 0, which holds
  at capture (all 0) and at every replay (`replay` refuses a negative slot id).
- No host syncs (.tolist(), .item(), data-dependent shapes) inside the forward of a decode step.
tests/engine/test_cuda_graphs.py checks both on the CPU for every family and backend: the decode forward
runs under a dispatch mode that fails on host syncs and data-dependent shapes, and a stand-in replay over
the captured (zero) host copies must give the eager engine's tokens; on a GPU it replays every family.
The sampler runs outside the graph (it syncs to return token ids anyway).
"""

from __future__ import annotations

import torch

from linrec.engine.state_pool import StatePool
from linrec.models.base import CausalLM
from linrec.models.batch import ForwardBatch


def batch_size_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to max_batch_size, and max_batch_size itself (vLLM's spacing:
    a step pads to at most 7 rows beyond its size once past 8)."""
    if max_batch_size < 1:
        raise ValueError(f"expected max_batch_size >= 1, got {max_batch_size}")
    sizes = [n for n in (1, 2, 4) if n <= max_batch_size] + list(range(8, max_batch_size + 1, 8))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class DecodeGraphs:
    """The model's decode forward captured per bucket; `replay` runs a decode-only step through one."""

    def __init__(self, model: CausalLM, pool: StatePool, device: torch.device, max_batch_size: int):
        self.model = model
        self.pool = pool
        self.device = device
        self.buckets = batch_size_buckets(max_batch_size)
        largest = self.buckets[-1]
        # rows: input_ids, positions, slot_ids; [3, largest] int64, written once per step with one copy
        self._inputs = torch.zeros(3, largest, dtype=torch.int64, device=device)
        self._cu_seqlens = torch.arange(largest + 1, dtype=torch.int64, device=device)  # every sequence 1 token
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}  # bucket -> its graph (anything with .replay())
        self._outputs: dict[int, torch.Tensor] = {}  # bucket -> the captured forward's hidden [bucket, D]

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    def _batch(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            cu_seqlens=self._cu_seqlens[: size + 1],
            positions=self._inputs[1, :size],
            slot_ids=self._inputs[2, :size],
            seq_lens=(1,) * size,
            start_positions=(0,) * size,
            slot_ids_host=(0,) * size,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller graphs reuse its memory pool. The warm-up
        and capture runs read and write only the null slot (every row is padding)."""
        if self.device.type != "cuda":
            raise ValueError(f"expected a CUDA device to capture CUDA graphs on, got {self.device}")
        self._inputs.zero_()
        memory_pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.buckets):
            batch = self._batch(size)
            input_ids = self._inputs[0, :size]
            # Warm up on a side stream (Triton compiles its kernels, cuBLAS picks its algorithms) before capture.
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.model(input_ids, batch, self.pool.layers)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory_pool):
                self._outputs[size] = self.model(input_ids, batch, self.pool.layers)
            self._graphs[size] = graph
        torch.cuda.synchronize(self.device)

    def bucket_for(self, num_seqs: int) -> int | None:
        """The smallest captured bucket holding num_seqs sequences, or None when none does."""
        for size in self.buckets:
            if size >= num_seqs and size in self._graphs:
                return size
        return None

    def replay(self, token_ids: list[int], positions: list[int], slot_ids: list[int]) -> torch.Tensor:
        """One decode-only step of B = len(token_ids) sequences (one token each). Returns hidden [B, D]: a
        view into the graph's output, valid until the next replay."""
        num_seqs = len(token_ids)
        size = self.bucket_for(num_seqs)
        if size is None:
            raise ValueError(f"expected at most {self.max_batch_size} sequences for a graph replay, got {num_seqs}")
        if min(slot_ids, default=0) < 0:
            # captured with slot ids >= 0, the SSD path took its decode branch, which a negative id would not
            raise ValueError(f"expected slot ids >= 0 for a graph replay, got {slot_ids}")
        host = torch.zeros(3, size, dtype=torch.int64)  # padding: token 0 at position 0 in the null slot 0
        host[:, :num_seqs] = torch.tensor([token_ids, positions, slot_ids], dtype=torch.int64)
        self._inputs[:, :size].copy_(host)  # one host-to-device copy per step
        self._graphs[size].replay()
        return self._outputs[size][:num_seqs]

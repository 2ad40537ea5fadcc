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
- LoRA (num_adapter_slots > 0): each bucket is captured twice, without the LoRA add-on (replayed when no
  request of the step has an adapter, so base traffic pays nothing for LoRA being on) and with it, the
  tokens' adapter slots read from a fourth input row and grouped on the device (LoraMapping.from_device);
  padding rows have slot -1, which the kernels leave alone.
tests/engine/test_cuda_graphs.py checks both on the CPU for every family and backend: the decode forward
runs under a dispatch mode that fails on host syncs and data-dependent shapes, and a stand-in replay over
the captured (zero) host copies must give the eager engine's tokens; on a GPU it replays every family.
The sampler runs outside the graph (it syncs to return token ids anyway).
"""

from __future__ import annotations

import torch

from linrec.engine.state_pool import StatePool
from linrec.kernels.lora import LoraMapping
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

    def __init__(
        self,
        model: CausalLM,
        pool: StatePool,
        device: torch.device,
        max_batch_size: int,
        num_adapter_slots: int = 0,
    ):
        self.model = model
        self.pool = pool
        self.device = device
        self.buckets = batch_size_buckets(max_batch_size)
        self.num_adapter_slots = num_adapter_slots  # LoRA device slots (0: LoRA off, one graph per bucket)
        largest = self.buckets[-1]
        # rows: input_ids, positions, slot_ids, adapter slots; [4, largest] int64, written once per step with one copy
        self._inputs = torch.zeros(4, largest, dtype=torch.int64, device=device)
        self._inputs[3].fill_(-1)
        self._cu_seqlens = torch.arange(largest + 1, dtype=torch.int64, device=device)  # every sequence 1 token
        # (bucket, with LoRA) -> its graph (anything with .replay()) and the captured forward's hidden [bucket, D]
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._outputs: dict[tuple[int, bool], torch.Tensor] = {}

    @property
    def max_batch_size(self) -> int:
        return self.buckets[-1]

    def _batch(self, size: int, with_lora: bool = False) -> ForwardBatch:
        lora = LoraMapping.from_device(self._inputs[3, :size], self.num_adapter_slots) if with_lora else None
        return ForwardBatch(
            cu_seqlens=self._cu_seqlens[: size + 1],
            positions=self._inputs[1, :size],
            slot_ids=self._inputs[2, :size],
            seq_lens=(1,) * size,
            start_positions=(0,) * size,
            slot_ids_host=(0,) * size,
            lora=lora,
        )

    def _variants(self) -> tuple[bool, ...]:
        return (False, True) if self.num_adapter_slots else (False,)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller graphs reuse its memory pool. The warm-up
        and capture runs read and write only the null slot (every row is padding)."""
        if self.device.type != "cuda":
            raise ValueError(f"expected a CUDA device to capture CUDA graphs on, got {self.device}")
        self._inputs.zero_()
        self._inputs[3].fill_(-1)
        memory_pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.buckets):
            for with_lora in self._variants():
                input_ids = self._inputs[0, :size]
                # Warm up on a side stream (Triton compiles, cuBLAS picks its algorithms) before capture.
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self.model(input_ids, self._batch(size, with_lora), self.pool.layers)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=memory_pool):
                    # the mapping is built inside the graph: each replay groups that step's adapter slots
                    batch = self._batch(size, with_lora)
                    self._outputs[size, with_lora] = self.model(input_ids, batch, self.pool.layers)
                self._graphs[size, with_lora] = graph
        torch.cuda.synchronize(self.device)

    def bucket_for(self, num_seqs: int) -> int | None:
        """The smallest captured bucket holding num_seqs sequences, or None when none does."""
        for size in self.buckets:
            if size >= num_seqs and (size, False) in self._graphs:
                return size
        return None

    def replay(
        self,
        token_ids: list[int],
        positions: list[int],
        slot_ids: list[int],
        adapter_slots: list[int] | None = None,
    ) -> torch.Tensor:
        """One decode-only step of B = len(token_ids) sequences (one token each), adapter_slots[b] the LoRA
        slot of sequence b (-1 none; None: none has one). Returns hidden [B, D]: a view into the graph's
        output, valid until the next replay."""
        num_seqs = len(token_ids)
        size = self.bucket_for(num_seqs)
        if size is None:
            raise ValueError(f"expected at most {self.max_batch_size} sequences for a graph replay, got {num_seqs}")
        if min(slot_ids, default=0) < 0:
            # captured with slot ids >= 0, the SSD path took its decode branch, which a negative id would not
            raise ValueError(f"expected slot ids >= 0 for a graph replay, got {slot_ids}")
        adapter_slots = adapter_slots if adapter_slots is not None else [-1] * num_seqs
        with_lora = max(adapter_slots, default=-1) >= 0
        if with_lora and not self.num_adapter_slots:
            raise ValueError("expected no adapter slots in a replay of graphs captured without LoRA")
        # padding: token 0 at position 0 in the null slot 0, no adapter
        host = torch.zeros(4, size, dtype=torch.int64)
        host[3].fill_(-1)
        host[:, :num_seqs] = torch.tensor([token_ids, positions, slot_ids, adapter_slots], dtype=torch.int64)
        self._inputs[:, :size].copy_(host)  # one host-to-device copy per step
        self._graphs[size, with_lora].replay()
        return self._outputs[size, with_lora][:num_seqs]

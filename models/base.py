"""What every model family implements, and the per-request state it declares."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from linrec.kernels.backend import resolve_backend
from linrec.models.batch import ForwardBatch, ForwardContext
from linrec.models.layers import Projection

# One layer's state: name -> tensor [num_rows, *spec.shape]. Row r is the state of whichever request
# holds slot r; models read and write rows batch.slot_ids in place.
LayerState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StateSpec:
    """Shape (without the slot dimension) and dtype of one state tensor of one layer."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=self.dtype).element_size()


class CausalLM(nn.Module):
    """Base of every family: parameter names equal the HF checkpoint's names.

    Subclasses set `config` (their frozen config dataclass) and `kernel_backend`, and implement
    `state_spec`, `embed`, `decoder_layers` and `final_norm` (and `forward_context` when their layers share
    per-call inputs such as RoPE's). The base owns the one decoder-layer loop, where per-request layer
    routes are applied. Every decoder layer is called as layer(hidden, ctx, layer_state). Nothing here
    allocates state or schedules: the engine does.
    """

    # model_type strings (config.json "model_type") this class serves
    model_types: ClassVar[tuple[str, ...]] = ()
    # The family's frozen config dataclass; its classmethod from_hf(dict) validates config.json.
    config_class: ClassVar[Any]
    # Checkpoint name of the token embedding, whose tensor a tied lm_head shares.
    embedding_weight_name: ClassVar[str]
    config: Any
    kernel_backend: str  # auto | triton | torch, resolved against the input's device at each forward
    routers: Any = None  # LayerRouters (models/router.py) that decide layer_route "auto"; None: none loaded
    lm_head: nn.Linear

    @classmethod
    def from_hf_config(cls, hf_config: dict[str, Any], kernel_backend: str = "torch") -> CausalLM:
        """Build with random weights from a config.json dict (validated, clear error on bad fields)."""
        model_type = hf_config.get("model_type", cls.model_types[0])
        if model_type not in cls.model_types:
            raise ValueError(f"expected model_type in {cls.model_types}, got {model_type!r}")
        return cls(cls.config_class.from_hf(hf_config), kernel_backend=kernel_backend)

    @classmethod
    def demo_hf_config(cls) -> dict[str, Any]:
        """config.json contents of this family's tiny demo model (vocab_size is set by the caller)."""
        raise NotImplementedError

    def state_spec(self) -> list[dict[str, StateSpec]]:
        """Per layer, the state tensors one request needs; their sizes never depend on context length."""
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> the first layer's input [T, D]."""
        raise NotImplementedError

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers in order; layer i owns state_spec()[i]."""
        raise NotImplementedError

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last layer's output [T, D] -> the hidden states lm_head reads."""
        raise NotImplementedError

    def forward_context(self, batch: ForwardBatch, backend: str) -> ForwardContext:
        """What every layer of this call sees; families with per-call inputs (RoPE) extend it."""
        return ForwardContext(batch, backend)

    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch, state: list[LayerState]) -> torch.Tensor:
        """input_ids [T] -> final hidden states [T, D]; updates rows batch.slot_ids of `state` in place."""
        layers = self.decoder_layers()
        if len(state) != len(layers):
            raise ValueError(f"expected state for {len(layers)} layers, got {len(state)}")
        backend = resolve_backend(self.kernel_backend, input_ids.device)
        ctx = self.forward_context(batch, backend)
        hidden = self.embed(input_ids)
        if batch.layer_route is None and batch.auto_route is None:
            for layer, layer_state in zip(layers, state):
                hidden = layer(hidden, ctx, layer_state)
            return self.final_norm(hidden)
        # Routes (DESIGN.md, layer routing): per layer, the rows that execute it run it on their own state rows
        # (batch.layer_rows, or their slot); rows that skip it pass their hidden state through and touch no state;
        # rows that repeat it run it a second time, on their second-lane row of that layer (batch.lane_rows, in the
        # same tensors). A sub-batch is built once per distinct set of rows.
        given = batch.layer_route or (None,) * batch.num_seqs
        routes = [list(r) if r is not None else [1] * len(layers) for r in given]
        if any(len(r) != len(layers) for r in routes):
            raise ValueError(f"expected layer routes of {len(layers)} counts, got {[len(r) for r in routes]}")
        # Rows whose routers decide now: each layer's count from that layer's input, on the row's own tokens.
        biases = batch.auto_route or (None,) * batch.num_seqs
        deciding = [b for b, bias in enumerate(biases) if bias is not None]
        if deciding and self.routers is None:
            raise ValueError("expected layer routers (--router DIR) to decide a layer_route 'auto'")
        offsets = batch.token_offsets
        firsts = [
            r or (s,) * len(layers) for r, s in zip(batch.layer_rows or (None,) * batch.num_seqs, batch.slot_ids_host)
        ]
        lanes = [r or (0,) * len(layers) for r in batch.lane_rows or (None,) * batch.num_seqs]
        subs: dict[tuple, tuple[ForwardContext, torch.Tensor]] = {}

        def sub_context(seqs: tuple[int, ...], slots: tuple[int, ...]) -> tuple[ForwardContext, torch.Tensor | None]:
            """The context of the rows `seqs` on state rows `slots`, and their tokens (None: every token, in order)."""
            key = (seqs, slots)
            if key not in subs:
                sub, tokens = batch.select(seqs, slots)
                subs[key] = (self.forward_context(sub, backend), None if seqs == everyone else tokens)
            return subs[key]

        def run(layer, hidden, seqs, slots, layer_state) -> torch.Tensor:
            sub_ctx, tokens = sub_context(seqs, slots)
            if tokens is None:  # every row (a repeat by everyone): no gather, no scatter
                return layer(hidden, sub_ctx, layer_state)
            return hidden.index_copy(0, tokens, layer(hidden.index_select(0, tokens), sub_ctx, layer_state))

        everyone = tuple(range(batch.num_seqs))
        for index, (layer, layer_state) in enumerate(zip(layers, state)):
            for b in deciding:
                routes[b][index] = self.routers.decide(index, hidden[offsets[b] : offsets[b + 1]], biases[b])
            counts = [r[index] for r in routes]
            executing = tuple(b for b in everyone if counts[b] >= 1)
            rows = tuple(firsts[b][index] for b in executing)
            if executing == everyone and rows == batch.slot_ids_host:
                hidden = layer(hidden, ctx, layer_state)
            elif executing:
                if min(rows) <= 0:
                    raise ValueError(f"expected a state row of layer {index} for every sequence that executes it")
                hidden = run(layer, hidden, executing, rows, layer_state)
            repeating = tuple(b for b in everyone if counts[b] == 2)
            if repeating:
                rows = tuple(lanes[b][index] for b in repeating)
                if min(rows) <= 0:
                    raise ValueError("expected a second-lane state row for every sequence that repeats a layer")
                hidden = run(layer, hidden, repeating, rows, layer_state)
        batch.decided_routes = {b: tuple(routes[b]) for b in deciding}
        return self.final_norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> logits [N, vocab] in fp32."""
        return self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()

    # -- shared helpers --------------------------------------------------------------------------

    def projections(self) -> dict[str, Projection]:
        """Every projection of the decoder layers by module name (the checkpoint's, less `.weight`): what a
        LoRA adapter may target."""
        return {name: m for name, m in self.named_modules() if isinstance(m, Projection)}

    def enable_lora(self, num_slots: int, max_rank: int) -> None:
        """Give every projection `num_slots` device adapter slots of rank up to `max_rank` (zeros)."""
        for module in self.projections().values():
            module.enable_lora(num_slots, max_rank)

    def state_bytes_per_request(self) -> int:
        return sum(spec.num_bytes for layer in self.state_spec() for spec in layer.values())

    def allocate_state(self, num_rows: int, device: torch.device | str | None = None) -> list[LayerState]:
        """Zeroed state for `num_rows` rows (row 0 is the null slot by convention)."""
        if device is None:
            device = next(self.parameters()).device
        return [
            {
                name: torch.zeros((num_rows, *spec.shape), dtype=spec.dtype, device=device)
                for name, spec in layer.items()
            }
            for layer in self.state_spec()
        ]

    def tie_lm_head(self) -> None:
        """With tie_word_embeddings, make lm_head use the embedding's tensor itself (no second copy)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.get_parameter(self.embedding_weight_name)

    def tied_weights(self) -> dict[str, str]:
        """Parameter names that may be absent from a checkpoint because they share another's tensor."""
        return {"lm_head.weight": self.embedding_weight_name} if self.config.tie_word_embeddings else {}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors into parameters by name; every name and shape must match.

        Raises ValueError naming the first unexpected, missing or misshapen tensor.
        """
        params = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        tied = self.tied_weights()
        seen: set[str] = set()
        for name, tensor in weights:
            target = params.get(name)
            if target is None:
                target = buffers.get(name)
            if target is None:
                if name in tied or _is_ignorable(name):
                    continue
                raise ValueError(f"checkpoint has tensor {name!r} that {type(self).__name__} does not expect")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"shape mismatch for {name!r}: expected {tuple(target.shape)}, checkpoint has {tuple(tensor.shape)}"
                )
            with torch.no_grad():
                target.copy_(tensor)
            seen.add(name)
        # A tied lm_head shares the embedding's parameter (tie_lm_head), so named_parameters() lists it once.
        missing = [n for n in params if n not in seen and n not in tied]
        if missing:
            raise ValueError(
                f"checkpoint is missing {len(missing)} tensor(s) of {type(self).__name__}, first {missing[0]!r}"
            )


def _is_ignorable(name: str) -> bool:
    # Derived buffers some exporters write (rotary inv_freq) carry no weights.
    return name.endswith("rotary_emb.inv_freq")

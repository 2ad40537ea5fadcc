"""The runner turns a SchedulerOutput into tensors, runs the model and the sampler. It only computes."""

from __future__ import annotations

import torch

from linrec.engine.cuda_graphs import DecodeGraphs
from linrec.engine.request import Logprob
from linrec.engine.sampler import Sampler, SamplingMetadata, make_generator
from linrec.engine.scheduler import SampleRow, ScheduledSequence, SchedulerOutput, StepResult
from linrec.engine.sparse_switch import SparseSwitch
from linrec.engine.state_pool import StatePool
from linrec.models.base import CausalLM
from linrec.models.batch import ForwardBatch
from linrec.models.sparse import SparseWeights


class Runner:
    def __init__(
        self,
        model: CausalLM,
        pool: StatePool,
        device: torch.device,
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
        seed: int = 0,
        decode_graphs: DecodeGraphs | None = None,
        num_adapter_slots: int = 0,
        sparse_switch: SparseSwitch | None = None,
    ):
        self.model = model
        self.pool = pool
        self.device = device
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(seed))
        # request id -> its own generator (seeded requests only); dropped when the request finishes
        self._generators: dict[str, torch.Generator] = {}
        # captured decode forwards (CUDA only, unless enforce_eager); None runs every step eagerly
        self.decode_graphs = decode_graphs
        self.num_adapter_slots = num_adapter_slots  # LoRA device slots beside each projection (0: LoRA off)
        self._projections = model.projections() if num_adapter_slots else {}
        # sparse adapters in the device adapter slots: scattered for a step of one, added per token in a mixed step
        self.sparse_switch = sparse_switch

    def forget(self, request_ids: list[str]) -> None:
        """Drop what the runner keeps per request (seeded generators) for requests that ended."""
        for request_id in request_ids:
            self._generators.pop(request_id, None)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        self.forget(out.finished_request_ids)
        # Order matters: end states leave their freed slots before those slots are reset or loaded.
        self.pool.copy_rows(out.end_saves)
        self.pool.reset(out.slots_to_reset)
        self.pool.copy_rows([(src, dst) for src, dst in out.loads if isinstance(src, int)])
        for src, dst in out.loads:
            if not isinstance(src, int):  # a stored state's host copy
                self.pool.write(dst, src)
        for slot, weights in out.adapter_loads:
            self.load_adapter(slot, weights)
        if out.is_empty:
            return StepResult({})
        sparse = self._sparse_step(out)
        routes: dict[str, tuple[int, ...]] = {}  # the routes the model's routers decided in this step
        hidden = self._forward(out.sequences, sparse, routes)  # [B, D]: each sequence's last token
        for src, dsts in out.forks:
            self.pool.copy(src, dsts)
        self.pool.copy_rows(out.saves)
        if not out.samples:
            return StepResult({}, routes=routes)
        rows = torch.tensor([index for _, index in out.samples], dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden[rows])[:, : self.vocab_size]
        requests = [row for row, _ in out.samples]  # SampleRow: plain data
        metadata = SamplingMetadata.build(
            [(r.sampling_params, r.prompt_token_ids, r.output_token_ids, self._generator(r)) for r in requests],
            vocab_size=logits.shape[-1],
            eos_token_ids=self.eos_token_ids,
            device=self.device,
        )
        sampled = self.sampler(logits, metadata)
        token_ids = sampled.token_ids.tolist()
        result = StepResult({r.request_id: t for r, t in zip(requests, token_ids)}, routes=routes)
        if sampled.logprobs is not None:
            lps = sampled.logprobs.tolist()
            top_ids = sampled.top_token_ids.tolist()
            top_lps = sampled.top_logprobs.tolist()
            for i, r in enumerate(requests):
                k = r.sampling_params.logprobs
                if k is None:
                    continue
                top = list(zip(top_ids[i][:k], top_lps[i][:k]))
                result.logprobs[r.request_id] = Logprob(token_ids[i], lps[i], top)
        return result

    def load_adapter(self, slot: int, weights) -> None:
        """Copy an adapter (host LoraWeights or SparseWeights) into device slot `slot`. A LoRA adapter's A and B
        go beside every projection, zeros where it leaves one alone; a sparse adapter's entries go to the
        sparse switch. Nothing of the slot's previous adapter, of either kind, remains."""
        is_sparse = isinstance(weights, SparseWeights)
        if is_sparse and self.sparse_switch is None:
            raise ValueError("expected a sparse switch to hold a sparse adapter")
        for name, projection in self._projections.items():
            lora_a, lora_b = (None, None) if is_sparse else weights.modules.get(name, (None, None))
            projection.set_lora_slot(slot, lora_a, lora_b)
        if is_sparse:
            self.sparse_switch.load(slot, weights)
        elif self.sparse_switch is not None:
            self.sparse_switch.clear(slot)

    def _sparse_step(self, out: SchedulerOutput) -> list | None:
        """Put the weights in the step's form: the scheduler's one sparse adapter scattered, or the base weights.
        Returns, per sequence, the add-on deltas of its sparse adapter in a mixed step (None: nothing to add)."""
        seqs = out.sequences
        if self.sparse_switch is None:
            if out.sparse_slot >= 0 or any(s.sparse_slot >= 0 for s in seqs):
                raise ValueError("expected a sparse switch to run sparse adapters' requests")
            return None
        if out.sparse_slot >= 0 and any(s.sparse_slot != out.sparse_slot for s in seqs):
            # never run a base, LoRA or other adapter's request on a scattered adapter's weights
            raise RuntimeError("a step scattered one sparse adapter but holds requests on other weights")
        self.sparse_switch.switch_to(out.sparse_slot)
        if out.sparse_slot >= 0 or all(s.sparse_slot < 0 for s in seqs):
            return None
        addons = {s.sparse_slot: self.sparse_switch.addon(s.sparse_slot) for s in seqs if s.sparse_slot >= 0}
        return [addons.get(s.sparse_slot) for s in seqs]

    def _forward(self, seqs: list[ScheduledSequence], sparse: list | None = None, routes: dict | None = None):
        """Run the model over the scheduled sequences, with each one's sparse add-on deltas `sparse[b]` if any;
        returns the hidden state of each one's last token [B, D], and puts the routes the model's routers decided
        into `routes` (request id -> counts). A decode-only step without the sparse add-on and without layer
        routes that fits a captured bucket replays its CUDA graph."""
        graphs = self.decode_graphs
        routed = any(s.layer_route is not None or s.auto_route is not None for s in seqs)
        if (
            graphs is not None
            and sparse is None
            and not routed
            and len(seqs) <= graphs.max_batch_size
            and all(len(s.token_ids) == 1 for s in seqs)
        ):
            return graphs.replay(
                [s.token_ids[0] for s in seqs],
                [s.start_position for s in seqs],
                [s.slot_id for s in seqs],
                [s.adapter_slot for s in seqs],
            )
        batch = ForwardBatch.build(
            [len(s.token_ids) for s in seqs],
            [s.start_position for s in seqs],
            [s.slot_id for s in seqs],
            device=self.device,
            adapter_slots=[s.adapter_slot for s in seqs] if self.num_adapter_slots else None,
            num_adapter_slots=self.num_adapter_slots,
            sparse_deltas=sparse,
        )
        if routed:
            batch.layer_route = tuple(s.layer_route for s in seqs)
            if any(s.layer_rows is not None for s in seqs):
                batch.layer_rows = tuple(s.layer_rows for s in seqs)
            if any(s.lane_rows is not None for s in seqs):
                batch.lane_rows = tuple(s.lane_rows for s in seqs)
            if any(s.auto_route is not None for s in seqs):
                batch.auto_route = tuple(s.auto_route for s in seqs)
        input_ids = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.int64, device=self.device)
        hidden = self.model(input_ids, batch, self.pool.layers)
        if routes is not None and batch.decided_routes:
            routes.update({seqs[b].request_id: route for b, route in batch.decided_routes.items()})
        return hidden[batch.last_token_indices()]

    def _generator(self, request: SampleRow) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        gen = self._generators.get(request.request_id)
        if gen is None:
            gen = make_generator(seed, self.device, child_index=request.sample_index)
            self._generators[request.request_id] = gen
        return gen

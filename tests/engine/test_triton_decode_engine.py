"""The engine with kernel_backend="triton" (the Triton decode kernels, under TRITON_INTERPRET=1 without CUDA)
gives the same greedy tokens as kernel_backend="torch" on the Gated DeltaNet and Mamba2 demo models."""

from __future__ import annotations

import importlib

import pytest

from linrec import LLM, SamplingParams

# family -> (the ops module that dispatches, the Triton decode function's name in it, its slot_ids argument)
KERNELS = {
    "gated_deltanet": ("linrec.kernels.gated_delta", "gated_delta_decode_triton", 6),
    "mamba2": ("linrec.kernels.ssd", "ssd_decode_triton", 7),
}


@pytest.mark.parametrize("family", sorted(KERNELS))
def test_triton_backend_greedy_tokens_equal_torch(demo_model_dir, family, monkeypatch):
    module_name, kernel_name, slot_arg = KERNELS[family]
    module = importlib.import_module(module_name)
    kernel = getattr(module, kernel_name)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[slot_arg].shape[0])  # the batch size of each kernel call
        return kernel(*args, **kwargs)

    monkeypatch.setattr(module, kernel_name, counted)
    prompts = [[5, 17, 99, 3, 250, 41, 8], [7], [200, 1, 64, 64]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    results = {}
    for backend in ("torch", "triton"):
        # a 6-token budget: the first steps mix 1-token decodes with prefill chunks, the later ones are decode-only
        llm = LLM(demo_model_dir(family), kernel_backend=backend, max_num_seqs=3, max_num_batched_tokens=6)
        results[backend] = [o.outputs[0] for o in llm.generate(prompts, params)]
        if backend == "torch":
            assert not calls, "the torch backend must not reach the Triton kernel"
    assert 3 in calls and any(n < 3 for n in calls), f"expected decode-only and mixed steps, got batch sizes {calls}"
    for torch_out, triton_out in zip(results["torch"], results["triton"]):
        assert triton_out.token_ids == torch_out.token_ids
        # the same numbers, not only the same argmax: every sampled token's logprob agrees
        for a, b in zip(torch_out.logprobs, triton_out.logprobs):
            assert abs(a.logprob - b.logprob) < 1e-4

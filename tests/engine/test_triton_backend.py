"""The engine with kernel_backend="triton" (Triton kernels under TRITON_INTERPRET=1 without a GPU) gives
the same greedy tokens as kernel_backend="torch" on every family's demo model, through mixed steps
(prompts chunked beside other requests' decodes) and decode steps."""

from __future__ import annotations

import pytest

from linrec.engine.llm import LLM
from linrec.engine.sampling_params import SamplingParams

FAMILIES = ["liger_gla", "gla", "gated_deltanet", "mamba2", "lolcats_llama"]
PROMPTS = [[5, 77, 190, 3, 41], [200, 13, 8, 99, 150, 7, 64, 32, 1], [88, 120]]


@pytest.mark.parametrize("family", FAMILIES)
def test_triton_backend_gives_the_torch_backend_greedy_tokens(demo_model_dir, family):
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=3)
    outs = {}
    for backend in ("torch", "triton"):
        # 8 tokens a step: the 9-token prompt is chunked while the others already decode
        llm = LLM(demo_model_dir(family), kernel_backend=backend, max_num_seqs=3, max_num_batched_tokens=8)
        outs[backend] = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
    tokens = {backend: [c.token_ids for c in comps] for backend, comps in outs.items()}
    # the sampled token's logprob and the top 3 of every step: (token, logprob) pairs side by side
    pairs = [
        (x, y)
        for ca, cb in zip(outs["torch"], outs["triton"])
        for a, b in zip(ca.logprobs, cb.logprobs)
        for x, y in zip([(None, a.logprob), *a.top], [(None, b.logprob), *b.top])
    ]
    assert all(x[0] == y[0] for x, y in pairs)
    d = max(abs(x[1] - y[1]) for x, y in pairs)
    print(f"{family}: triton vs torch greedy tokens equal={tokens['triton'] == tokens['torch']}, max|dlogprob|={d:.2e}")
    assert tokens["triton"] == tokens["torch"]
    assert all(len(t) == 4 for t in tokens["torch"])
    assert d < 1e-4

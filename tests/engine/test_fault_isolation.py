"""One request must never hurt another: what a step will index is validated at the door, and a step that
still raises fails only the requests it can be traced to while the engine goes on."""

from __future__ import annotations

import pytest

from linrec import LLM, SamplingParams
from linrec.engine.sampling_params import MAX_LOGPROBS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, InvalidRequestError


def greedy(max_tokens: int = 6, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        # The report's request: min_tokens masks the stop ids, indexing the logits with 99999 (or -1).
        (dict(min_tokens=1, stop_token_ids=[99999]), "stop_token_ids"),
        (dict(min_tokens=1, stop_token_ids=[-1]), "stop_token_ids"),
        (dict(stop_token_ids=[99999]), "stop_token_ids"),
        (dict(logit_bias={99999: 1.0}), "logit_bias"),
    ],
)
def test_ids_a_step_would_index_are_refused_before_the_engine(demo_model_dir, params, param):
    llm = LLM(demo_model_dir(), max_num_seqs=4)
    with pytest.raises(InvalidRequestError) as info:
        llm.engine.add_request("bad", [1, 2, 3], greedy(**params))
    assert info.value.param == param
    assert not llm.engine.has_unfinished()
    assert llm.generate([[1, 2, 3]], greedy())[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(logit_bias={1: float("nan")}), "logit_bias"),
        (dict(logprobs=MAX_LOGPROBS + 1), "logprobs"),
        (dict(stop=["x"] * (MAX_STOP_STRINGS + 1)), "stop"),
        (dict(stop=["x" * (MAX_STOP_STRING_CHARS + 1)]), "stop"),
        (dict(stop_token_ids=list(range(1025))), "stop_token_ids"),
    ],
)
def test_sampling_params_limits_name_the_field(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param

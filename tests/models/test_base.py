"""The shared CausalLM contract: tied heads share one tensor; from_hf_config checks model_type."""

from __future__ import annotations

import pytest
import torch

from linrec.models.registry import DEMO_FAMILIES, get_model_class


@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_tied_lm_head_shares_the_embedding_tensor(family):
    cls = get_model_class(family)
    config = {**cls.demo_hf_config(), "vocab_size": 300, "tie_word_embeddings": True}
    torch.manual_seed(0)
    model = cls.from_hf_config(config)
    embedding = model.get_parameter(cls.embedding_weight_name)
    assert model.lm_head.weight is embedding  # one tensor, not a copy: a tied 150k-vocab head costs nothing
    # Checkpoints written with and without the redundant lm_head.weight both load.
    weights = {name: t.clone() + 1 for name, t in model.state_dict().items()}
    model.load_weights(weights.items())
    assert torch.equal(model.lm_head.weight, weights[cls.embedding_weight_name])
    del weights["lm_head.weight"]
    model.load_weights(weights.items())
    assert model.lm_head.weight is model.get_parameter(cls.embedding_weight_name)


@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_from_hf_config_rejects_another_model_type(family):
    cls = get_model_class(family)
    with pytest.raises(ValueError, match="expected model_type"):
        cls.from_hf_config({**cls.demo_hf_config(), "vocab_size": 300, "model_type": "llama"})

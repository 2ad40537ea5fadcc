"""RoPE from config.json against transformers' LlamaRotaryEmbedding and apply_rotary_pos_emb."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from linrec.models.rope import RopeConfig, RotaryEmbedding, apply_rotary

HEAD_DIM = 32
BASE = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": HEAD_DIM}
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# (classic config.json fields, positions) -- theta 500000 with D=32 puts frequencies in all three llama3 bands
CASES = {
    "default": ({"rope_theta": 10000.0, "max_position_embeddings": 4096}, [0, 1, 5, 63, 64, 1000, 4095]),
    "theta": ({"rope_theta": 500000.0, "max_position_embeddings": 8192}, [0, 3, 77, 8191, 30000]),
    "linear": (
        {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}, "max_position_embeddings": 4096},
        [0, 2, 100, 4000, 16000],
    ),
    "llama3": (
        {"rope_theta": 500000.0, "rope_scaling": LLAMA3, "max_position_embeddings": 131072},
        [0, 1, 63, 64, 2048, 8192, 100000],
    ),
    "dynamic": (
        {
            "rope_theta": 10000.0,
            "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
            "max_position_embeddings": 256,
        },
        [0, 7, 100, 255],
    ),
}


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def hf_rope(fields, positions):
    config = LlamaConfig(**BASE, **fields)
    rotary = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(x, torch.tensor([positions]))
    return config, cos[0], sin[0]


@pytest.mark.parametrize("name", list(CASES))
def test_cos_sin_and_rotation_match_transformers(name):
    fields, positions = CASES[name]
    hf_config, cos_ref, sin_ref = hf_rope(fields, positions)
    rope_classic = RopeConfig.from_hf_config({**BASE, **fields}, HEAD_DIM)
    # transformers 5 writes the same settings as one rope_parameters dict
    rope_v5 = RopeConfig.from_hf_config(hf_config.to_dict(), HEAD_DIM)
    assert rope_classic == rope_v5
    cos, sin = RotaryEmbedding(rope_classic)(torch.tensor(positions))
    d_cs = max(max_diff(cos, cos_ref), max_diff(sin, sin_ref))

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(len(positions), 4, HEAD_DIM, generator=gen)
    k = torch.randn(len(positions), 2, HEAD_DIM, generator=gen)
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos_ref[None], sin_ref[None])
    d_qk = max(
        max_diff(apply_rotary(q, cos, sin), q_ref[0].transpose(0, 1)),
        max_diff(apply_rotary(k, cos, sin), k_ref[0].transpose(0, 1)),
    )
    print(f"rope {name} vs transformers: max|dcos,dsin|={d_cs:.2e} max|dq,dk|={d_qk:.2e}")
    assert d_cs < 1e-6 and d_qk < 1e-5


def test_llama3_changes_low_frequencies_only():
    fields = CASES["llama3"][0]
    plain = RotaryEmbedding(RopeConfig.from_hf_config({**BASE, "rope_theta": 500000.0}, HEAD_DIM))
    scaled = RotaryEmbedding(RopeConfig.from_hf_config({**BASE, **fields}, HEAD_DIM))
    pos = torch.tensor([5000])
    differs = (plain(pos)[0] != scaled(pos)[0])[0, : HEAD_DIM // 2]
    assert not differs[:4].any() and differs[-1]  # high frequencies untouched, the lowest stretched


def test_dynamic_grows_per_token_as_a_one_token_call_does():
    # transformers grows the base from the longest position of the call; each token here uses its own,
    # which is what a fresh one-token call computes.
    fields = CASES["dynamic"][0]
    ours = RotaryEmbedding(RopeConfig.from_hf_config({**BASE, **fields}, HEAD_DIM))
    for p in [256, 300, 1000]:
        _, cos_ref, sin_ref = hf_rope(fields, [p])
        cos, sin = ours(torch.tensor([p]))
        assert max_diff(cos, cos_ref) < 1e-5 and max_diff(sin, sin_ref) < 1e-5, p


def test_bf16_rotation_matches_transformers():
    fields, positions = CASES["llama3"]
    _, cos_ref, sin_ref = hf_rope(fields, positions)
    cos, sin = RotaryEmbedding(RopeConfig.from_hf_config({**BASE, **fields}, HEAD_DIM))(torch.tensor(positions))
    q = torch.randn(len(positions), 2, HEAD_DIM).bfloat16()
    q_ref, _ = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos_ref[None].bfloat16(), sin_ref[None].bfloat16()
    )
    assert torch.equal(apply_rotary(q, cos, sin), q_ref[0].transpose(0, 1))


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}}, "'yarn'"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "'longrope'"),
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"rope_theta": -1.0}, "rope_theta"),
    ],
)
def test_rejects_unsupported_settings(fields, match):
    with pytest.raises(ValueError, match=match):
        RopeConfig.from_hf_config({**BASE, **fields}, HEAD_DIM)

"""Liger-GLA: everything it shares with Llama/Qwen2/Mistral against transformers on the same weights, an
end-to-end oracle assembled from transformers' sliding-window attention and fla-core's naive GLA, and the
engine's invariants (full forward == chunked prefill + decode, varlen == alone, forked states)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from linrec.models.batch import ForwardBatch
from linrec.models.liger_gla import LigerGLAConfig, LigerGLAForCausalLM, linearize_hf_config
from linrec.models.registry import get_model_class
from linrec.models.rope import apply_rotary

VOCAB = 97
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
}
LLAMA3_ROPE = {
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
# Logits of the tiny fp32 models are O(1) (weights scaled by WEIGHT_GAIN); chunking only reorders fp32 sums.
TOL = 1e-4
WEIGHT_GAIN = 8.0


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def hf_model(cls, config_cls, seed=0, **fields):
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **fields})
    config._attn_implementation = "eager"
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):  # ones and zeros at init: perturb them so they show
                p.add_(0.1 * torch.randn_like(p))
            else:  # std 0.02 would leave logits ~1e-2 and every branch's effect below any tolerance
                p.mul_(WEIGHT_GAIN)
    return model


def liger_from(hf, kernel_backend="torch") -> LigerGLAForCausalLM:
    """The Liger model of an HF base model: linearized config, same tensors by name."""
    liger_config = linearize_hf_config(hf.config.to_dict())
    model = get_model_class(liger_config["model_type"]).from_hf_config(liger_config, kernel_backend=kernel_backend)
    model.load_weights(hf.state_dict().items())
    return model.eval()


def run_full(model, ids, slot=1, num_rows=3, start_state=None):
    state = model.allocate_state(num_rows) if start_state is None else start_state
    batch = ForwardBatch.build([len(ids)], slot_ids=[slot])
    with torch.no_grad():
        return model.compute_logits(model(ids, batch, state)), state


def run_chunked(model, ids, chunks, slot=1, num_rows=3):
    state = model.allocate_state(num_rows)
    outs, start = [], 0
    with torch.no_grad():
        for n in chunks:
            batch = ForwardBatch.build([n], start_positions=[start], slot_ids=[slot])
            outs.append(model.compute_logits(model(ids[start : start + n], batch, state)))
            start += n
    return torch.cat(outs), state


@pytest.fixture(scope="module")
def llama_pair():
    hf = hf_model(LlamaForCausalLM, LlamaConfig)
    return hf, liger_from(hf)


# -- pieces shared with transformers' Llama -------------------------------------------------------------


def test_checkpoint_names_are_llama_names(llama_pair):
    hf, liger = llama_pair
    assert set(dict(liger.named_parameters())) == set(dict(hf.named_parameters()))


def test_embeddings_norms_mlps_and_lm_head_match_llama(llama_pair):
    hf, liger = llama_pair
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (23,), generator=gen)
    x = torch.randn(23, 64, generator=gen)
    diffs = {}
    with torch.no_grad():
        diffs["embed"] = max_diff(liger.model.embed_tokens(ids), hf.model.embed_tokens(ids))
        for i, (ours, theirs) in enumerate(zip(liger.model.layers, hf.model.layers)):
            diffs[f"mlp{i}"] = max_diff(ours.mlp(x), theirs.mlp(x))
            diffs[f"input_norm{i}"] = max_diff(ours.input_layernorm(x), theirs.input_layernorm(x))
            diffs[f"post_norm{i}"] = max_diff(ours.post_attention_layernorm(x), theirs.post_attention_layernorm(x))
        diffs["final_norm"] = max_diff(liger.model.norm(x), hf.model.norm(x))
        # logits given identical final hidden states
        diffs["lm_head"] = max_diff(liger.compute_logits(x), hf.lm_head(x))
    print("vs transformers Llama:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) < 1e-6


@pytest.mark.parametrize("rope", ["default", "llama3"])
def test_rope_and_window_branch_match_llama_attention(rope):
    # For T <= 64 the 64-key window covers the whole causal context, so the window branch followed by
    # o_proj is exactly LlamaAttention: RoPE, GQA grouping, scale and o_proj all checked at once.
    fields = LLAMA3_ROPE if rope == "llama3" else {}
    hf = hf_model(LlamaForCausalLM, LlamaConfig, attention_bias=True, **fields)
    liger = liger_from(hf)
    T = 48
    ids = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(T)
    # cos/sin against transformers' rotary on the same config
    cos_ref, sin_ref = LlamaRotaryEmbedding(hf.config)(torch.zeros(1), positions[None])
    cos, sin = liger.rotary_emb(positions)
    d_rope = max(max_diff(cos, cos_ref[0]), max_diff(sin, sin_ref[0]))

    captured = {}

    def hook(module, args, kwargs, output):
        captured.setdefault("x", kwargs["hidden_states"][0])
        captured.setdefault("out", output[0][0])

    handle = hf.model.layers[0].self_attn.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        hf(ids)
    handle.remove()
    attn = liger.model.layers[0].self_attn
    state = liger.allocate_state(2)[0]
    with torch.no_grad():
        x = captured["x"]
        q = attn.q_proj(x).view(T, 4, 16)
        k = attn.k_proj(x).view(T, 2, 16)
        v = attn.v_proj(x).view(T, 2, 16)
        q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos_ref, sin_ref)
        d_qk = max(
            max_diff(apply_rotary(q, cos, sin), q_ref[0].transpose(0, 1)),
            max_diff(apply_rotary(k, cos, sin), k_ref[0].transpose(0, 1)),
        )
        window = attn.window_branch(
            apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, ForwardBatch.build([T]), state, "torch"
        )
        d_attn = max_diff(attn.o_proj(window.reshape(T, -1)), captured["out"])
    print(
        f"rope={rope}: max|dcos,dsin|={d_rope:.1e} max|dq,dk|={d_qk:.1e} window+o_proj vs LlamaAttention={d_attn:.1e}"
    )
    assert d_rope < 1e-6 and d_qk < 1e-5 and d_attn < 1e-5


def test_tied_embeddings_follow_the_checkpoint():
    hf = hf_model(LlamaForCausalLM, LlamaConfig, tie_word_embeddings=True)
    liger = liger_from(hf)
    assert liger.tied_weights() == {"lm_head.weight": "model.embed_tokens.weight"}
    assert torch.equal(liger.lm_head.weight, hf.model.embed_tokens.weight)
    # a tied checkpoint may omit lm_head.weight: it is copied from the embeddings
    other = LigerGLAForCausalLM.from_hf_config(linearize_hf_config(hf.config.to_dict()))
    other.load_weights((n, t) for n, t in hf.state_dict().items() if n != "lm_head.weight")
    assert torch.equal(other.lm_head.weight, hf.model.embed_tokens.weight)


# -- the whole model against an oracle built from transformers and fla-core ---------------------------


class LigerReferenceAttention(nn.Module):
    """Wraps a transformers attention module (sliding window 64 where the model has one) into Liger's:
    0.5 * attention + 0.5 * o_proj(GLA), the GLA run by fla-core's naive recurrence with k, v, g
    repeated per query head as the public Liger code does. Needs an o_proj without bias."""

    def __init__(self, attn: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.attn = attn
        self.shape = (num_heads, num_kv_heads, head_dim)

    def forward(self, hidden_states, **kwargs):
        from fla.ops.gla.naive import naive_recurrent_gla as fla_naive

        out, weights = self.attn(hidden_states=hidden_states, **kwargs)
        H, Hk, D = self.shape
        B, T, _ = hidden_states.shape
        q = self.attn.q_proj(hidden_states).view(B, T, H, D)
        rep = lambda x: x.view(B, T, Hk, D).repeat_interleave(H // Hk, dim=2)
        k, v = rep(self.attn.k_proj(hidden_states)), rep(self.attn.v_proj(hidden_states))
        g = F.logsigmoid(k) / 16
        # fla's naive scales q by D^-0.5; Liger's scale is 1
        o, _ = fla_naive(q.softmax(-1) * D**0.5, k.softmax(-1), v, g)
        return 0.5 * out + 0.5 * self.attn.o_proj(o.reshape(B, T, H * D)), weights


def oracle_logits(hf, ids):
    cfg = hf.config
    for layer in hf.model.layers:
        if not isinstance(layer.self_attn, LigerReferenceAttention):
            layer.self_attn = LigerReferenceAttention(
                layer.self_attn, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim or 16
            )
    with torch.no_grad():
        return hf(ids[None]).logits[0]


ORACLES = {
    # Mistral and Qwen2 attend over a 64-key window (transformers: kv > q - 64), any length
    "mistral": lambda: hf_model(MistralForCausalLM, MistralConfig, sliding_window=64),
    "qwen2": lambda: hf_model(
        Qwen2ForCausalLM, Qwen2Config, use_sliding_window=True, sliding_window=64, max_window_layers=0
    ),
    # Llama attends over everything: the same as the window up to 64 tokens
    "llama3": lambda: hf_model(LlamaForCausalLM, LlamaConfig, **LLAMA3_ROPE),
}


@pytest.mark.parametrize(
    "family,chunks",
    [("mistral", [1, 7, 65, 1, 1, 55]), ("qwen2", [1, 7, 56, 1, 35]), ("llama3", [1, 7, 55, 1])],
)
def test_full_model_matches_transformers_plus_fla_oracle(family, chunks):
    T = sum(chunks)
    hf = ORACLES[family]()
    liger = liger_from(hf)
    ids = torch.randint(0, VOCAB, (T,), generator=torch.Generator().manual_seed(3))
    ref = oracle_logits(hf, ids)
    full, _ = run_full(liger, ids)
    chunked, _ = run_chunked(liger, ids, chunks)
    d_full, d_chunked = max_diff(full, ref), max_diff(chunked, ref)
    scale = ref.abs().max().item()
    print(f"{family} T={T}: max|logit|={scale:.1f}; liger full vs oracle {d_full:.1e}, chunked+decode {d_chunked:.1e}")
    assert d_full < TOL and d_chunked < TOL


# -- engine invariants ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model():
    config = {**LigerGLAForCausalLM.demo_hf_config(), "vocab_size": VOCAB}
    torch.manual_seed(0)
    model = LigerGLAForCausalLM.from_hf_config(config).eval()
    with torch.no_grad():  # larger than init weights so the recurrence and window matter to the logits
        for p in model.parameters():
            p.mul_(WEIGHT_GAIN if p.dim() == 2 else 1.0)
    return model


@pytest.mark.parametrize(
    "chunks",
    [
        [1] * 80,  # all decode, past the 64-key window
        [7, 65, 58] + [1] * 20,  # first chunk inside the window, second crossing it
        [130] + [1] * 20,
        [63, 1, 1, 64, 1, 20],  # chunk ends on both sides of the 64 boundary
        [150],
    ],
    ids=["decode", "7-65-58", "130", "63-1-1-64", "full"],
)
def test_full_forward_equals_chunked_prefill_then_decode(demo_model, chunks):
    T = sum(chunks)
    ids = torch.randint(0, VOCAB, (T,), generator=torch.Generator().manual_seed(4))
    full, full_state = run_full(demo_model, ids, num_rows=3)
    chunked, chunked_state = run_chunked(demo_model, ids, chunks, num_rows=3)
    d = max_diff(chunked, full)
    d_state = max(
        max_diff(a[name][1], b[name][1]) for a, b in zip(chunked_state, full_state) for name in ("recurrent",)
    )
    print(f"chunks {chunks[:5]}...: max|dlogits|={d:.1e} max|dS|={d_state:.1e}")
    assert d < TOL and d_state < TOL
    for a, b in zip(chunked_state, full_state):
        # the rings hold the same last 64 keys and values
        assert max_diff(a["window_k"][1], b["window_k"][1]) < 1e-5
        assert max_diff(a["window_v"][1], b["window_v"][1]) < 1e-5


def test_varlen_batches_equal_sequences_alone(demo_model):
    # Three sequences advance together in each call, in shuffled slot order, with a padding row.
    lens = {4: 140, 1: 9, 2: 70}
    plans = {4: [70, 1, 66, 1, 1, 1], 1: [1, 5, 1, 1, 1, 0], 2: [64, 1, 1, 2, 1, 1]}
    seqs = {
        slot: torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(slot)) for slot, n in lens.items()
    }
    state = demo_model.allocate_state(5)
    starts, outs = dict.fromkeys(lens, 0), {slot: [] for slot in lens}
    with torch.no_grad():
        for step in range(6):
            order = [s for s in ([2, 4, 1] if step % 2 else [1, 2, 4]) if plans[s][step]]
            seq_lens = [plans[s][step] for s in order] + [1]
            ids = torch.cat([seqs[s][starts[s] : starts[s] + plans[s][step]] for s in order] + [torch.tensor([3])])
            batch = ForwardBatch.build(seq_lens, [starts[s] for s in order] + [0], slot_ids=order + [0])
            logits = demo_model.compute_logits(demo_model(ids, batch, state))
            lo = 0
            for s in order:
                outs[s].append(logits[lo : lo + plans[s][step]])
                lo += plans[s][step]
                starts[s] += plans[s][step]
    for slot, ids in seqs.items():
        alone, alone_state = run_full(demo_model, ids, num_rows=2)
        d = max_diff(torch.cat(outs[slot]), alone)
        d_state = max(max_diff(a["recurrent"][slot], b["recurrent"][1]) for a, b in zip(state, alone_state))
        print(f"slot {slot}: varlen vs alone max|dlogits|={d:.1e} max|dS|={d_state:.1e}")
        assert d < TOL and d_state < TOL
    assert all(not layer[name][3].any() for layer in state for name in layer)  # an unused row stays zero


def test_forked_nonzero_states_continue_like_the_full_sequence(demo_model):
    # A prefix fills slot 1; copying its state into slots 2 and 3 (nonzero initial states) and
    # continuing with different suffixes in one batch equals the full forward of prefix + suffix.
    gen = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, VOCAB, (90,), generator=gen)
    suffixes = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (5, 1)]
    state = demo_model.allocate_state(4)
    with torch.no_grad():
        demo_model(prefix, ForwardBatch.build([90], slot_ids=[1]), state)
        for layer in state:
            for tensor in layer.values():
                tensor[3] = tensor[1]
                tensor[2] = tensor[1]
        batch = ForwardBatch.build([5, 1], start_positions=[90, 90], slot_ids=[3, 2])
        logits = demo_model.compute_logits(demo_model(torch.cat(suffixes), batch, state))
    for i, (lo, hi) in enumerate([(0, 5), (5, 6)]):
        full, _ = run_full(demo_model, torch.cat([prefix, suffixes[i]]))
        d = max_diff(logits[lo:hi], full[90:])
        print(f"fork {i}: max|dlogits|={d:.1e}")
        assert d < TOL


def test_state_is_one_recurrent_state_per_kv_head(demo_model):
    c = demo_model.config
    assert c.num_key_value_heads < c.num_attention_heads
    for layer in demo_model.state_spec():
        assert layer["recurrent"].shape == (c.num_key_value_heads, c.head_dim, c.head_dim)
        assert layer["recurrent"].num_bytes == c.num_key_value_heads * c.head_dim * c.head_dim * 4
        assert layer["window_k"].shape == layer["window_v"].shape == (64, c.num_key_value_heads, c.head_dim)
    per_layer = c.num_key_value_heads * c.head_dim * (c.head_dim * 4 + 2 * 64 * 4)
    assert demo_model.state_bytes_per_request() == c.num_hidden_layers * per_layer
    state = demo_model.allocate_state(2)
    assert state[0]["recurrent"].dtype == torch.float32 and state[0]["window_k"].dtype == torch.float32


def test_ring_dtype_follows_the_model_dtype(demo_model):
    config = {**LigerGLAForCausalLM.demo_hf_config(), "vocab_size": VOCAB}
    model = LigerGLAForCausalLM.from_hf_config(config).to(torch.bfloat16)
    spec = model.state_spec()[0]
    assert spec["recurrent"].dtype == torch.float32 and spec["window_k"].dtype == torch.bfloat16
    state = model.allocate_state(2)
    with torch.no_grad():
        logits = model.compute_logits(model(torch.arange(10), ForwardBatch.build([10]), state))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_random_init_is_deterministic_and_sane():
    config = {**LigerGLAForCausalLM.demo_hf_config(), "vocab_size": VOCAB}
    torch.manual_seed(0)
    a = LigerGLAForCausalLM.from_hf_config(config)
    torch.manual_seed(0)
    b = LigerGLAForCausalLM.from_hf_config(config)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert 0.015 < p.std().item() < 0.025, name


# -- config parsing ------------------------------------------------------------------------------------


def test_linearize_maps_model_types_and_keeps_fields():
    for base, liger in [("llama", "liger_gla"), ("qwen2", "liger_qwen2_gla"), ("mistral", "liger_mistral_gla")]:
        out = linearize_hf_config({**TINY, "model_type": base})
        assert out["model_type"] == liger and out["window_size"] == 64
        assert {k: out[k] for k in TINY} == TINY
    with pytest.raises(ValueError, match="'gpt2'"):
        linearize_hf_config({**TINY, "model_type": "gpt2"})


def test_parses_a_public_liger_config():
    # the fields of the public Liger-GLA-8B config.json (Llama-3-8B plus window_size)
    hf_config = {
        "architectures": ["LigerGLAForCausalLM"],
        "model_type": "liger_gla",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 8192,
        "mlp_bias": False,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
        "window_size": 64,
    }
    config = LigerGLAConfig.from_hf(hf_config)
    assert (config.num_key_value_heads, config.head_dim, config.window_size, config.rope.theta) == (8, 128, 64, 5e5)
    # DESIGN.md's figure: 32 layers x (512 KiB state + 256 KiB window) at bf16
    state_kib = 8 * 128 * 128 * 4 / 1024
    window_kib = 2 * 64 * 8 * 128 * 2 / 1024
    assert (state_kib, window_kib) == (512, 256)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"num_key_value_heads": 3}, "divisible"),
        ({"window_size": None}, "window_size"),
        ({"window_size": 0}, "window_size"),
        ({"hidden_act": "tanhh"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "'yarn'"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_config_errors_name_the_problem(fields, match):
    with pytest.raises(ValueError, match=match):
        LigerGLAConfig.from_hf({**TINY, "model_type": "liger_gla", **fields})


def test_honours_another_window_size():
    config = {**LigerGLAForCausalLM.demo_hf_config(), "vocab_size": VOCAB, "window_size": 8}
    model = LigerGLAForCausalLM.from_hf_config(config)
    assert model.state_spec()[0]["window_k"].shape[0] == 8
    ids = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(6))
    full, _ = run_full(model, ids)
    chunked, _ = run_chunked(model, ids, [5, 9, 1, 1, 14])
    assert max_diff(chunked, full) < TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel_backend", ["torch", "auto"])
def test_cuda_matches_cpu(demo_model, kernel_backend):
    config = {**LigerGLAForCausalLM.demo_hf_config(), "vocab_size": VOCAB}
    model = LigerGLAForCausalLM.from_hf_config(config, kernel_backend=kernel_backend)
    model.load_state_dict(demo_model.state_dict())
    model = model.cuda().eval()
    ids = torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(7))
    ref, _ = run_full(demo_model, ids)
    state = model.allocate_state(3)
    outs, start = [], 0
    with torch.no_grad():
        for n in [70, 1, 1, 28]:
            batch = ForwardBatch.build([n], start_positions=[start], slot_ids=[1], device="cuda")
            outs.append(model.compute_logits(model(ids[start : start + n].cuda(), batch, state)).cpu())
            start += n
    d = max_diff(torch.cat(outs), ref)
    print(f"cuda ({kernel_backend}) chunked vs cpu full: max|dlogits|={d:.1e}")
    assert d < 1e-3  # TF32 matmuls may be on

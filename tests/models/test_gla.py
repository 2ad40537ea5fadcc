"""fla GLA: against a transcription of fla's layer math built on fla-core's naive GLA recurrence, and
against itself (full forward == chunked prefill + decode, batched == alone); config and weight names.

fla's own GLAForCausalLM needs CUDA: tests/models/test_fla_models_gpu.py compares with it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linrec.models.batch import ForwardBatch
from linrec.models.gla import GLAConfig, GLAForCausalLM
from linrec.models.registry import get_model_class

VOCAB = 80
ATOL = 1e-5

CASES = {
    "demo": {},  # short convs, fused RMSNorm-swish gate, tied embeddings
    "gqa_untied": dict(num_kv_heads=2, tie_word_embeddings=False, conv_size=3),
    "no_conv_relu_clamp_nogate": dict(
        use_short_conv=False,
        feature_map="relu",
        clamp_min=-0.02,
        use_output_gate=False,
        elementwise_affine=False,
        expand_k=1.0,
        expand_v=0.5,
        intermediate_size=96,
    ),
    "unfused_norm_sigmoid_map": dict(fuse_norm=False, feature_map="sigmoid", num_kv_heads=1, hidden_ratio=2),
}


def demo_config(**overrides) -> dict:
    return {**GLAForCausalLM.demo_hf_config(), "vocab_size": VOCAB, **overrides}


def random_model(**overrides) -> GLAForCausalLM:
    torch.manual_seed(0)
    model = GLAForCausalLM.from_hf_config(demo_config(**overrides)).eval()
    with torch.no_grad():
        # norms start at ones and the gate bias at zeros: perturb them so a swapped or ignored tensor shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
        model.model.embeddings.weight.normal_(std=1.0)  # the 0.02 init leaves logits nearly flat
        if model.config.tie_word_embeddings:
            model.lm_head.weight.copy_(model.model.embeddings.weight)
    return model


def prefill(model, ids: torch.Tensor, state, slot: int = 1, start: int = 0) -> torch.Tensor:
    return model(ids, ForwardBatch.build([len(ids)], start_positions=[start], slot_ids=[slot]), state)


def clone_states(state):
    return [{name: t.clone() for name, t in layer.items()} for layer in state]


def random_states(model, num_rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    state = model.allocate_state(num_rows)
    for layer in state:
        for tensor in layer.values():
            tensor.copy_(0.5 * torch.randn(tensor.shape, generator=gen))
    return state


# -- against fla's math --------------------------------------------------------------------------


def _rms(x, weight, eps):
    x = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return x * weight if weight is not None else x


def reference_logits(cfg: dict, sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """fla's GLAForCausalLM forward for one sequence from zero state, read off fla/layers/gla.py: the
    weights by fla's names, einops for the head layouts, F.conv1d for the short convs, and fla-core's
    naive_recurrent_gla (which hard-codes fla's scale K^-0.5) for the recurrence."""
    from einops import rearrange, repeat
    from fla.ops.gla.naive import naive_recurrent_gla

    c = GLAConfig.from_hf(cfg)
    eps, W = c.norm_eps, c.conv_size
    maps = {"relu": F.relu, "sigmoid": torch.sigmoid, None: None}
    groups = c.num_heads // c.kv_heads
    h = sd["model.embeddings.weight"][ids]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        x = _rms(h, sd[p + "attn_norm.weight"], eps)
        q, k, v = (x @ sd[f"{p}attn.{n}_proj.weight"].t() for n in "qkv")
        if c.use_short_conv:
            q, k, v = (
                F.silu(F.conv1d(F.pad(y.t()[None], (W - 1, 0)), sd[f"{p}attn.{n}_conv1d.weight"], groups=y.shape[1]))[
                    0
                ].t()
                for y, n in ((q, "q"), (k, "k"), (v, "v"))
            )
        gk = (x @ sd[p + "attn.gk_proj.0.weight"].t()) @ sd[p + "attn.gk_proj.1.weight"].t() + sd[
            p + "attn.gk_proj.1.bias"
        ]
        q = rearrange(q, "t (h d) -> t h d", d=c.head_k_dim)
        k, gk = (repeat(y, "t (h d) -> t (h g) d", g=groups, d=c.head_k_dim) for y in (k, gk))
        v = repeat(v, "t (h d) -> t (h g) d", g=groups, d=c.head_v_dim)
        gk = F.logsigmoid(gk) / 16
        if c.clamp_min is not None:
            gk = gk.clamp_min(c.clamp_min)
        if maps[c.feature_map] is not None:
            q, k = maps[c.feature_map](q), maps[c.feature_map](k)
        o, _ = naive_recurrent_gla(q[None], k[None], v[None], gk[None])
        o = o[0]
        norm = "g_norm_swish_gate" if c.fuse_norm and c.use_output_gate else "g_norm"
        o = _rms(o, sd.get(f"{p}attn.{norm}.weight"), eps)
        o = rearrange(o, "t h d -> t (h d)")
        if c.use_output_gate:
            o = o * F.silu(x @ sd[p + "attn.g_proj.weight"].t())
        h = h + o @ sd[p + "attn.o_proj.weight"].t()
        x = _rms(h, sd[p + "mlp_norm.weight"], eps)
        mlp = F.silu(x @ sd[p + "mlp.gate_proj.weight"].t()) * (x @ sd[p + "mlp.up_proj.weight"].t())
        h = h + mlp @ sd[p + "mlp.down_proj.weight"].t()
    return _rms(h, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].t()


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_matches_fla_math_with_fla_core_naive(case: str):
    pytest.importorskip("fla.ops.gla.naive")
    model = random_model(**CASES[case])
    ids = torch.randint(0, VOCAB, (19,), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(demo_config(**CASES[case]), model.state_dict(), ids)
    logits = model.compute_logits(prefill(model, ids, model.allocate_state(2)))
    diff = (logits - ref).abs().max().item()
    print(
        f"[{case}] logits vs fla math (fla-core naive GLA): max abs diff {diff:.2e} (|logits| <= {ref.abs().max():.2f})"
    )
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


# -- against itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["demo", "gqa_untied"])
@torch.no_grad()
def test_full_forward_equals_chunked_prefill_then_decode(case: str):
    model = random_model(**CASES[case])
    ids = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(3))
    full_state = model.allocate_state(2)
    full = model.compute_logits(prefill(model, ids, full_state))

    state = model.allocate_state(2)
    pieces, pos = [], 0
    for n in [7, 1, 2, 13, 5]:  # uneven, odd prefill chunks (one shorter than the conv window), then decodes
        pieces.append(model.compute_logits(prefill(model, ids[pos : pos + n], state, start=pos)))
        pos += n
    while pos < len(ids):
        pieces.append(model.compute_logits(prefill(model, ids[pos : pos + 1], state, start=pos)))
        pos += 1
    diff = (torch.cat(pieces) - full).abs().max().item()
    print(f"[{case}] full vs chunked prefill + decode logits: max abs diff {diff:.2e}")
    torch.testing.assert_close(torch.cat(pieces), full, atol=ATOL, rtol=ATOL)
    for a, b in zip(state, full_state):
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("seq_lens", [[9, 1, 14, 2], [1, 1, 1, 1]], ids=["prefill", "decode"])
@torch.no_grad()
def test_varlen_batch_equals_each_alone_from_nonzero_states(seq_lens: list[int]):
    model = random_model(num_kv_heads=2)
    slots = [5, 2, 7, 3]  # out of order; rows 0, 1, 4, 6 belong to nobody here
    starts = [3, 12, 0, 6]
    ids = torch.randint(0, VOCAB, (sum(seq_lens),), generator=torch.Generator().manual_seed(4))
    initial = random_states(model, 8, seed=5)

    state = clone_states(initial)
    batched = model(ids, ForwardBatch.build(seq_lens, start_positions=starts, slot_ids=slots), state)
    lo = 0
    for n, slot, start in zip(seq_lens, slots, starts):
        alone_state = clone_states(initial)
        alone = prefill(model, ids[lo : lo + n], alone_state, slot=slot, start=start)
        torch.testing.assert_close(batched[lo : lo + n], alone, atol=ATOL, rtol=ATOL)
        for a, b in zip(state, alone_state):
            for name in a:
                torch.testing.assert_close(a[name][slot], b[name][slot], atol=ATOL, rtol=ATOL)
        lo += n
    for a, b in zip(state, initial):
        for name in a:
            assert torch.equal(a[name][[0, 1, 4, 6]], b[name][[0, 1, 4, 6]])
    # the initial state matters (otherwise the test above could pass on a model that ignores it)
    fresh = prefill(model, ids[: seq_lens[0]], model.allocate_state(8), slot=slots[0])
    assert (fresh - batched[: seq_lens[0]]).abs().max() > 1e-3


@torch.no_grad()
def test_prefill_from_nonzero_state_then_decode_equals_one_prefill():
    model = random_model()
    ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(6))
    initial = random_states(model, 3, seed=7)
    whole_state = clone_states(initial)
    whole = prefill(model, ids, whole_state, slot=2, start=40)
    state = clone_states(initial)
    pieces = [prefill(model, ids[:5], state, slot=2, start=40)]
    pieces += [prefill(model, ids[i : i + 1], state, slot=2, start=40 + i) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces), whole, atol=ATOL, rtol=ATOL)


# -- config, state, weights ----------------------------------------------------------------------


def fla_weight_names(num_layers: int, *, short_conv: bool, gate_norm: str | None, output_gate: bool) -> set[str]:
    """The names fla's GLAForCausalLM writes (fla/models/gla/modeling_gla.py, fla/layers/gla.py)."""
    names = {"model.embeddings.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        names |= {p + n for n in ("attn_norm.weight", "mlp_norm.weight")}
        names |= {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
        names |= {p + f"attn.{n}_proj.weight" for n in ("q", "k", "v", "o")}
        names |= {p + "attn.gk_proj.0.weight", p + "attn.gk_proj.1.weight", p + "attn.gk_proj.1.bias"}
        if output_gate:
            names.add(p + "attn.g_proj.weight")
        if short_conv:
            names |= {p + f"attn.{n}_conv1d.weight" for n in "qkv"}
        if gate_norm is not None:
            names.add(p + f"attn.{gate_norm}.weight")
    return names


@pytest.mark.parametrize(
    "overrides,short_conv,gate_norm,output_gate",
    [
        ({}, True, "g_norm_swish_gate", True),
        ({"fuse_norm": False}, True, "g_norm", True),
        ({"use_short_conv": False, "use_output_gate": False}, False, "g_norm", False),
        ({"elementwise_affine": False}, True, None, True),
    ],
)
def test_parameter_names_are_fla_names(overrides, short_conv, gate_norm, output_gate):
    model = GLAForCausalLM.from_hf_config(demo_config(**overrides))
    expected = fla_weight_names(2, short_conv=short_conv, gate_norm=gate_norm, output_gate=output_gate)
    assert set(model.state_dict()) == expected


@torch.no_grad()
def test_load_weights_round_trip_and_tied_head():
    src = random_model(tie_word_embeddings=False)
    dst = GLAForCausalLM.from_hf_config(demo_config(tie_word_embeddings=False)).eval()
    dst.load_weights(src.state_dict().items())
    ids = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(8))
    a = src.compute_logits(prefill(src, ids, src.allocate_state(2)))
    b = dst.compute_logits(prefill(dst, ids, dst.allocate_state(2)))
    assert torch.equal(a, b)

    # a tied checkpoint has no lm_head.weight: the head is the embedding
    tied = GLAForCausalLM.from_hf_config(demo_config()).eval()
    weights = {n: t for n, t in src.state_dict().items() if n != "lm_head.weight"}
    tied.load_weights(weights.items())
    assert torch.equal(tied.lm_head.weight, src.model.embeddings.weight)

    with pytest.raises(ValueError, match="missing"):
        dst.load_weights(weights.items())
    renamed = {n.replace("gk_proj.0", "gk_proj.a"): t for n, t in src.state_dict().items()}
    with pytest.raises(ValueError, match="gk_proj.a"):
        dst.load_weights(renamed.items())


def test_state_spec_and_registry():
    model = GLAForCausalLM.from_hf_config(demo_config(num_kv_heads=2))
    c = model.config
    assert (c.head_k_dim, c.head_v_dim, c.kv_heads) == (8, 16, 2)
    spec = model.state_spec()
    assert len(spec) == 2
    assert spec[0]["recurrent"].shape == (2, 8, 16) and spec[0]["recurrent"].dtype == torch.float32
    assert (
        spec[0]["q_conv"].shape == (32, 3) and spec[0]["k_conv"].shape == (16, 3) and spec[0]["v_conv"].shape == (32, 3)
    )
    assert "q_conv" not in GLAForCausalLM.from_hf_config(demo_config(use_short_conv=False)).state_spec()[0]
    assert get_model_class("gla") is GLAForCausalLM


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"attn": {"layers": [1], "num_heads": 4}}, "'attn'"),
        ({"attnres_block_size": 2}, "'attnres_block_size'"),
        ({"hidden_act": "gelu"}, "hidden_act 'swish'"),
        ({"feature_map": "bias_gelu"}, "feature_map"),
        ({"expand_k": 0.3}, "expand_k"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"num_heads": 3}, "divisible by num_heads=3"),
        ({"use_short_conv": "yes"}, "use_short_conv"),
        ({"model_type": "gated_deltanet"}, "model_type"),
    ],
)
def test_config_errors_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        GLAForCausalLM.from_hf_config(demo_config(**overrides))


def test_config_accepts_fla_extras():
    # fields fla writes that change nothing here; an attn spec with no layers is no hybrid at all
    cfg = GLAConfig.from_hf(demo_config(attn_mode="fused_chunk", use_gk=True, use_gv=True, attn=None, fuse_swiglu=True))
    assert cfg.use_gv and cfg.attn is None
    assert GLAConfig.from_hf(demo_config(attn={"layers": [], "num_heads": 4})).num_heads == 4


@torch.no_grad()
def test_bf16_model_close_to_fp32():
    model = random_model()
    ids = torch.randint(0, VOCAB, (21,), generator=torch.Generator().manual_seed(9))
    ref = model.compute_logits(prefill(model, ids, model.allocate_state(2)))
    model = model.to(torch.bfloat16)
    state = model.allocate_state(2)
    assert state[0]["recurrent"].dtype == torch.float32 and state[0]["q_conv"].dtype == torch.bfloat16
    hidden = prefill(model, ids, state)
    assert hidden.dtype == torch.bfloat16
    rel = ((model.compute_logits(hidden) - ref).abs().max() / ref.abs().max()).item()
    print(f"bf16 vs fp32 logits: max abs diff / max |logits| = {rel:.2e}")
    assert rel < 5e-2

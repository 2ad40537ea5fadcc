"""fla Gated DeltaNet: against a transcription of fla's layer math built on fla-core's naive gated delta
rule and GDN gate, and against itself (full forward == chunked prefill + decode, batched == alone);
config and weight names.

fla's own GatedDeltaNetForCausalLM needs CUDA: tests/models/test_fla_models_gpu.py compares with it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linrec.models.batch import ForwardBatch
from linrec.models.gated_deltanet import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
from linrec.models.registry import get_model_class

VOCAB = 80
ATOL = 1e-5

CASES = {
    "demo": {},  # short convs, swish-gated o_norm, tied embeddings
    "gva_untied_neg_eigval": dict(num_v_heads=4, allow_neg_eigval=True, tie_word_embeddings=False, conv_size=3),
    "no_conv_no_gate": dict(use_short_conv=False, use_gate=False, expand_v=1.0, intermediate_size=96),
    "sigmoid_gate_long_chunk": dict(output_gate_activation="sigmoid", head_dim=8, num_heads=4, expand_v=1.5),
}


def demo_config(**overrides) -> dict:
    return {**GatedDeltaNetForCausalLM.demo_hf_config(), "vocab_size": VOCAB, **overrides}


def random_model(**overrides) -> GatedDeltaNetForCausalLM:
    torch.manual_seed(0)
    model = GatedDeltaNetForCausalLM.from_hf_config(demo_config(**overrides)).eval()
    with torch.no_grad():
        # norms start at ones: perturb them so a swapped or ignored tensor shows
        for name, p in model.named_parameters():
            if "norm" in name:
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
    """fla's GatedDeltaNetForCausalLM forward for one sequence from zero state, read off
    fla/layers/gated_deltanet.py and the fused_recurrent kernel's in-kernel l2norm / sigmoid / gate: weights
    by fla's names, einops for head layouts, F.conv1d for the short convs, fla-core's naive_gdn_gate and
    naive_recurrent_gated_delta_rule (scale defaults to K^-0.5). Grouped value heads follow the kernel's
    i_h = i_hv // (HV // H)."""
    from einops import rearrange, repeat
    from fla.ops.gated_delta_rule.gate import naive_gdn_gate
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    c = GatedDeltaNetConfig.from_hf(cfg)
    eps, W = c.norm_eps, c.conv_size
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
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k = (rearrange(y, "t (h d) -> t h d", d=c.head_dim) for y in (q, k))
        q, k = (y / torch.sqrt((y * y).sum(-1, keepdim=True) + 1e-6) for y in (q, k))
        q, k = (repeat(y, "t h d -> t (h g) d", g=c.v_heads // c.num_heads) for y in (q, k))
        v = rearrange(v, "t (h d) -> t h d", d=c.head_v_dim)
        beta = torch.sigmoid(x @ sd[p + "attn.b_proj.weight"].t())
        if c.allow_neg_eigval:
            beta = beta * 2
        g = naive_gdn_gate(x @ sd[p + "attn.a_proj.weight"].t(), sd[p + "attn.A_log"], sd[p + "attn.dt_bias"])
        o, _ = naive_recurrent_gated_delta_rule(q[None], k[None], v[None], beta[None], g[None])
        o = _rms(o[0], sd[p + "attn.o_norm.weight"], eps)
        if c.use_gate:
            gate = rearrange(x @ sd[p + "attn.g_proj.weight"].t(), "t (h d) -> t h d", d=c.head_v_dim)
            o = o * (torch.sigmoid(gate) if c.output_gate_activation == "sigmoid" else F.silu(gate))
        h = h + rearrange(o, "t h d -> t (h d)") @ sd[p + "attn.o_proj.weight"].t()
        x = _rms(h, sd[p + "mlp_norm.weight"], eps)
        mlp = F.silu(x @ sd[p + "mlp.gate_proj.weight"].t()) * (x @ sd[p + "mlp.up_proj.weight"].t())
        h = h + mlp @ sd[p + "mlp.down_proj.weight"].t()
    return _rms(h, sd["model.norm.weight"], eps) @ sd["lm_head.weight"].t()


@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_matches_fla_math_with_fla_core_naive(case: str):
    pytest.importorskip("fla.ops.gated_delta_rule.naive")
    model = random_model(**CASES[case])
    ids = torch.randint(0, VOCAB, (70,), generator=torch.Generator().manual_seed(1))  # longer than one chunk
    ref = reference_logits(demo_config(**CASES[case]), model.state_dict(), ids)
    logits = model.compute_logits(prefill(model, ids, model.allocate_state(2)))
    diff = (logits - ref).abs().max().item()
    print(
        f"[{case}] logits vs fla math (fla-core naive GDN): max abs diff {diff:.2e} (|logits| <= {ref.abs().max():.2f})"
    )
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


# -- against itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["demo", "gva_untied_neg_eigval"])
@torch.no_grad()
def test_full_forward_equals_chunked_prefill_then_decode(case: str):
    model = random_model(**CASES[case])
    ids = torch.randint(0, VOCAB, (83,), generator=torch.Generator().manual_seed(3))
    full_state = model.allocate_state(2)
    full = model.compute_logits(prefill(model, ids, full_state))

    state = model.allocate_state(2)
    pieces, pos = [], 0
    for n in [7, 1, 2, 65, 5]:  # uneven, odd prefill chunks: one shorter than the conv window, one > 64
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
    model = random_model(num_v_heads=4)
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


def fla_weight_names(num_layers: int, *, short_conv: bool, gate: bool) -> set[str]:
    """The names fla's GatedDeltaNetForCausalLM writes (fla/models/gated_deltanet, fla/layers/gated_deltanet.py)."""
    names = {"model.embeddings.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        names |= {p + n for n in ("attn_norm.weight", "mlp_norm.weight")}
        names |= {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
        names |= {p + f"attn.{n}_proj.weight" for n in ("q", "k", "v", "a", "b", "o")}
        names |= {p + "attn.A_log", p + "attn.dt_bias", p + "attn.o_norm.weight"}
        if gate:
            names.add(p + "attn.g_proj.weight")
        if short_conv:
            names |= {p + f"attn.{n}_conv1d.weight" for n in "qkv"}
    return names


@pytest.mark.parametrize(
    "overrides,short_conv,gate",
    [({}, True, True), ({"use_short_conv": False}, False, True), ({"use_gate": False}, True, False)],
)
def test_parameter_names_are_fla_names(overrides, short_conv, gate):
    model = GatedDeltaNetForCausalLM.from_hf_config(demo_config(**overrides))
    assert set(model.state_dict()) == fla_weight_names(2, short_conv=short_conv, gate=gate)


@torch.no_grad()
def test_load_weights_round_trip_and_tied_head():
    src = random_model(tie_word_embeddings=False)
    dst = GatedDeltaNetForCausalLM.from_hf_config(demo_config(tie_word_embeddings=False)).eval()
    dst.load_weights(src.state_dict().items())
    ids = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(8))
    a = src.compute_logits(prefill(src, ids, src.allocate_state(2)))
    b = dst.compute_logits(prefill(dst, ids, dst.allocate_state(2)))
    assert torch.equal(a, b)

    tied = GatedDeltaNetForCausalLM.from_hf_config(demo_config()).eval()
    weights = {n: t for n, t in src.state_dict().items() if n != "lm_head.weight"}
    tied.load_weights(weights.items())
    assert torch.equal(tied.lm_head.weight, src.model.embeddings.weight)

    with pytest.raises(ValueError, match="missing"):
        dst.load_weights(weights.items())
    wrong = dict(src.state_dict())
    wrong["model.layers.1.attn.A_log"] = torch.zeros(3)
    with pytest.raises(ValueError, match="A_log"):
        dst.load_weights(wrong.items())


def test_state_spec_and_registry():
    model = GatedDeltaNetForCausalLM.from_hf_config(demo_config(num_v_heads=4))
    spec = model.state_spec()
    assert len(spec) == 2
    assert spec[0]["recurrent"].shape == (4, 16, 32) and spec[0]["recurrent"].dtype == torch.float32
    assert (
        spec[0]["q_conv"].shape == (32, 3)
        and spec[0]["k_conv"].shape == (32, 3)
        and spec[0]["v_conv"].shape == (128, 3)
    )
    assert "q_conv" not in GatedDeltaNetForCausalLM.from_hf_config(demo_config(use_short_conv=False)).state_spec()[0]
    assert get_model_class("gated_deltanet") is GatedDeltaNetForCausalLM


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"attn": {"layers": [0], "num_heads": 2}}, "'attn'"),
        ({"attnres_block_size": 2}, "'attnres_block_size'"),
        ({"num_v_heads": 3}, "num_v_heads"),
        ({"num_v_heads": 1}, "num_v_heads"),
        ({"expand_v": 0.3}, "expand_v"),
        ({"hidden_act": "powlu"}, "hidden_act"),
        ({"output_gate_activation": "relu"}, "output_gate_activation"),
        ({"head_dim": 16.0}, "head_dim"),
        ({"model_type": "gla"}, "model_type"),
    ],
)
def test_config_errors_name_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        GatedDeltaNetForCausalLM.from_hf_config(demo_config(**overrides))


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

"""Mamba2 against transformers' Mamba2ForCausalLM (its torch path: no mamba_ssm / causal_conv1d here) on tiny
random configs, and against itself: full forward == chunked prefill + decode, batched == alone."""

from __future__ import annotations

import math

import pytest
import torch

from linrec.models.batch import ForwardBatch
from linrec.models.mamba2 import Mamba2Config, Mamba2ForCausalLM

VOCAB = 96


def demo_config(**overrides) -> dict:
    return {**Mamba2ForCausalLM.demo_hf_config(), "vocab_size": VOCAB, **overrides}


def build_pair(**overrides):
    """transformers' model with every weight made non-trivial, and ours loaded from its state_dict."""
    transformers = pytest.importorskip("transformers")
    cfg = demo_config(**overrides)
    torch.manual_seed(0)
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**cfg)).eval()
    with torch.no_grad():
        # transformers initializes norms and D to ones and conv biases to zeros: perturb them so a
        # swapped or ignored tensor shows up in the logits.
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith(".D") or name.endswith("conv1d.bias") or name.endswith("dt_bias"):
                p.add_(0.3 * torch.randn_like(p))
    ours = Mamba2ForCausalLM.from_hf_config(cfg).eval()
    ours.load_weights(hf.state_dict().items())
    return hf, ours


def prefill(model: Mamba2ForCausalLM, ids: torch.Tensor, state, slot: int = 1, start: int = 0) -> torch.Tensor:
    batch = ForwardBatch.build([len(ids)], start_positions=[start], slot_ids=[slot])
    return model(ids, batch, state)


HF_CASES = {
    "groups1_tied": dict(n_groups=1, tie_word_embeddings=True),
    "groups2": dict(n_groups=2, tie_word_embeddings=False),
    "groups4_no_conv_bias": dict(n_groups=4, use_conv_bias=False, residual_in_fp32=False),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
@torch.no_grad()
def test_matches_transformers_logits_and_greedy(case: str):
    hf, ours = build_pair(**HF_CASES[case])
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, VOCAB, (11,), generator=gen)
    full = torch.randint(0, VOCAB, (37,), generator=gen)  # crosses transformers' chunk of 16 twice

    ref = hf(full[None], use_cache=False).logits[0]
    state = ours.allocate_state(3)
    logits = ours.compute_logits(prefill(ours, full, state))
    diff = (logits - ref).abs().max().item()
    print(f"[{case}] full-sequence logits vs transformers: max abs diff {diff:.2e} (|logits| <= {ref.abs().max():.2f})")
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)

    num_new = 20
    hf.generation_config.eos_token_id = None  # never stop early: both sides produce num_new tokens
    out = hf.generate(
        prompt[None],
        max_new_tokens=num_new,
        do_sample=False,
        use_cache=True,
        return_dict_in_generate=True,
        output_scores=True,
    )
    hf_tokens = out.sequences[0, len(prompt) :].tolist()
    hf_scores = torch.cat(out.scores)  # [num_new, vocab], one row per generated token

    state = ours.allocate_state(3)
    step_logits = [ours.compute_logits(prefill(ours, prompt, state, slot=2))[-1]]
    tokens = [int(step_logits[-1].argmax())]
    for i in range(num_new - 1):
        hidden = prefill(ours, torch.tensor([tokens[-1]]), state, slot=2, start=len(prompt) + i)
        step_logits.append(ours.compute_logits(hidden)[-1])
        tokens.append(int(step_logits[-1].argmax()))
    step_diff = (torch.stack(step_logits) - hf_scores).abs().max().item()
    print(f"[{case}] greedy: {num_new} tokens, per-step logits vs transformers generate: max abs diff {step_diff:.2e}")
    assert tokens == hf_tokens
    assert step_diff < 1e-4


@torch.no_grad()
def test_time_step_limit_matches_transformers_prefill():
    # transformers clamps dt only in its chunked path, so compare the full-sequence forward only.
    hf, ours = build_pair(time_step_limit=(0.02, 0.08))
    ids = torch.randint(0, VOCAB, (21,), generator=torch.Generator().manual_seed(2))
    ref = hf(ids[None], use_cache=False).logits[0]
    logits = ours.compute_logits(prefill(ours, ids, ours.allocate_state(2)))
    print(f"time_step_limit (0.02, 0.08): max abs diff {(logits - ref).abs().max():.2e}")
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    unclamped = Mamba2ForCausalLM.from_hf_config(demo_config()).eval()
    unclamped.load_weights(hf.state_dict().items())
    assert (unclamped.compute_logits(prefill(unclamped, ids, unclamped.allocate_state(2))) - ref).abs().max() > 1e-3


# -- against itself --------------------------------------------------------------------------------


def random_model(**overrides) -> Mamba2ForCausalLM:
    torch.manual_seed(0)
    model = Mamba2ForCausalLM.from_hf_config(demo_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".D") or name.endswith("conv1d.bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def random_states(model: Mamba2ForCausalLM, num_rows: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    state = model.allocate_state(num_rows)
    for layer in state:
        for tensor in layer.values():
            tensor.copy_(0.5 * torch.randn(tensor.shape, generator=gen))
    return state


def clone_states(state):
    return [{name: t.clone() for name, t in layer.items()} for layer in state]


@pytest.mark.parametrize("n_groups", [1, 2])
@torch.no_grad()
def test_full_forward_equals_chunked_prefill_then_decode(n_groups: int):
    model = random_model(n_groups=n_groups)
    ids = torch.randint(0, VOCAB, (41,), generator=torch.Generator().manual_seed(3))
    full_state = model.allocate_state(2)
    full = prefill(model, ids, full_state)

    state = model.allocate_state(2)
    pieces, pos = [], 0
    for n in [7, 1, 2, 19, 5]:  # uneven prefill chunks (one shorter than the conv window), then 1-token decodes
        pieces.append(prefill(model, ids[pos : pos + n], state, start=pos))
        pos += n
    while pos < len(ids):
        pieces.append(prefill(model, ids[pos : pos + 1], state, start=pos))
        pos += 1
    chunked = torch.cat(pieces)
    print(f"n_groups={n_groups}: full vs chunked+decode hidden max abs diff {(chunked - full).abs().max():.2e}")
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)
    for a, b in zip(state, full_state):
        torch.testing.assert_close(a["ssm"], b["ssm"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a["conv"], b["conv"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seq_lens", [[9, 1, 14, 2], [1, 1, 1, 1]], ids=["prefill", "decode"])
@torch.no_grad()
def test_varlen_batch_equals_each_alone(seq_lens: list[int]):
    model = random_model()
    slots = [5, 2, 7, 3]  # out of order; rows 0, 1, 4, 6 belong to nobody here
    starts = [3, 12, 0, 6]
    ids = torch.randint(0, VOCAB, (sum(seq_lens),), generator=torch.Generator().manual_seed(4))
    initial = random_states(model, 8, seed=5)  # nonzero: every sequence resumes from something

    state = clone_states(initial)
    batched = model(ids, ForwardBatch.build(seq_lens, start_positions=starts, slot_ids=slots), state)

    lo = 0
    for n, slot, start in zip(seq_lens, slots, starts):
        alone_state = clone_states(initial)
        alone = prefill(model, ids[lo : lo + n], alone_state, slot=slot, start=start)
        torch.testing.assert_close(batched[lo : lo + n], alone, atol=1e-5, rtol=1e-5)
        for a, b in zip(state, alone_state):
            torch.testing.assert_close(a["ssm"][slot], b["ssm"][slot], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a["conv"][slot], b["conv"][slot], atol=1e-5, rtol=1e-5)
        lo += n
    for a, b in zip(state, initial):
        for name in ("ssm", "conv"):
            torch.testing.assert_close(a[name][[0, 1, 4, 6]], b[name][[0, 1, 4, 6]], atol=0, rtol=0)
    # The initial state matters (otherwise the test above could pass on a model that ignores it).
    fresh = prefill(model, ids[: seq_lens[0]], model.allocate_state(8), slot=slots[0])
    assert (fresh - batched[: seq_lens[0]]).abs().max() > 1e-3


# -- config, init, state, loading ------------------------------------------------------------------


def test_config_validation_and_parsing():
    cfg = Mamba2Config.from_hf({**demo_config(), "time_step_limit": [0.0, math.inf], "torch_dtype": "bfloat16"})
    assert cfg.conv_dim == 128 + 2 * 2 * 16 and cfg.time_step_limit == (0.0, math.inf)
    with pytest.raises(ValueError, match="expand \\* hidden_size == num_heads \\* head_dim"):
        Mamba2Config.from_hf(demo_config(num_heads=6))
    with pytest.raises(ValueError, match="n_groups >= 1 dividing num_heads=8"):
        Mamba2Config.from_hf(demo_config(n_groups=3))
    with pytest.raises(ValueError, match="expected hidden_size to be an integer"):
        Mamba2Config.from_hf(demo_config(hidden_size="64"))
    with pytest.raises(ValueError, match="hidden_act 'silu'"):
        Mamba2Config.from_hf(demo_config(hidden_act="gelu"))
    with pytest.raises(ValueError, match="model_type"):
        Mamba2ForCausalLM.from_hf_config(demo_config(model_type="mamba"))


def test_random_init_is_deterministic_and_sane():
    torch.manual_seed(7)
    a = Mamba2ForCausalLM.from_hf_config(demo_config())
    torch.manual_seed(7)
    b = Mamba2ForCausalLM.from_hf_config(demo_config())
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=0, rtol=0, msg=f"{name} differs under the same seed")
    mixer = a.backbone.layers[0].mixer
    torch.testing.assert_close(-torch.exp(mixer.A_log), -torch.arange(1.0, 9.0))
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert ((dt >= 1e-3 - 1e-6) & (dt <= 0.1 + 1e-6)).all()
    torch.testing.assert_close(a.lm_head.weight, a.backbone.embeddings.weight)  # demo ties embeddings
    with torch.no_grad():
        logits = a.compute_logits(prefill(a, torch.arange(20) % VOCAB, a.allocate_state(2)))
    assert torch.isfinite(logits).all() and logits.abs().max() < 100


def test_state_spec():
    model = Mamba2ForCausalLM.from_hf_config(demo_config()).to(torch.bfloat16)
    spec = model.state_spec()
    assert len(spec) == 2
    assert spec[0]["ssm"].shape == (8, 16, 16) and spec[0]["ssm"].dtype == torch.float32
    assert spec[0]["conv"].shape == (192, 3) and spec[0]["conv"].dtype == torch.bfloat16
    assert model.state_bytes_per_request() == 2 * (8 * 16 * 16 * 4 + 192 * 3 * 2)


@pytest.mark.parametrize("residual_in_fp32", [True, False])
@torch.no_grad()
def test_bfloat16_as_close_to_float32_as_transformers_bfloat16(residual_in_fp32: bool):
    hf, ours = build_pair(residual_in_fp32=residual_in_fp32)
    ids = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(6))
    ref = hf(ids[None], use_cache=False).logits[0]
    hf_bf16 = hf.to(torch.bfloat16)(ids[None], use_cache=False).logits[0]
    hf_bf16_hidden_dtype = hf.backbone(ids[None], use_cache=False).last_hidden_state.dtype
    ours = ours.to(torch.bfloat16)
    hidden = prefill(ours, ids, ours.allocate_state(2))
    # the residual stream's dtype reaches the final norm's output, in transformers as here
    assert hidden.dtype == hf_bf16_hidden_dtype == (torch.float32 if residual_in_fp32 else torch.bfloat16)
    logits = ours.compute_logits(hidden)
    assert logits.dtype == torch.float32 and ours.allocate_state(1)[0]["ssm"].dtype == torch.float32
    ours_err, hf_err = (logits - ref).abs().max().item(), (hf_bf16 - ref).abs().max().item()
    print(
        f"bf16 vs fp32 transformers logits: ours {ours_err:.2e}, transformers bf16 {hf_err:.2e}, "
        f"ours vs transformers bf16 {(logits - hf_bf16).abs().max():.2e}"
    )
    assert ours_err <= 1.5 * hf_err


def test_load_weights_tied_and_errors():
    source = random_model(tie_word_embeddings=True)
    weights = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}
    target = Mamba2ForCausalLM.from_hf_config(demo_config(tie_word_embeddings=True))
    target.load_weights(weights.items())  # tied: lm_head may be absent and is copied from the embeddings
    torch.testing.assert_close(target.lm_head.weight, source.backbone.embeddings.weight)

    untied = Mamba2ForCausalLM.from_hf_config(demo_config(tie_word_embeddings=False))
    with pytest.raises(ValueError, match="missing 1 tensor.*lm_head.weight"):
        untied.load_weights(weights.items())

    # a mamba_ssm checkpoint with an extra gated-MLP part (d_mlp > 0) has a wider in_proj
    name = "backbone.layers.0.mixer.in_proj.weight"
    wider = {**weights, name: torch.zeros(weights[name].shape[0] + 2 * 32, 64)}
    with pytest.raises(ValueError, match="shape mismatch for 'backbone.layers.0.mixer.in_proj.weight'"):
        target.load_weights(wider.items())

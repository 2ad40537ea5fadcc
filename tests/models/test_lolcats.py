"""LoLCATs: a tiny checkpoint in the released `.pt` layout converted and loaded, against an oracle no one here wrote
the parts of: transformers' LlamaForCausalLM (embeddings, RoPE, MLPs, norms, projections, the layer loop), peft's
LoRA merge of the release's LoRA tensors, fla-core's HedgehogFeatureMap (where it matches: F == head_dim, each
half renormalised) and torch SDPA with a banded mask for the window; then the engine's invariants (full forward ==
chunked prefill + decode, varlen == alone) and every malformed release file as a one-line error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from linrec.cli import main as linrec_main
from linrec.models.batch import ForwardBatch
from linrec.models.loader import load_model
from linrec.models.lolcats_checkpoint import convert_lolcats

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
H, HK, D = 4, 2, 16
FEATURES = 16  # == head_dim, where fla's HedgehogFeatureMap (a [D, D] map) can express the release's
RANK, ALPHA = 4, 8.0
WINDOW = 64
WEIGHT_GAIN = 8.0
TOL = 2e-4


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def hf_base(cls=LlamaForCausalLM, config_cls=LlamaConfig, seed=0, **fields):
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **fields})
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            else:  # std 0.02 would leave logits ~1e-2, below any tolerance
                p.mul_(WEIGHT_GAIN)
    return model


def release_tensors(num_layers=2, seed=1, lora_prefix="base_model.model.model.", fmap_prefix="model."):
    """The two released files' state dicts: attention transfer (feature maps, window factors) and LoRA."""
    gen = torch.Generator().manual_seed(seed)
    distill, finetune = {}, {}
    shapes = {"q_proj": (64, H * D), "k_proj": (64, HK * D), "v_proj": (64, HK * D), "o_proj": (H * D, 64)}
    for layer in range(num_layers):
        attn = f"{fmap_prefix}layers.{layer}.self_attn."
        distill[attn + "feature_map_q.mlp.layer"] = torch.randn(H, D, FEATURES, generator=gen) * 0.4
        distill[attn + "feature_map_k.mlp.layer"] = torch.randn(H, D, FEATURES, generator=gen) * 0.4
        distill[attn + "window_factors"] = torch.randn(1, H, 1, 1, generator=gen)
        for proj, (fan_in, fan_out) in shapes.items():
            base = f"{lora_prefix}layers.{layer}.self_attn.{proj}"
            finetune[base + ".lora_A.default.weight"] = torch.randn(RANK, fan_in, generator=gen) * 0.2
            finetune[base + ".lora_B.default.weight"] = torch.randn(fan_out, RANK, generator=gen) * 0.2
    return distill, finetune


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A base Llama saved by transformers, the release's .pt files, and the converted linrec directory."""
    root = tmp_path_factory.mktemp("lolcats")
    base = hf_base()
    base.save_pretrained(root / "base")
    distill, finetune = release_tensors()
    torch.save({"model_state_dict": distill, "step": 10}, root / "distill.pt")
    torch.save(finetune, root / "finetune.pt")
    convert_lolcats(root / "base", root / "converted", [root / "distill.pt", root / "finetune.pt"])
    return root, base, distill, finetune


# -- the oracle -------------------------------------------------------------------------------------------------


def fla_hedgehog(x, weight):
    """The release's phi through fla-core's HedgehogFeatureMap: fla computes softmax([2 x A + b, -(2 x A + b)])
    over both halves at once; with A = W / 2, b = 0 each half is exp(+-xW) over one shared sum, so renormalising
    each half gives cat[softmax(xW), softmax(-xW)]. One fla map per head (fla's is shared across heads)."""
    from fla.modules.feature_map import HedgehogFeatureMap

    out = []
    for h in range(weight.shape[0]):
        fmap = HedgehogFeatureMap(weight.shape[1])
        with torch.no_grad():
            fmap.layer.weight.copy_(weight[h].T / 2)
            fmap.layer.bias.zero_()
            joint = fmap(x[:, h].float())  # [B, T, 2F]
        pos, neg = joint.split(weight.shape[-1], dim=-1)
        out.append(torch.cat([pos / pos.sum(-1, keepdim=True), neg / neg.sum(-1, keepdim=True)], -1).clamp_min(1e-12))
    return torch.stack(out, dim=1)  # [B, H, T, 2F]


def sliding_masks(T):
    """(softmax keys, linear keys) [T, T]: the last WINDOW keys including the current one; all older keys."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (j <= i) & (j > i - WINDOW), j <= i - WINDOW


def terrace_masks(T):
    """The released `_tk` full forward's: a query in block b (of WINDOW) has softmax over blocks b-1 and b (causal),
    65-128 keys; everything before them is linear."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    causal = j <= i
    softmax_keys = causal & (j // WINDOW >= i // WINDOW - 1)
    return softmax_keys, causal & ~softmax_keys


def oracle_attention(maps, masks):
    """An attention function for transformers' Llama: the release's hybrid on its post-RoPE q, k, with the
    softmax and linear keys masks(T) gives."""

    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        fq, fk, factors = maps[module.layer_idx]
        group = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(group, dim=1).float()  # [B, H, T, D]
        v = value.repeat_interleave(group, dim=1).float()
        q = query.float()
        softmax_keys, linear_keys = masks(q.shape[2])
        o_window = F.scaled_dot_product_attention(q, k, v, attn_mask=softmax_keys, scale=scaling)  # normalised
        s = (scaling * q @ k.transpose(-1, -2)).masked_fill(~softmax_keys, float("-inf"))
        window_sum = torch.exp(s - s.amax(-1, keepdim=True)).sum(-1, keepdim=True)  # sum exp(s - m)
        gamma = torch.sigmoid(factors.float())  # [1, H, 1, 1]
        a = (fla_hedgehog(q, fq) @ fla_hedgehog(k, fk).transpose(-1, -2)) * linear_keys
        num = gamma * window_sum * o_window + a @ v
        den = gamma * window_sum + a.sum(-1, keepdim=True)
        return (num / den).transpose(1, 2).to(query.dtype), None

    return attend


def oracle_logits(base, distill, finetune, ids, masks=sliding_masks):
    """transformers' Llama with peft's merge of the release LoRA and the oracle attention."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, config)
    loaded = peft_model.load_state_dict(finetune, strict=False)
    assert not loaded.unexpected_keys
    merged = peft_model.merge_and_unload()
    names = ("feature_map_q.mlp.layer", "feature_map_k.mlp.layer", "window_factors")
    maps = {
        layer: tuple(distill[f"model.layers.{layer}.self_attn.{n}"] for n in names)
        for layer in range(TINY["num_hidden_layers"])
    }
    AttentionInterface.register(f"lolcats_oracle_{masks.__name__}", oracle_attention(maps, masks))
    merged.config._attn_implementation = f"lolcats_oracle_{masks.__name__}"
    with torch.no_grad():
        return merged(ids[None]).logits[0]


def run_full(model, ids, slot=1, num_rows=3):
    state = model.allocate_state(num_rows)
    with torch.no_grad():
        return model.compute_logits(model(ids, ForwardBatch.build([len(ids)], slot_ids=[slot]), state)), state


def run_chunked(model, ids, chunks, slot=1, num_rows=3):
    state = model.allocate_state(num_rows)
    outs, start = [], 0
    with torch.no_grad():
        for n in chunks:
            batch = ForwardBatch.build([n], start_positions=[start], slot_ids=[slot])
            outs.append(model.compute_logits(model(ids[start : start + n], batch, state)))
            start += n
    return torch.cat(outs), state


@pytest.mark.parametrize("T", [40, 150])
def test_converted_release_matches_transformers_peft_fla_oracle(release, T):
    root, base, distill, finetune = release
    model = load_model(root / "converted", dtype="float32")
    ids = torch.randint(0, VOCAB, (T,), generator=torch.Generator().manual_seed(T))
    logits, _ = run_full(model, ids)
    expected = oracle_logits(base, distill, finetune, ids)
    d = max_diff(logits, expected)
    print(f"lolcats vs transformers+peft+fla+SDPA oracle, T={T}: max|dlogits|={d:.2e} (logits ~{expected.std():.1f})")
    assert d < TOL
    # the LoRA matters: the oracle without it is far off
    assert max_diff(logits, oracle_logits(base, distill, {}, ids)) > 100 * TOL


def test_mistral_base_converts_and_matches(tmp_path):
    base = hf_base(MistralForCausalLM, MistralConfig, seed=3, sliding_window=None)
    base.save_pretrained(tmp_path / "base")
    distill, finetune = release_tensors(seed=4, lora_prefix="model.", fmap_prefix="base_model.model.model.")
    torch.save(distill, tmp_path / "d.pt")
    torch.save(finetune, tmp_path / "f.pt")
    convert_lolcats(tmp_path / "base", tmp_path / "out", [tmp_path / "d.pt", tmp_path / "f.pt"])
    model = load_model(tmp_path / "out", dtype="float32")
    ids = torch.randint(0, VOCAB, (90,), generator=torch.Generator().manual_seed(5))
    # prefixes differ between files: the LoRA still lands (keys read from layers.N.self_attn. on)
    renamed = {k.replace("model.layers", "base_model.model.model.layers", 1): v for k, v in finetune.items()}
    renamed = {k.replace("base_model.model.base_model.model.", "base_model.model."): v for k, v in renamed.items()}
    distill = {k.replace("base_model.model.model.", "model."): v for k, v in distill.items()}
    assert max_diff(run_full(model, ids)[0], oracle_logits(base, distill, renamed, ids)) < TOL


@pytest.mark.parametrize("chunks", [[150], [100, 50], [64, 1, 1, 1, 83], [1] * 70 + [80]])
def test_full_forward_equals_chunked_prefill_then_decode(release, chunks):
    model = load_model(release[0] / "converted", dtype="float32")
    ids = torch.randint(0, VOCAB, (150,), generator=torch.Generator().manual_seed(7))
    full, state_full = run_full(model, ids)
    chunked, state_chunked = run_chunked(model, ids, chunks)
    assert max_diff(full, chunked) < 1e-4
    for a, b in zip(state_full, state_chunked):
        for name in a:
            assert max_diff(a[name][1], b[name][1]) < 1e-4, name


def test_varlen_batch_equals_sequences_alone(release):
    model = load_model(release[0] / "converted", dtype="float32")
    gen = torch.Generator().manual_seed(8)
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (70, 1, 130, 9)]
    alone = [run_full(model, s)[0] for s in seqs]
    state = model.allocate_state(6)
    batch = ForwardBatch.build([len(s) for s in seqs], slot_ids=[4, 2, 5, 1])
    with torch.no_grad():
        logits = model.compute_logits(model(torch.cat(seqs), batch, state))
    lo = 0
    for s, ref in zip(seqs, alone):
        assert max_diff(logits[lo : lo + len(s)], ref) < 1e-4
        lo += len(s)


def test_state_is_per_query_head_and_constant(release):
    model = load_model(release[0] / "converted", dtype="bfloat16")
    spec = model.state_spec()[0]
    assert spec["linear"].shape == (H, 2 * FEATURES, D) and spec["linear"].dtype == torch.float32
    assert spec["normalizer"].shape == (H, 2 * FEATURES)
    assert spec["window_k"].shape == (WINDOW, HK, D) and spec["window_k"].dtype == torch.bfloat16
    assert model.config.feature_dim == FEATURES and model.config.window_size == WINDOW


def test_generates_through_the_engine(tmp_path):
    """A converted release with a tokenizer serves: greedy answers equal the full forward's argmax, alone and
    batched with a longer prompt that has moved keys into the linear state."""
    from linrec import LLM, SamplingParams
    from linrec.models.tokenizer import DEMO_VOCAB_SIZE, write_byte_tokenizer

    base = hf_base(seed=5, vocab_size=DEMO_VOCAB_SIZE)
    base.save_pretrained(tmp_path / "base")
    write_byte_tokenizer(tmp_path / "base")
    distill, finetune = release_tensors(seed=6)
    torch.save(distill, tmp_path / "d.pt")
    torch.save(finetune, tmp_path / "f.pt")
    convert_lolcats(tmp_path / "base", tmp_path / "m", [tmp_path / "d.pt", tmp_path / "f.pt"])
    llm = LLM(str(tmp_path / "m"), max_num_seqs=4, max_num_batched_tokens=256, dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[(7 * i) % 250 + 3 for i in range(n)] for n in (5, 100)]
    batched = llm.generate(prompts, params)
    model = llm.engine.model
    for prompt, out in zip(prompts, batched):
        tokens = list(prompt)
        for _ in range(6):  # greedy by full forwards
            tokens.append(int(run_full(model, torch.tensor(tokens))[0][-1].argmax()))
        assert list(out.outputs[0].token_ids) == tokens[len(prompt) :]
        assert llm.generate([prompt], params)[0].outputs[0].token_ids == out.outputs[0].token_ids


# -- malformed releases: one line each ----------------------------------------------------------------------------


def _convert(tmp_path, release, distill=None, finetune=None, **kw):
    root = release[0]
    files = []
    for i, sd in enumerate((distill, finetune)):
        if sd is not None:
            torch.save(sd, tmp_path / f"{i}.pt")
            files.append(tmp_path / f"{i}.pt")
    return convert_lolcats(root / "base", tmp_path / "out", files, **kw)


def _error(tmp_path, release, distill, finetune=None) -> str:
    with pytest.raises(ValueError) as info:
        _convert(tmp_path, release, distill, finetune)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_releases_are_one_line_errors(tmp_path, release):
    distill, finetune = release_tensors()
    key = "model.layers.1.self_attn.feature_map_k.mlp.layer"
    cases = [
        ({k: v for k, v in distill.items() if k != key}, None, "lack layer 1's self_attn.feature_map_k"),
        ({**distill, key: torch.zeros(H, D + 1, FEATURES)}, None, "expected 'model.layers.1.self_attn.feature_map_k"),
        ({**distill, "model.layers.0.self_attn.window_factors": torch.zeros(1, H + 1, 1, 1)}, None, "[1, 4, 1, 1]"),
        ({**distill, "model.layers.0.self_attn.feature_map_q.mlp.bias": torch.zeros(1)}, None, "with a bias"),
        ({**distill, "model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(1)}, None, "unsupported key"),
        ({**distill, "model.layers.7.self_attn.window_factors": torch.zeros(1, H, 1, 1)}, None, "names layer 7"),
        ({**distill, key: torch.zeros(H, D, FEATURES + 2)}, None, "one feature dimension"),
        (
            {k: v for k, v in distill.items() if "window_factors" not in k},
            None,
            "without a sliding window is not supported",
        ),
        (distill, {k: v for k, v in finetune.items() if "lora_B" not in k}, "not its partner"),
        (
            distill,
            {
                **finetune,
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight": torch.zeros(H * D + 1, RANK),
            },
            "expected lora_A [r, 64] and lora_B [64, r]",
        ),  # fmt: skip
        (
            distill,
            {
                **finetune,
                "base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight": torch.zeros(RANK + 1, 64),
                "base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight": torch.zeros(HK * D, RANK + 1),
            },
            "one LoRA rank",
        ),  # fmt: skip
    ]
    for distill_case, finetune_case, expected in cases:
        assert expected in _error(tmp_path, release, distill_case, finetune_case), expected
        assert not (tmp_path / "out").exists()  # nothing half-written


def test_unreadable_files_and_bases_are_one_line_errors(tmp_path, release):
    root = release[0]
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read LoLCATs weights") as info:
        convert_lolcats(root / "base", tmp_path / "out", [tmp_path / "junk.pt"])
    assert "\n" not in str(info.value)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state dict of tensors"):
        convert_lolcats(root / "base", tmp_path / "out", [tmp_path / "list.pt"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_lolcats(root / "base", tmp_path / "out", [tmp_path / "missing.pt"])
    with pytest.raises(ValueError, match="expected at least one"):
        convert_lolcats(root / "base", tmp_path / "out", [])


def test_cli_convert_and_its_errors(tmp_path, release, capsys):
    root = release[0]
    args = ["convert", "--to", "lolcats", "--lolcats-weights", str(root / "distill.pt"), "--lolcats-weights",
            str(root / "finetune.pt"), "--lora-alpha", "8", str(root / "base"), str(tmp_path / "cli")]  # fmt: skip
    assert linrec_main(args) == 0
    model = load_model(tmp_path / "cli", dtype="float32")
    ids = torch.arange(20) % VOCAB
    assert max_diff(run_full(model, ids)[0], run_full(load_model(root / "converted", dtype="float32"), ids)[0]) < 1e-6
    assert linrec_main(["convert", "--to", "lolcats", str(root / "base"), str(tmp_path / "x")]) != 0
    assert linrec_main(["convert", "--to", "liger-gla", "--lolcats-weights", "a.pt", str(root / "base"),
                        str(tmp_path / "y")]) != 0  # fmt: skip
    bad_alpha = ["convert", "--to", "lolcats", "--lolcats-weights", str(root / "finetune.pt"), "--lolcats-weights",
                 str(root / "distill.pt"), "--lora-alpha", "-1", str(root / "base"), str(tmp_path / "z")]  # fmt: skip
    assert linrec_main(bad_alpha) != 0 and not (tmp_path / "z").exists()
    err = capsys.readouterr().err
    assert "needs --lolcats-weights" in err and "go with --to lolcats" in err and "expected lora_alpha > 0" in err
    assert "Traceback" not in err


def test_a_base_other_than_llama_or_mistral_is_refused(tmp_path, release):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(**TINY)).save_pretrained(tmp_path / "qwen2")
    with pytest.raises(
        ValueError, match=r"expected a LoLCATs base of model_type in \('llama', 'mistral'\), got 'qwen2'"
    ):
        convert_lolcats(tmp_path / "qwen2", tmp_path / "out", [release[0] / "distill.pt"])


def test_a_config_pointing_outside_its_directory_is_refused(tmp_path, release):
    import json
    import shutil

    shutil.copytree(release[0] / "converted", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["lolcats_lora"] = "../elsewhere"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="expected lolcats_lora a directory name"):
        load_model(tmp_path / "m")


def test_sliding_window_vs_released_terrace_forward(release):
    """The released `_tk` checkpoints train with a block "terrace" mask, while their decode computes the sliding
    window. Same weights, both forwards: equal within the first window, then apart. (The figure in docs/lolcats.md:
    `pytest -s -k terrace tests/models/test_lolcats.py`.)"""
    root, base, distill, finetune = release
    ids = torch.randint(0, VOCAB, (256,), generator=torch.Generator().manual_seed(11))
    sliding = oracle_logits(base, distill, finetune, ids)
    terrace = oracle_logits(base, distill, finetune, ids, masks=terrace_masks)
    early = max_diff(sliding[:WINDOW], terrace[:WINDOW])
    late = (sliding[WINDOW:] - terrace[WINDOW:]).abs().amax(-1)
    agree = (sliding[WINDOW:].argmax(-1) == terrace[WINDOW:].argmax(-1)).float().mean().item()
    print(
        f"sliding window vs terrace (random tiny model, T=256): positions < {WINDOW}: max|d|={early:.1e}; "
        f"positions >= {WINDOW}: mean max|d| {late.mean():.3f}, max {late.max():.3f} (logit std "
        f"{sliding.std():.2f}); argmax agreement {agree:.1%}"
    )
    assert early < 1e-4 and late.max() > 1e-3

"""The recipe's batched training forward against linrec's inference forward, values and gradients; the merged
checkpoint against the unmerged model with its PEFT adapter."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from linrec.models.batch import ForwardBatch
from linrec.models.convert import convert_checkpoint
from linrec.models.liger_gla import LigerGLAForCausalLM, linearize_hf_config
from linrec.models.loader import load_model
from linrec.recipes.liger_forward import liger_training_forward
from linrec.recipes.tiny_liger import merged_vs_unmerged, write_merged

TINY = {
    "vocab_size": 101,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
# T crosses the 64-key window and the GLA chunk (64) and sub-chunk (16) boundaries, not on a multiple.
B, T = 3, 150


def tiny_llama(seed: int = 0, **fields) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **fields})).eval()
    with torch.no_grad():  # std 0.02 would leave every branch's effect far below the tolerances
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(6.0)
    return model


def liger_of(llama: LlamaForCausalLM) -> LigerGLAForCausalLM:
    config = linearize_hf_config(llama.config.to_dict())
    model = LigerGLAForCausalLM.from_hf_config(config, kernel_backend="torch")
    model.load_weights(llama.state_dict().items())
    return model.eval()


def linrec_logits(model: LigerGLAForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """linrec's inference forward over the rows of ids [B, T] as one varlen batch -> [B, T, vocab]."""
    rows, length = ids.shape
    state = model.allocate_state(rows + 1)
    hidden = model(ids.reshape(-1), ForwardBatch.build([length] * rows), state)
    return model.compute_logits(hidden).view(rows, length, -1)


def test_training_forward_equals_linrec_forward():
    model = liger_of(tiny_llama())
    ids = torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = linrec_logits(model, ids)
        got = liger_training_forward(model, ids)
    assert got.shape == (B, T, TINY["vocab_size"])
    assert expected.abs().max() > 2.0  # logits far from uniform: a wrong branch would show
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_training_forward_equals_linrec_forward_in_bf16():
    model = liger_of(tiny_llama(seed=3)).to(torch.bfloat16)
    ids = torch.randint(0, TINY["vocab_size"], (2, 90), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = linrec_logits(model, ids)
        got = liger_training_forward(model, ids)
    # both round q, k, v, RoPE and the branch outputs to bf16 at the same points; only fp32 sums differ
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_gradients_through_linrec_forward_equal_the_training_forwards():
    """Autograd does pass through linrec's in-place inference forward on a fresh state; both forwards give
    the LoRA parameters the same gradients."""
    model = liger_of(tiny_llama(seed=1))
    torch.manual_seed(0)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(0, TINY["vocab_size"], (2, 100), generator=torch.Generator().manual_seed(3))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(params) == 2 * 3 * TINY["num_hidden_layers"]  # lora_A and lora_B of q, k, v in each layer

    def grads(logits_of) -> dict[str, torch.Tensor]:
        logits = logits_of(model, ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    expected, got = grads(linrec_logits), grads(liger_training_forward)
    for name in params:
        assert expected[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-3, msg=name)


@pytest.fixture(scope="module")
def converted_with_adapter(tmp_path_factory):
    """A converted checkpoint and a PEFT adapter on it whose B matrices are nonzero."""
    root = tmp_path_factory.mktemp("merge")
    tiny_llama(seed=2).save_pretrained(str(root / "llama"))
    liger_dir = convert_checkpoint(root / "llama", root / "liger", to="liger-gla")
    model = load_model(liger_dir, dtype="float32", kernel_backend="torch")
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(str(root / "lora"))
    (liger_dir / "generation_config.json").write_text("{}\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # write_merged copies them; content irrelevant here
        (liger_dir / name).write_text("{}\n")
    return liger_dir, root / "lora"


def test_merged_equals_unmerged_plus_adapter(converted_with_adapter):
    liger_dir, adapter_dir = converted_with_adapter
    ids = torch.randint(0, TINY["vocab_size"], (3, 70), generator=torch.Generator().manual_seed(4)).tolist()
    assert merged_vs_unmerged(liger_dir, adapter_dir, ids) < 1e-4
    # and the adapter matters: the base model alone is far from either
    base = load_model(liger_dir, dtype="float32", kernel_backend="torch")
    merged = load_model(liger_dir, dtype="float32", kernel_backend="torch", merge_lora=adapter_dir)
    flat = torch.tensor(ids)
    assert (linrec_logits(base, flat) - linrec_logits(merged, flat)).abs().max() > 0.1


def test_written_checkpoint_is_the_merge_in_bf16(converted_with_adapter, tmp_path):
    liger_dir, adapter_dir = converted_with_adapter
    out = write_merged(liger_dir, adapter_dir, tmp_path / "out", torch.bfloat16)
    shipped = load_model(out, dtype="auto", kernel_backend="torch")
    merged = load_model(liger_dir, dtype="float32", kernel_backend="torch", merge_lora=adapter_dir)
    assert next(shipped.parameters()).dtype == torch.bfloat16
    shipped_weights = dict(shipped.named_parameters())
    for name, p in merged.named_parameters():
        assert torch.equal(shipped_weights[name], p.to(torch.bfloat16)), name

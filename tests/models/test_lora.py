"""LoRA merge at load time against peft's own merge_and_unload(), and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from linrec.models.demo import demo_llama_config
from linrec.models.loader import checkpoint_files, iter_checkpoint_tensors, load_model
from linrec.models.lora import read_lora_adapter


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINREC_CACHE_DIR", str(tmp_path / "cache"))


def _llama(dst: Path) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**demo_llama_config())
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(dst), safe_serialization=True)
    return model


def _peft_merged(base: torch.nn.Module, config: LoraConfig, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Save a randomly initialized adapter (B != 0) and return peft's merge_and_unload() weights."""
    torch.manual_seed(1)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():  # make every LoRA tensor nonzero, including the B that peft zero-inits
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.5)
    peft_model.save_pretrained(str(adapter_dir))
    merged = peft_model.merge_and_unload()
    return {name: t.detach().clone() for name, t in merged.state_dict().items()}


def _our_merge(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    adapter = read_lora_adapter(adapter_dir)
    return dict(adapter.merge(iter_checkpoint_tensors(checkpoint_files(base_dir))))


def _compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], label: str) -> float:
    max_diff = 0.0
    for name, tensor in ours.items():
        diff = (tensor.float() - theirs[name].float()).abs().max().item()
        max_diff = max(max_diff, diff)
    print(f"{label}: max |ours - peft merge_and_unload| = {max_diff:.3g}")
    assert max_diff < 1e-5, label
    return max_diff


LLAMA_ADAPTERS = {
    # released Liger checkpoints: rank-8 LoRA on q/k/v
    "qkv_r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "down_proj"], use_rslora=True),
    "patterns": dict(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "gate_proj"],
        rank_pattern={"q_proj": 2},
        alpha_pattern={"layers.1.self_attn.v_proj": 3},
    ),
    "embedding_and_modules_to_save": dict(
        r=4, lora_alpha=4, target_modules=["embed_tokens", "k_proj"], modules_to_save=["lm_head"]
    ),
}


@pytest.mark.parametrize("kind", list(LLAMA_ADAPTERS))
def test_merge_equals_peft(kind: str, tmp_path: Path) -> None:
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = _llama(base_dir)
    theirs = _peft_merged(base, LoraConfig(lora_dropout=0.0, **LLAMA_ADAPTERS[kind]), adapter_dir)
    ours = _our_merge(base_dir, adapter_dir)
    originals = load_file(str(base_dir / "model.safetensors"))
    num_changed = sum(not torch.equal(ours[n].float(), originals[n].float()) for n in ours)
    assert num_changed > 0
    _compare(ours, theirs, kind)

    # and the merged Llama loads as Liger-GLA with exactly those weights
    liger = load_model(base_dir, linearize="liger-gla", merge_lora=adapter_dir)
    for name, param in liger.named_parameters():
        torch.testing.assert_close(param, theirs[name], rtol=0, atol=1e-5, msg=name)


def test_merge_equals_peft_fan_in_fan_out(tmp_path: Path) -> None:
    """GPT-2's Conv1D stores weights [in, out]: the delta is (B @ A)^T."""
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    base_dir = tmp_path / "gpt2"
    base.save_pretrained(str(base_dir), safe_serialization=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    theirs = _peft_merged(base, config, tmp_path / "adapter")
    # GPT-2 checkpoints omit the "transformer." prefix the in-memory names carry
    ours = {
        f"transformer.{n}" if not n.startswith(("transformer.", "lm_head")) else n: t
        for n, t in _our_merge(base_dir, tmp_path / "adapter").items()
    }
    _compare({n: t for n, t in ours.items() if n in theirs}, theirs, "fan_in_fan_out")


def _write_adapter(tmp_path: Path, **config_overrides: object) -> tuple[Path, Path]:
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = _llama(base_dir)
    _peft_merged(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), adapter_dir)
    if config_overrides:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        config.update(config_overrides)
        (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    return base_dir, adapter_dir


def _error(exc_info: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc_info.value)
    return str(exc_info.value)


def test_unsupported_adapters_are_refused(tmp_path: Path) -> None:
    base_dir, adapter_dir = _write_adapter(tmp_path)
    config_file = adapter_dir / "adapter_config.json"
    good_config = config_file.read_text()

    for overrides, expected in [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "peft_type='IA3'"),
        ({"peft_type": "PREFIX_TUNING"}, "only LORA"),
        ({"r": 0}, "'r'"),
    ]:
        config_file.write_text(json.dumps({**json.loads(good_config), **overrides}))
        with pytest.raises(ValueError) as e:
            load_model(base_dir, linearize="liger-gla", merge_lora=adapter_dir)
        assert expected in _error(e), overrides
    config_file.write_text(good_config)

    # DoRA weights are recognized even when the config does not say so
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    dora = {**tensors, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}
    save_file(dora, str(adapter_dir / "adapter_model.safetensors"))
    with pytest.raises(ValueError) as e:
        read_lora_adapter(adapter_dir)
    assert "DoRA" in _error(e)


def test_adapter_targeting_missing_module(tmp_path: Path) -> None:
    base_dir, adapter_dir = _write_adapter(tmp_path)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    renamed = {k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qkv_proj"): v for k, v in tensors.items()}
    save_file(renamed, str(adapter_dir / "adapter_model.safetensors"))
    with pytest.raises(ValueError) as e:
        load_model(base_dir, linearize="liger-gla", merge_lora=adapter_dir)
    message = _error(e)
    assert "model.layers.1.self_attn.qkv_proj" in message and "no tensor" in message

    lone_a = {k: v for k, v in tensors.items() if "layers.0.self_attn.q_proj.lora_B" not in k}
    save_file(lone_a, str(adapter_dir / "adapter_model.safetensors"))
    with pytest.raises(ValueError) as e:
        read_lora_adapter(adapter_dir)
    assert "model.layers.0.self_attn.q_proj" in _error(e) and "partner" in str(e.value)


def test_adapter_directory_errors(tmp_path: Path) -> None:
    base_dir, adapter_dir = _write_adapter(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_model(base_dir, linearize="liger-gla", merge_lora=tmp_path / "nowhere")
    assert "nowhere" in _error(e)
    (adapter_dir / "adapter_model.safetensors").rename(adapter_dir / "adapter_model.bin")
    with pytest.raises(FileNotFoundError) as e:
        read_lora_adapter(adapter_dir)
    assert "adapter_model.bin" in _error(e)
    (adapter_dir / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        read_lora_adapter(adapter_dir)
    assert "adapter_config.json" in _error(e)

"""Sparse adapters (SHiRA) read and placed on linrec's projections, against PEFT's own merge_and_unload(),
and linrec's plain sparse-delta format; every refusal is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel, ShiraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from linrec.models.demo import demo_llama_config
from linrec.models.loader import load_model
from linrec.models.sparse import SparseWeights, adapter_kind, read_sparse_adapter, write_sparse_delta
from linrec.models.tokenizer import DEMO_VOCAB_SIZE

PREFIX = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINREC_CACHE_DIR", str(tmp_path / "cache"))


def _llama(dst: Path) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**demo_llama_config())
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(dst), safe_serialization=True)
    return model


def _mamba2(dst: Path) -> torch.nn.Module:
    from linrec.models.mamba2 import Mamba2ForCausalLM

    torch.manual_seed(0)
    config = transformers.Mamba2Config(**{**Mamba2ForCausalLM.demo_hf_config(), "vocab_size": DEMO_VOCAB_SIZE})
    model = transformers.Mamba2ForCausalLM(config).eval()
    model.save_pretrained(str(dst), safe_serialization=True)
    return model


def _shira(base: torch.nn.Module, adapter_dir: Path, **config: object) -> PeftModel:
    """A PEFT SHiRA adapter with random (nonzero) values, saved to `adapter_dir`."""
    torch.manual_seed(1)
    peft_model = get_peft_model(base, ShiraConfig(init_weights=False, random_seed=7, **config))
    peft_model.save_pretrained(str(adapter_dir))
    return peft_model


def _merged(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in peft_model.merge_and_unload().state_dict().items()}


def _projections(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (m.in_features, m.out_features) for name, m in model.projections().items()}


def _apply(model: torch.nn.Module, weights: SparseWeights) -> dict[str, torch.Tensor]:
    """Each adapted projection's weight with the adapter scattered in, on a copy: what the engine will do."""
    out = {}
    projections = model.projections()
    for module, (indices, values) in weights.modules.items():
        w = projections[module].weight.detach().clone()
        w.view(-1)[indices] += values.to(w.dtype)
        out[module] = w
    return out


def _check_placed(weights: SparseWeights) -> None:
    for module, (indices, values) in weights.modules.items():
        assert indices.dtype == torch.int64 and values.dtype == torch.float32, module
        assert indices.shape == values.shape and indices.dim() == 1, module
        assert torch.all(indices[1:] > indices[:-1]), f"{module}: indices not unique and ascending"


def _compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], label: str, atol: float = 0.0) -> None:
    max_diff = max((w - theirs[f"{m}.weight"]).abs().max().item() for m, w in ours.items())
    print(f"{label}: {len(ours)} modules, max |W + scatter - peft merge_and_unload| = {max_diff:.3g}")
    assert max_diff <= atol, label


def _error(exc_info: pytest.ExceptionInfo) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message, message
    return message


# ----------------------------------------------------------------------------------- against PEFT


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_llama_shira_equals_peft_merge(tmp_path: Path) -> None:
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    peft_model = _shira(_llama(base_dir), adapter_dir, r=2, target_modules=LLAMA_TARGETS)
    liger = load_model(base_dir, linearize="liger-gla")
    weights = read_sparse_adapter(adapter_dir, "s", _projections(liger))
    assert adapter_kind(adapter_dir) == "shira" and weights.kind == "shira" and weights.uid == 0
    assert set(weights.modules) == set(liger.projections()), "every projection carries the adapter"
    _check_placed(weights)
    # PEFT's mask: r * (in + out) entries per module, so the adapter keeps all of them
    assert weights.num_params == sum(2 * (i + o) for i, o in _projections(liger).values())
    assert weights.num_bytes == weights.num_params * (8 + 4)
    _compare(_apply(liger, weights), _merged(peft_model), "llama shira")


def test_mamba2_shira_equals_peft_merge(tmp_path: Path) -> None:
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    peft_model = _shira(_mamba2(base_dir), adapter_dir, r=3, target_modules=["in_proj", "out_proj"])
    model = load_model(base_dir)
    weights = read_sparse_adapter(adapter_dir, "m", _projections(model))
    assert set(weights.modules) == set(model.projections()) and len(weights.modules) == 4
    _check_placed(weights)
    _compare(_apply(model, weights), _merged(peft_model), "mamba2 shira")


def test_peft_keys_and_scaling(tmp_path: Path) -> None:
    """What PEFT writes: per module <module>.shira_weight [nnz] and <module>.shira_indices [2, nnz] (no
    adapter name in either key, even for a named adapter), and the scaling it merges with is 1."""
    base = _llama(tmp_path / "base")
    peft_model = get_peft_model(base, ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False), "named")
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    saved = next((tmp_path / "adapter").rglob("adapter_model.safetensors"))
    tensors = load_file(str(saved))
    assert set(tensors) == {
        f"{PREFIX}model.layers.{i}.self_attn.q_proj.shira_{k}" for i in (0, 1) for k in ("weight", "indices")
    }
    assert tensors[f"{PREFIX}{Q}.shira_indices"].shape == (2, 2 * (64 + 64))
    assert not tensors[f"{PREFIX}{Q}.shira_indices"].dtype.is_floating_point
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.scaling == {"named": 1.0}


def _rewrite(adapter_dir: Path, edit) -> None:
    file = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(file))  # edits may share memory


def test_float32_indices_and_duplicates_equal_peft(tmp_path: Path) -> None:
    """Indices stored as float32 (PEFT on Windows) and repeated (row, col) pairs, loaded by PEFT itself too:
    its COO delta sums the repeats."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    _shira(_llama(base_dir), adapter_dir, r=2, target_modules=["q_proj", "down_proj"])
    key = f"{PREFIX}{Q}.shira_indices"

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        indices = tensors[key].clone()
        indices[:, 1:4] = indices[:, :1]  # entry 0's position four times
        tensors[key] = indices.float()

    _rewrite(adapter_dir, edit)
    assert load_file(str(adapter_dir / "adapter_model.safetensors"))[key].dtype == torch.float32
    theirs = _merged(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir)))
    liger = load_model(base_dir, linearize="liger-gla")
    weights = read_sparse_adapter(adapter_dir, "f", _projections(liger))
    _check_placed(weights)
    assert weights.modules[Q][0].numel() == 2 * (64 + 64) - 3, "four repeats become one entry"
    values = load_file(str(adapter_dir / "adapter_model.safetensors"))[f"{PREFIX}{Q}.shira_weight"]
    row, col = load_file(str(adapter_dir / "adapter_model.safetensors"))[key][:, 0].long().tolist()
    flat = weights.modules[Q][0].tolist().index(row * 64 + col)
    assert weights.modules[Q][1][flat] == values[0] + values[1] + values[2] + values[3]
    # one fp32 rounding apart at most, where PEFT adds the repeats to W one by one
    _compare(_apply(liger, weights), theirs, "float32 indices + duplicates", atol=1e-6)


# ------------------------------------------------------------------------------ fused and own format


def _dense_reference(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_coo_tensor(indices, values.float(), shape).to_dense()


def test_fused_qkv_and_gate_up_split_by_rows(tmp_path: Path) -> None:
    """A SHiRA on fused qkv_proj / gate_up_proj lands on q, k, v (gate, up) by row ranges, columns unchanged."""
    _llama(tmp_path / "base")
    liger = load_model(tmp_path / "base", linearize="liger-gla")
    projections = _projections(liger)
    attn, mlp = "model.layers.1.self_attn", "model.layers.1.mlp"
    fused = {f"{attn}.qkv_proj": ("q_proj", "k_proj", "v_proj"), f"{mlp}.gate_up_proj": ("gate_proj", "up_proj")}
    torch.manual_seed(2)
    tensors, dense = {}, {}
    for module, parts in fused.items():
        prefix = module.rpartition(".")[0]
        out_sizes = [projections[f"{prefix}.{p}"][1] for p in parts]
        shape = (sum(out_sizes), projections[f"{prefix}.{parts[0]}"][0])
        flat = torch.randperm(shape[0] * shape[1])[:300]
        indices = torch.stack([flat // shape[1], flat % shape[1]]).to(torch.int32)
        values = torch.randn(300)
        tensors[f"{PREFIX}{module}.shira_indices"] = indices
        tensors[f"{PREFIX}{module}.shira_weight"] = values
        for part, delta in zip(parts, _dense_reference(indices.long(), values, shape).split(out_sizes)):
            dense[f"{prefix}.{part}"] = delta
    adapter_dir = tmp_path / "fused"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "SHIRA", "r": 2}))
    save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))

    weights = read_sparse_adapter(adapter_dir, "fused", projections)
    assert set(weights.modules) == set(dense)
    _check_placed(weights)
    assert weights.num_params == 600
    bases = liger.projections()
    for module, w in _apply(liger, weights).items():
        assert torch.equal(w, bases[module].weight.detach() + dense[module]), module


def test_sparse_delta_round_trip(tmp_path: Path) -> None:
    _llama(tmp_path / "base")
    liger = load_model(tmp_path / "base", linearize="liger-gla")
    projections = _projections(liger)
    torch.manual_seed(3)
    modules, dense = {}, {}
    for module, dtype in [(Q, torch.float32), ("model.layers.1.mlp.down_proj", torch.bfloat16)]:
        in_features, out_features = projections[module]
        flat = torch.randperm(in_features * out_features)[:50]
        indices = torch.stack([flat // in_features, flat % in_features])
        indices = torch.cat([indices, indices[:, :5]], dim=1)  # five repeats, summed
        values = torch.randn(55).to(dtype)
        modules[module] = (indices, values)
        dense[module] = _dense_reference(indices, values, (out_features, in_features))
    adapter_dir = write_sparse_delta(tmp_path / "delta", modules, base_model_name_or_path="tiny-llama")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config == {"peft_type": "LINREC_SPARSE", "format_version": 1, "base_model_name_or_path": "tiny-llama"}
    stored = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert stored[f"{Q}.weight.indices"].dtype == torch.int64
    assert stored["model.layers.1.mlp.down_proj.weight.values"].dtype == torch.bfloat16
    assert adapter_kind(adapter_dir) == "sparse_delta"

    weights = read_sparse_adapter(adapter_dir, "d", projections)
    assert weights.kind == "sparse_delta" and weights.num_params == 100
    _check_placed(weights)
    bases = liger.projections()
    for module, w in _apply(liger, weights).items():
        expected = bases[module].weight.detach() + dense[module]
        torch.testing.assert_close(w, expected, rtol=0, atol=1e-6, msg=module)
    with pytest.raises(FileExistsError):
        write_sparse_delta(adapter_dir, modules)


# ------------------------------------------------------------------------------------------ refusals


@pytest.fixture
def llama_adapter(tmp_path: Path) -> tuple[Path, dict[str, tuple[int, int]]]:
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    _shira(_llama(base_dir), adapter_dir, r=2, target_modules=["q_proj", "v_proj"])
    return adapter_dir, _projections(load_model(base_dir, linearize="liger-gla"))


def _refused(adapter_dir: Path, projections: dict[str, tuple[int, int]], error: type[Exception] = ValueError) -> str:
    with pytest.raises(error) as e:
        read_sparse_adapter(adapter_dir, "bad", projections)
    return _error(e)


def test_missing_and_corrupt_files(llama_adapter, tmp_path: Path) -> None:
    adapter_dir, projections = llama_adapter
    missing = tmp_path / "nowhere"
    for call in (lambda: adapter_kind(missing), lambda: read_sparse_adapter(missing, "x", projections)):
        with pytest.raises(FileNotFoundError) as e:
            call()
        assert "does not exist" in _error(e)
    weights_file = adapter_dir / "adapter_model.safetensors"
    with pytest.raises(ValueError) as e:
        adapter_kind(weights_file)
    assert "is not a directory" in _error(e)
    good = weights_file.read_bytes()
    for corrupt in (b"\x00" * 7, good[: len(good) // 2], b"\xff" * 8 + b"{}"):
        weights_file.write_bytes(corrupt)
        assert "not a readable safetensors file" in _refused(adapter_dir, projections)
    weights_file.unlink()
    assert "no adapter_model.safetensors" in _refused(adapter_dir, projections, FileNotFoundError)
    (adapter_dir / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        adapter_kind(adapter_dir)
    assert "no adapter_config.json" in _error(e)


def test_other_kinds_and_configs(llama_adapter) -> None:
    adapter_dir, projections = llama_adapter
    config_file = adapter_dir / "adapter_config.json"
    good = json.loads(config_file.read_text())
    for overrides, expected in [
        ({"peft_type": "LORA"}, "is a LoRA adapter"),
        ({"peft_type": "IA3"}, "peft_type='IA3'"),
        ({"peft_type": None}, "peft_type=None"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "LINREC_SPARSE", "format_version": 2}, "format_version 1"),
    ]:
        config_file.write_text(json.dumps({**good, **overrides}))
        assert expected in _refused(adapter_dir, projections), overrides
    config_file.write_text(json.dumps({**good, "peft_type": "LORA"}))
    assert adapter_kind(adapter_dir) == "lora"
    config_file.write_text("{not json")
    assert "invalid JSON" in _refused(adapter_dir, projections)


QI, QW = f"{PREFIX}{Q}.shira_indices", f"{PREFIX}{Q}.shira_weight"


def _set(key: str, make):
    return lambda tensors: tensors.__setitem__(key, make(tensors[key]))


def _with(index: tuple[int, int], value):
    def make(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[index] = value
        return t

    return make


REFUSALS = {
    "row out of range": (_set(QI, _with((0, 0), 64)), "within its weight [64, 64], got (row 64"),
    "col out of range": (_set(QI, _with((1, 0), 64)), "within its weight [64, 64]"),
    "negative index": (_set(QI, _with((1, 3), -1)), "within its weight"),
    "float out of range": (_set(QI, lambda t: _with((0, 0), 1e30)(t.float())), "within its weight"),
    "non-integral float": (_set(QI, lambda t: _with((0, 0), 2.5)(t.float())), "integral indices"),
    "nan index": (_set(QI, lambda t: _with((0, 0), float("nan"))(t.float())), "integral indices"),
    "half indices": (_set(QI, lambda t: t.half()), "integer or float32 indices"),
    "indices shape": (_set(QI, lambda t: t[0]), "indices [2, nnz]"),
    "nan value": (_set(QW, _with(5, float("nan"))), "finite values"),
    "inf value": (_set(QW, _with(5, float("inf"))), "finite values"),
    "integer values": (_set(QW, lambda t: t.long()), "float values"),
    "nnz mismatch": (_set(QW, lambda t: t[:-1]), "got 255 values and 256 indices"),
    "missing partner": (lambda t: t.pop(QW), "but not its partner"),
    "unknown module": (
        lambda t: t.update({k.replace("q_proj", "foo_proj"): v for k, v in t.items() if "layers.0.self_attn.q" in k}),
        "'model.layers.0.self_attn.foo_proj', which is not a projection",
    ),
    "lm_head": (
        lambda t: t.update({f"{PREFIX}lm_head.shira_indices": t[QI], f"{PREFIX}lm_head.shira_weight": t[QW]}),
        "an embedding or lm_head",
    ),
    "embedding": (
        lambda t: t.update(
            {f"{PREFIX}model.embed_tokens.shira_indices": t[QI], f"{PREFIX}model.embed_tokens.shira_weight": t[QW]}
        ),
        "an embedding or lm_head",
    ),
    "split and fused": (
        lambda t: t.update({k.replace("q_proj", "qkv_proj"): v for k, v in t.items() if "layers.0.self_attn.q" in k}),
        "twice (split and fused)",
    ),
    "other kind's tensor": (lambda t: t.update({f"{PREFIX}{Q}.lora_A.weight": t[QW]}), "expected tensors named"),
    "no prefix": (lambda t: t.update({f"{Q}.shira_weight": t.pop(QW)}), "starting with 'base_model.model.'"),
    "empty": (lambda t: t.clear(), "holds no sparse deltas"),
    "all modules empty": (
        lambda t: t.update({k: v[..., :0].contiguous() for k, v in t.items()}),
        "holds no sparse deltas",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line(case: str, llama_adapter) -> None:
    adapter_dir, projections = llama_adapter
    edit, expected = REFUSALS[case]
    _rewrite(adapter_dir, edit)
    message = _refused(adapter_dir, projections)
    assert expected in message and "'bad'" in message, message


def test_sparse_delta_refusals(tmp_path: Path) -> None:
    projections = {Q: (64, 64)}
    idx, val = torch.tensor([[0, 1], [2, 3]]), torch.tensor([0.5, -0.5])
    for modules, expected in [
        ({}, "at least one module"),
        ({Q: (idx.float(), val)}, "integer indices"),
        ({Q: (idx[0], val)}, "indices [2, nnz]"),
        ({Q: (idx, val[:1])}, "float values [2]"),
        ({Q: (idx, val.long())}, "float values [2]"),
        ({Q: (-idx, val)}, "nonnegative"),
        ({Q: (idx, val / 0)}, "finite values"),
    ]:
        with pytest.raises(ValueError) as e:
            write_sparse_delta(tmp_path / "never", modules)
        assert expected in _error(e), expected
    assert not (tmp_path / "never").exists()

    # what another writer might put in the format: the reader refuses it the same way
    adapter_dir = write_sparse_delta(tmp_path / "d", {Q: (idx, val)})
    _rewrite(adapter_dir, lambda t: t.update({f"{Q}.weight.indices": idx.float()}))
    assert "expected integer indices" in _refused(adapter_dir, projections)
    _rewrite(adapter_dir, lambda t: t.update({f"{Q}.weight.indices": idx, f"{Q}.shira_weight": val}))
    assert "<module>.weight.indices or <module>.weight.values" in _refused(adapter_dir, projections)

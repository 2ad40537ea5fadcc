"""load_model: single-file and sharded safetensors, dtypes, and a one-line error naming each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from linrec.models.batch import ForwardBatch
from linrec.models.demo import write_demo_model
from linrec.models.loader import load_model, load_tokenizer, resolve_dtype
from linrec.models.registry import DEMO_FAMILIES


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINREC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


# The family the error-path tests load (any would do).
BASE_FAMILY = "liger_gla"


class _DemoDirs(dict):
    """family -> demo checkpoint directory, written on first access and shared by the module's tests."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, family: str) -> Path:
        self[family] = write_demo_model(self.root / family, family)
        return self[family]


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _DemoDirs(tmp_path_factory.mktemp("demo"))


def _copy_demo(src: Path, dst: Path, *, with_weights: bool = True) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        if with_weights or file.suffix != ".safetensors":
            (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _set_config(path: Path, **fields: object) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in fields.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def _write_shards(tensors: dict[str, torch.Tensor], dst: Path, num_shards: int) -> None:
    """Split `tensors` round-robin over num_shards files and write the index, as save_pretrained does."""
    names = sorted(tensors)
    weight_map: dict[str, str] = {}
    for i in range(num_shards):
        shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::num_shards]}
        save_file(part, str(dst / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))


def _run_forward(model: torch.nn.Module, num_tokens: int = 5) -> torch.Tensor:
    vocab = model.config.vocab_size
    input_ids = torch.arange(num_tokens) * 7 % vocab
    batch = ForwardBatch.build([num_tokens])
    state = model.allocate_state(2)
    with torch.no_grad():
        return model.compute_logits(model(input_ids, batch, state))


@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_sharded_equals_single_file(family: str, demo_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = demo_dirs[family]
    tensors = load_file(str(src / "model.safetensors"))
    sharded = _copy_demo(src, tmp_path / "sharded", with_weights=False)
    _write_shards(tensors, sharded, num_shards=3)
    assert not (sharded / "model.safetensors").exists()

    single = load_model(src)
    model = load_model(sharded, progress=True)
    params = dict(model.named_parameters())
    for name, tensor in tensors.items():
        assert torch.equal(params[name], tensor), name
    for (name, a), (_, b) in zip(single.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    logits = _run_forward(model)
    assert logits.shape == (5, model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", DEMO_FAMILIES)
def test_bfloat16_load(family: str, demo_dirs: dict[str, Path]) -> None:
    src = demo_dirs[family]
    tensors = load_file(str(src / "model.safetensors"))
    model = load_model(src, dtype="bfloat16")
    params = dict(model.named_parameters())
    max_diff = 0.0
    for name, tensor in tensors.items():
        assert params[name].dtype == torch.bfloat16, name
        assert torch.equal(params[name], tensor.to(torch.bfloat16)), name
        max_diff = max(max_diff, (params[name].float() - tensor).abs().max().item())
    print(f"{family}: bf16 load max |w_bf16 - w_fp32| = {max_diff:.3g} (rounding only)")
    assert torch.isfinite(_run_forward(model)).all()
    # loading must leave the process-wide default dtype alone
    assert torch.get_default_dtype() == torch.float32


def test_dtype_auto_reads_config(demo_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = demo_dirs[BASE_FAMILY]
    cases = [
        ({"torch_dtype": "bfloat16"}, torch.bfloat16),
        ({"torch_dtype": None, "dtype": "float16"}, torch.float16),  # transformers 5 writes "dtype"
        ({"torch_dtype": None, "dtype": None}, torch.float32),
    ]
    for i, (fields, expected) in enumerate(cases):
        path = _copy_demo(src, tmp_path / f"m{i}")
        _set_config(path, **fields)
        model = load_model(path)  # dtype="auto"
        assert {p.dtype for p in model.parameters()} == {expected}, fields
    # an explicit dtype wins over the config's
    assert next(load_model(path, dtype="bf16").parameters()).dtype == torch.bfloat16
    assert resolve_dtype(torch.float16, {}) == torch.float16


def test_kernel_backend_reaches_model(demo_dirs: dict[str, Path]) -> None:
    for family in DEMO_FAMILIES:
        model = load_model(demo_dirs[family], kernel_backend="torch")
        assert getattr(model, "kernel_backend", "torch") == "torch", family


def _one_line_error(exc_info: pytest.ExceptionInfo) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


def test_missing_and_non_directory_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        load_model(tmp_path / "nope")
    assert "nope" in _one_line_error(e) and "local directories" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        load_model("meta-llama/Llama-3.2-1B")  # a hub id is never downloaded
    assert "meta-llama/Llama-3.2-1B" in _one_line_error(e) and "only local directories" in str(e.value)
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(ValueError) as e:
        load_model(file)
    assert "file.txt" in _one_line_error(e) and "directory" in str(e.value)


def test_config_errors(demo_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = demo_dirs[BASE_FAMILY]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        load_model(empty)
    assert "no config.json" in _one_line_error(e) and "empty" in str(e.value)

    bad_json = _copy_demo(src, tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ValueError) as e:
        load_model(bad_json)
    assert "invalid JSON" in _one_line_error(e) and "config.json" in str(e.value)

    unsupported = _copy_demo(src, tmp_path / "unsupported")
    _set_config(unsupported, model_type="gpt2")
    with pytest.raises(ValueError) as e:
        load_model(unsupported)
    message = _one_line_error(e)
    assert "'gpt2'" in message and "unsupported" in message and str(unsupported) in message
    assert all(family in message for family in DEMO_FAMILIES)

    no_type = _copy_demo(src, tmp_path / "no_type")
    _set_config(no_type, model_type=None)
    with pytest.raises(ValueError) as e:
        load_model(no_type)
    assert "no model_type" in _one_line_error(e)

    bad_config_dtype = _copy_demo(src, tmp_path / "bad_config_dtype")
    _set_config(bad_config_dtype, torch_dtype="float8_e4m3")
    with pytest.raises(ValueError) as e:
        load_model(bad_config_dtype)
    assert "float8_e4m3" in _one_line_error(e)


def test_bad_dtype_and_device(demo_dirs: dict[str, Path]) -> None:
    src = demo_dirs[BASE_FAMILY]
    with pytest.raises(ValueError) as e:
        load_model(src, dtype="float64x")
    assert "'float64x'" in _one_line_error(e) and "bfloat16" in str(e.value)
    with pytest.raises(ValueError) as e:
        load_model(src, device="tpu:0")
    assert "tpu" in _one_line_error(e)
    with pytest.raises(ValueError) as e:
        load_model(src, kernel_backend="cuda")
    assert "'cuda'" in _one_line_error(e)


def test_weight_file_errors(demo_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = demo_dirs[BASE_FAMILY]
    no_weights = _copy_demo(src, tmp_path / "no_weights", with_weights=False)
    (no_weights / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        load_model(no_weights)
    message = _one_line_error(e)
    assert "no *.safetensors" in message and "pytorch_model.bin" in message

    missing_shard = _copy_demo(src, tmp_path / "missing_shard", with_weights=False)
    _write_shards(load_file(str(src / "model.safetensors")), missing_shard, num_shards=2)
    (missing_shard / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_model(missing_shard)
    assert "model-00002-of-00002.safetensors" in _one_line_error(e)


def test_tensor_errors(demo_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = demo_dirs[BASE_FAMILY]
    tensors = load_file(str(src / "model.safetensors"))
    name = next(n for n, t in tensors.items() if t.dim() == 2)

    def write_variant(label: str, variant: dict[str, torch.Tensor]) -> Path:
        path = _copy_demo(src, tmp_path / label, with_weights=False)
        save_file(variant, str(path / "model.safetensors"))
        return path

    wrong_shape = dict(tensors)
    wrong_shape[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    with pytest.raises(ValueError) as e:
        load_model(write_variant("shape", wrong_shape))
    message = _one_line_error(e)
    assert name in message and str(tuple(tensors[name].shape)) in message
    assert str(tuple(wrong_shape[name].shape)) in message

    extra = {**tensors, "model.extra_head.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError) as e:
        load_model(write_variant("extra", extra))
    assert "model.extra_head.weight" in _one_line_error(e)

    missing = {n: t for n, t in tensors.items() if n != name}
    with pytest.raises(ValueError) as e:
        load_model(write_variant("missing", missing))
    assert name in _one_line_error(e) and "missing" in str(e.value)


def test_tokenizer_loads_with_chat_template(demo_dirs: dict[str, Path], tmp_path: Path) -> None:
    tokenizer = load_tokenizer(demo_dirs[BASE_FAMILY])
    assert tokenizer.chat_template
    text = "naïve 🙂"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(tmp_path)
    assert "no tokenizer" in _one_line_error(e)

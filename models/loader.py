"""Loading a model from a local HF-format directory: config.json + safetensors (one file or shards).

The model is built on the target device (random init, fp32) and cast to the load dtype; tensors are
then read one at a time with safetensors' safe_open, so no second copy of the checkpoint is held.
(Building on the meta device would skip the fp32 copy and the init, but would lose any tensor a
model computes in __init__; revisit when 70B-class loads matter.) Optionally the config is
linearized (Llama/Qwen2/Mistral -> Liger-GLA, same weights) and a PEFT LoRA adapter is merged in
while the tensors stream. Nothing here downloads: a path that is not an existing local directory is
an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from linrec.models.tokenizer import load_tokenizer

if TYPE_CHECKING:
    import torch

    from linrec.models.base import CausalLM

__all__ = ["load_model", "load_tokenizer", "read_hf_config", "checkpoint_files", "iter_checkpoint_tensors"]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# transformers 5 writes the floats JSON cannot hold as {"__float__": tag} objects (4.x wrote bare tokens).
FLOAT_TAG = "__float__"
TAGGED_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}

# Accepted `dtype` strings -> torch dtype attribute name. "auto" reads config.json.
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
LINEARIZE_CHOICES = ("liger-gla",)


def dtype_name(dtype: str) -> str:
    """Canonical torch dtype name of a dtype string; ValueError naming the accepted ones."""
    name = DTYPE_NAMES.get(dtype.lower()) if isinstance(dtype, str) else None
    if name is None:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPE_CHOICES)}")
    return name


def resolve_dtype(dtype: str | torch.dtype, hf_config: dict[str, Any]) -> torch.dtype:
    """The dtype to load in: an explicit one, or (auto) config.json's torch_dtype/dtype, else float32."""
    import torch

    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"expected a floating dtype, got {dtype}")
        return dtype
    if not isinstance(dtype, str) or dtype.lower() != "auto":
        return getattr(torch, dtype_name(dtype))
    configured = hf_config.get("torch_dtype") or hf_config.get("dtype")
    if configured is None:
        return torch.float32
    if not isinstance(configured, str) or configured.removeprefix("torch.").lower() not in DTYPE_NAMES:
        raise ValueError(
            f"config.json has torch_dtype {configured!r}; expected one of float32, bfloat16, float16 "
            "(pass an explicit dtype to override)"
        )
    return getattr(torch, dtype_name(configured.removeprefix("torch.")))


def check_model_dir(path: str | Path) -> Path:
    """`path` as a Path if it is an existing local directory; otherwise a one-line error."""
    if not isinstance(path, (str, Path)):
        raise ValueError(f"expected a model directory path, got {type(path).__name__}")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model directory {str(path)!r} does not exist; linrec loads only local directories "
            "(hub ids are not downloaded: fetch the checkpoint first, e.g. with `hf download`)"
        )
    if not path.is_dir():
        raise ValueError(f"model path {str(path)!r} is a file; expected a directory holding config.json")
    return path


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """config.json of a model directory as a dict (with a one-line error when absent or invalid)."""
    path = check_model_dir(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in model directory {str(path)!r}")
    return read_json_object(config_file)


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON file holding one object, with a one-line error naming the file when it is not.

    Non-finite floats come back as floats in every spelling transformers has written them: bare
    Infinity / -Infinity / NaN tokens (4.x; Python's json reads them) and {"__float__": "Infinity"}
    objects (5.x), so that no config reader meets either encoding.
    """
    try:
        value = json.loads(file.read_text(), object_hook=_decode_tagged_float)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"invalid JSON in {str(file)!r}: {exc}") from None
    except ValueError as exc:  # a tagged float we do not know
        raise ValueError(f"in {str(file)!r}: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object in {str(file)!r}, got {type(value).__name__}")
    return value


def _decode_tagged_float(obj: dict[str, Any]) -> Any:
    """json object_hook: {"__float__": "Infinity"} -> inf (likewise -Infinity, NaN); other objects unchanged."""
    if len(obj) != 1 or FLOAT_TAG not in obj:
        return obj
    tag = obj[FLOAT_TAG]
    if not isinstance(tag, str) or tag not in TAGGED_FLOATS:
        expected = " | ".join(json.dumps(t) for t in TAGGED_FLOATS)
        raise ValueError(f"expected a tagged float {{{json.dumps(FLOAT_TAG)}: {expected}}}, got {json.dumps(obj)}")
    return TAGGED_FLOATS[tag]


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files holding a model's weights, in reading order.

    model.safetensors.index.json wins when present (every shard it names must exist), then
    model.safetensors, then every other *.safetensors in the directory.
    """
    path = check_model_dir(path)
    index_file = path / INDEX_FILE
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text())
        except ValueError as exc:
            raise ValueError(f"invalid JSON in {str(index_file)!r}: {exc}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"expected a non-empty 'weight_map' object in {str(index_file)!r}")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (path / shard).is_file():
                raise FileNotFoundError(f"{INDEX_FILE} in {str(path)!r} names shard {shard!r}, which does not exist")
        return [path / shard for shard in shards]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(p for p in path.glob("*.safetensors") if p.name != "adapter_model.safetensors")
    if not files:
        others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f"; found {', '.join(others)} (only safetensors are read)" if others else ""
        raise FileNotFoundError(f"no *.safetensors weights in model directory {str(path)!r}{hint}")
    return files


def checkpoint_tensor_names(files: Iterable[Path]) -> list[str]:
    """Names of every tensor in `files`, read from their headers only."""
    from safetensors import safe_open

    names: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names.extend(f.keys())
    return names


def iter_checkpoint_tensors(files: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor in the file's dtype) for every tensor, read lazily one at a time."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    kernel_backend: str = "auto",
    linearize: str | None = None,
    merge_lora: str | Path | None = None,
    progress: bool = False,
) -> CausalLM:
    """Build the model config.json describes and fill it with the directory's safetensors weights.

    dtype: auto (config.json's torch_dtype or dtype, else float32) | float32 | bfloat16 | float16.
    linearize="liger-gla" reads a Llama/Qwen2/Mistral checkpoint as Liger-GLA (same weights).
    merge_lora: a PEFT LoRA adapter directory merged into the weights as they load (after a lolcats_llama
    directory's own LoRA, config.json's "lolcats_lora").
    progress: show a tqdm bar over the tensors read.
    Raises FileNotFoundError/ValueError with one-line messages that name the offending file or tensor.
    The model comes back in eval mode with gradients off.
    """
    import torch

    from linrec.kernels.backend import resolve_backend
    from linrec.models.registry import get_model_class

    path = check_model_dir(path)
    hf_config = read_hf_config(path)
    if linearize is not None:
        hf_config = linearize_config(hf_config, linearize)
    torch_dtype = resolve_dtype(dtype, hf_config)
    device = _check_device(device)
    resolve_backend(kernel_backend, device)  # validates the name before any work

    model_type = hf_config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        from linrec.models.registry import supported_model_types

        raise ValueError(
            f"config.json in {str(path)!r} has no model_type; expected one of {', '.join(supported_model_types())}"
        )
    try:
        model_cls = get_model_class(model_type)
    except ValueError as exc:
        raise ValueError(f"config.json in {str(path)!r}: {exc}") from None
    files = checkpoint_files(path)

    # A lolcats_llama directory carries its release's LoRA (models/lolcats_checkpoint.py), merged first.
    own_lora = hf_config.get("lolcats_lora")
    if own_lora is not None and (not isinstance(own_lora, str) or not own_lora or Path(own_lora).name != own_lora):
        raise ValueError(
            f"config.json in {str(path)!r}: expected lolcats_lora a directory name in it, got {own_lora!r}"
        )
    merged = ([path / own_lora] if own_lora else []) + ([merge_lora] if merge_lora is not None else [])
    adapters = []
    if merged:
        from linrec.models.lora import read_lora_adapter

        names = checkpoint_tensor_names(files)
        for adapter_dir in merged:
            adapters.append(read_lora_adapter(adapter_dir))
            adapters[-1].check_targets(names)

    # Built on the target device (torch.device's context is thread-local), then cast: changing the
    # process-wide default dtype instead would leak into tensors other threads create meanwhile.
    with torch.device(device):
        model = model_cls.from_hf_config(hf_config, **_constructor_kwargs(model_cls, kernel_backend))
    model.to(torch_dtype)
    weights: Iterable[tuple[str, torch.Tensor]] = iter_checkpoint_tensors(files)
    for adapter in adapters:
        weights = adapter.merge(weights)
    if progress:
        from tqdm import tqdm

        weights = tqdm(weights, total=len(checkpoint_tensor_names(files)), desc=f"loading {path.name}", unit="tensor")
    try:
        model.load_weights(weights)
    except ValueError as exc:
        raise ValueError(f"cannot load {str(path)!r}: {exc}") from None
    model.eval()
    model.requires_grad_(False)
    return model


def linearize_config(hf_config: dict[str, Any], to: str) -> dict[str, Any]:
    """The config.json of the linearized model (`to`="liger-gla"); weights keep their names."""
    if to not in LINEARIZE_CHOICES:
        raise ValueError(f"unsupported linearization {to!r}; expected one of {', '.join(LINEARIZE_CHOICES)}")
    from linrec.models.liger_gla import linearize_hf_config

    return linearize_hf_config(hf_config)


def _constructor_kwargs(model_cls: type, kernel_backend: str) -> dict[str, Any]:
    """kernel_backend (unresolved: the model resolves "auto" against its input's device) reaches the
    model only if its from_hf_config names it."""
    import inspect

    if "kernel_backend" in inspect.signature(model_cls.from_hf_config).parameters:
        return {"kernel_backend": kernel_backend}
    return {}


def _check_device(device: str | torch.device) -> torch.device:
    import torch

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"invalid device {device!r}; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(device)!r}; expected cpu, cuda or cuda:N")
    return device

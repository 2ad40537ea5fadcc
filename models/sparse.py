"""Sparse adapters (SHiRA, arXiv 2406.13175): a few entries of some projection weights change, W' = W + delta
at (row, col) positions. Read from disk and placed on the model's projections here; the engine scatters
them into the live weights and restores the saved originals afterwards.

Two formats (docs/sparse-adapters.md): PEFT's SHiRA (peft_type SHIRA) and linrec's plain sparse delta
(peft_type LINREC_SPARSE, written by `write_sparse_delta`). Both are placed as flat indices into
`weight.view(-1)` with their values, duplicates summed (PEFT builds its delta as a sparse COO tensor, which
sums them), sorted ascending, so that applying is one `w.view(-1)[idx] += values`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from linrec.models.loader import read_json_object
from linrec.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, _split_targets
from linrec.models.staging import write_dir_atomically

SPARSE_KINDS = ("SHIRA", "LINREC_SPARSE")  # adapter_config.json peft_type values read here
FORMAT_VERSION = 1  # of LINREC_SPARSE
_KIND_OF_PEFT_TYPE = {"LORA": "lora", "SHIRA": "shira", "LINREC_SPARSE": "sparse_delta"}
_PEFT_PREFIX = "base_model.model."
# tensor name suffix -> (kind, part) of each format's two tensors per module
_SUFFIXES = {
    "shira": {".shira_indices": "indices", ".shira_weight": "values"},
    "sparse_delta": {".weight.indices": "indices", ".weight.values": "values"},
}
# float dtypes that hold every index a weight can have exactly (PEFT writes float32 indices on Windows);
# half types round integers above 2048, so an index stored in one cannot be trusted
_EXACT_FLOAT_INDICES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class SparseWeights:
    """A sparse adapter placed on a model's projections, ready to scatter into their weights."""

    name: str
    path: Path
    kind: str  # "shira" | "sparse_delta"
    # projection module name -> (flat indices [nnz] int64 into weight.view(-1), i.e. row * in_features + col,
    #                            delta values [nnz] float32); indices unique and sorted ascending, on the CPU
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    uid: int = 0  # the engine's registration number; 0 outside a registry

    @property
    def num_params(self) -> int:
        return sum(indices.numel() for indices, _ in self.modules.values())

    @property
    def num_bytes(self) -> int:
        return sum(i.numel() * i.element_size() + v.numel() * v.element_size() for i, v in self.modules.values())


def adapter_kind(path: str | Path) -> str:
    """'lora' | 'shira' | 'sparse_delta', from the directory's adapter_config.json peft_type.

    Raises FileNotFoundError for a missing directory or config, ValueError for a path that is not a
    directory, a config that is not a JSON object, or another peft_type.
    """
    path = Path(path)
    config = _read_config(path)
    peft_type = config.get("peft_type")
    kind = _KIND_OF_PEFT_TYPE.get(peft_type.upper()) if isinstance(peft_type, str) else None
    if kind is None:
        expected = ", ".join(_KIND_OF_PEFT_TYPE)
        raise ValueError(
            f"unsupported adapter kind peft_type={peft_type!r} in {str(path / ADAPTER_CONFIG)!r}; expected {expected}"
        )
    return kind


def read_sparse_adapter(path: str | Path, name: str, projections: dict[str, tuple[int, int]]) -> SparseWeights:
    """Read a sparse adapter directory and place it on a model's projections ({module: (in, out) features}).

    Raises FileNotFoundError for a missing directory or file, and ValueError, in one line naming what was
    expected, for anything that cannot be placed exactly: another adapter kind, a tensor that is not one of
    the format's, a module that maps to no projection (embeddings and lm_head included), indices outside the
    weight or not integers, indices and values of different lengths, non-finite values, an empty adapter.
    """
    path = Path(path)
    kind = adapter_kind(path)
    where = f"sparse adapter {name!r} ({str(path)!r})"
    if kind == "lora":
        raise ValueError(f"{where} is a LoRA adapter (peft_type LORA), not a sparse one ({', '.join(SPARSE_KINDS)})")
    _check_config(_read_config(path), kind, where)
    tensors = _read_tensors(path, where)

    pairs: dict[str, dict[str, torch.Tensor]] = {}  # checkpoint module -> {"indices": [2, nnz], "values": [nnz]}
    for key, tensor in tensors.items():
        module, part = _parse_key(key, kind, where)
        pairs.setdefault(module, {})[part] = tensor

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in sorted(pairs.items()):
        if len(pair) != 2:
            have = next(iter(pair))
            raise ValueError(f"{where} has {have} for {module!r} but not its partner")
        rows, cols = _indices(pair["indices"], kind, module, where)
        values = _values(pair["values"], module, where)
        if values.numel() != rows.numel():
            raise ValueError(
                f"{where}: expected as many values as indices for {module!r}, "
                f"got {values.numel()} values and {rows.numel()} indices"
            )
        leaf = module.rpartition(".")[2]
        if leaf == "lm_head" or "embed" in leaf:
            raise ValueError(
                f"{where} changes {module!r}, an embedding or lm_head; sparse adapters apply to the decoder's "
                "linear projections only"
            )
        targets = _split_targets(module, projections)
        if targets is None:
            raise ValueError(
                f"{where} targets module {module!r}, which is not a projection of this model; sparse adapters "
                f"apply to the decoder's linear projections (e.g. {next(iter(sorted(projections)), 'none')!r})"
            )
        in_features = projections[targets[0]][0]
        out_total = sum(projections[t][1] for t in targets)
        outside = (rows < 0) | (rows >= out_total) | (cols < 0) | (cols >= in_features)
        if outside.any():
            first = int(outside.nonzero()[0, 0])
            raise ValueError(
                f"{where}: expected indices of {module!r} within its weight [{out_total}, {in_features}], "
                f"got (row {int(rows[first])}, col {int(cols[first])})"
            )
        offset = 0
        for target in targets:  # a fused module's rows divide in output order, its columns unchanged
            target_in, out_features = projections[target]
            if target_in != in_features:
                raise ValueError(
                    f"{where}: fused {module!r} splits onto projections of different in_features "
                    f"({targets[0]!r} {in_features}, {target!r} {target_in})"
                )
            if target in modules:
                raise ValueError(f"{where} changes {target!r} twice (split and fused)")
            mine = (rows >= offset) & (rows < offset + out_features)
            if mine.any():
                flat = (rows[mine] - offset) * in_features + cols[mine]
                modules[target] = _coalesce(flat, values[mine], target, where)
            offset += out_features
    if not modules:
        raise ValueError(f"{where} holds no sparse deltas (expected at least one nonempty module)")
    return SparseWeights(name=name, path=path, kind=kind, modules=modules)


def write_sparse_delta(
    dst: str | Path,
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write linrec's plain sparse-delta adapter: {module: (indices [2, nnz] (row, col), values [nnz])}.

    The directory is built beside `dst` and renamed into place; `dst` must not exist or be empty. Values
    keep their float dtype; indices are written as int64.
    """
    if not modules:
        raise ValueError("expected at least one module to write, got none")
    tensors: dict[str, torch.Tensor] = {}
    for module, (indices, values) in modules.items():
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"expected integer indices for {module!r}, got {indices.dtype}")
        if indices.dim() != 2 or indices.shape[0] != 2:
            raise ValueError(f"expected indices [2, nnz] (row, col) for {module!r}, got {tuple(indices.shape)}")
        if not values.dtype.is_floating_point or values.dim() != 1 or values.numel() != indices.shape[1]:
            raise ValueError(
                f"expected float values [{indices.shape[1]}] for {module!r}, got {values.dtype} {tuple(values.shape)}"
            )
        if (indices < 0).any():
            raise ValueError(f"expected nonnegative indices for {module!r}")
        if not torch.isfinite(values).all():
            raise ValueError(f"expected finite values for {module!r}")
        tensors[f"{module}.weight.indices"] = indices.detach().to("cpu", torch.int64).contiguous()
        tensors[f"{module}.weight.values"] = values.detach().cpu().contiguous()
    config: dict[str, Any] = {"peft_type": "LINREC_SPARSE", "format_version": FORMAT_VERSION}
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path

    def write(staging: Path) -> None:
        from safetensors.torch import save_file

        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    dst = Path(dst).expanduser()
    if not write_dir_atomically(dst, write):
        raise FileExistsError(f"destination {str(dst)!r} was written by another writer meanwhile")
    return dst


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist (only local directories are accepted)")
    if not path.is_dir():
        raise ValueError(f"adapter path {str(path)!r} is not a directory")
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"adapter directory {str(path)!r} has no {ADAPTER_CONFIG}")
    return read_json_object(config_file)


def _check_config(config: dict[str, Any], kind: str, where: str) -> None:
    if kind == "shira":
        # PEFT's SHiRA wraps nn.Linear only and resets this flag to False on it, so true means a writer
        # whose weights would be [in, out]: a layout whose indices mean something else
        if config.get("fan_in_fan_out"):
            raise ValueError(f"{where} sets fan_in_fan_out=true; expected [out, in] (nn.Linear) weights")
        if config.get("modules_to_save"):
            raise ValueError(
                f"{where} saves full modules (modules_to_save={config['modules_to_save']!r}); sparse adapters "
                "change projection entries only"
            )
    else:
        version = config.get("format_version")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise ValueError(f"{where}: expected format_version {FORMAT_VERSION} in {ADAPTER_CONFIG}, got {version!r}")


def _read_tensors(path: Path, where: str) -> dict[str, torch.Tensor]:
    weights_file = path / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        found = "adapter_model.bin (only safetensors are read)" if (path / "adapter_model.bin").is_file() else "none"
        raise FileNotFoundError(f"{where} has no {ADAPTER_WEIGHTS}; found {found}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:  # a corrupt or truncated file; SafetensorError is no ValueError
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise ValueError(
            f"{where}: {ADAPTER_WEIGHTS} is not a readable safetensors file ({type(exc).__name__}: {detail})"
        ) from None


def _parse_key(key: str, kind: str, where: str) -> tuple[str, str]:
    """(checkpoint module name, "indices" | "values") of one tensor name of the format."""
    name = key
    if kind == "shira":
        if not key.startswith(_PEFT_PREFIX):
            raise ValueError(f"{where}: expected tensor names starting with {_PEFT_PREFIX!r}, got {key!r}")
        name = key[len(_PEFT_PREFIX) :]
    for suffix, part in _SUFFIXES[kind].items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], part
    expected = " or ".join(f"<module>{s}" for s in _SUFFIXES[kind])
    raise ValueError(f"{where}: expected tensors named {expected}, got {key!r}")


def _indices(tensor: torch.Tensor, kind: str, module: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [nnz] and columns [nnz] as int64, converted exactly from the stored [2, nnz]."""
    if tensor.dim() != 2 or tensor.shape[0] != 2:
        raise ValueError(f"{where}: expected indices [2, nnz] (row, col) for {module!r}, got {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point:
        if kind != "shira" or tensor.dtype not in _EXACT_FLOAT_INDICES:
            allowed = "integer or float32" if kind == "shira" else "integer"
            raise ValueError(f"{where}: expected {allowed} indices for {module!r}, got {tensor.dtype}")
        integral = torch.isfinite(tensor) & (tensor == tensor.round())
        if not integral.all():
            bad = tensor.flatten()[~integral.flatten()][0].item()
            raise ValueError(f"{where}: expected integral indices for {module!r}, got {bad!r}")
        # a float beyond int64 casts to garbage: anything that large is out of range anyway
        tensor = tensor.clamp(-(2**62), 2**62)
    elif tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise ValueError(f"{where}: expected integer indices for {module!r}, got {tensor.dtype}")
    indices = tensor.to(torch.int64)
    return indices[0], indices[1]


def _values(tensor: torch.Tensor, module: str, where: str) -> torch.Tensor:
    if not tensor.dtype.is_floating_point:
        raise ValueError(f"{where}: expected float values for {module!r}, got {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{where}: expected values [nnz] for {module!r}, got {tuple(tensor.shape)}")
    values = tensor.float()
    if not torch.isfinite(values).all():
        raise ValueError(f"{where}: expected finite values for {module!r}, got a NaN or an infinity")
    return values


def _coalesce(flat: torch.Tensor, values: torch.Tensor, target: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices sorted and unique, with the values of repeated indices summed (as a COO tensor sums them)."""
    unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    if unique.numel() == flat.numel():  # no repeats: a permutation, so every value stays bit for bit
        order = torch.argsort(flat)
        return flat[order].contiguous(), values[order].contiguous()
    summed = torch.zeros(unique.numel(), dtype=torch.float32).index_add_(0, inverse, values)
    if not torch.isfinite(summed).all():
        raise ValueError(f"{where}: expected finite deltas for {target!r}, got an overflow summing repeated indices")
    return unique, summed

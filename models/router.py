"""Layer routers (Dr.LLM-style): a small MLP before each decoder layer that decides, from the layer's input, whether
a request skips the layer (0), executes it once (1) or twice (2). docs/routing.md has the format and the policy.

A router file is a directory with two files:
- `router_config.json`: {"format": "linrec_router", "format_version": 1, "num_layers": L, "hidden_size": D,
  "router_hidden": H, "num_windows": W, "base_model_name_or_path": optional};
- `router.safetensors`: per layer l, `layers.{l}.in.weight` [H, D], `layers.{l}.in.bias` [H],
  `layers.{l}.out.weight` [3, H], `layers.{l}.out.bias` [3], any float dtype (computed in fp32).

Decision for one request at layer l, from the layer's input hidden states x [n, D] of the request's tokens in
the step that decides (its first prefill chunk): the n tokens are cut into min(W, n) contiguous windows of
near-equal length, each window is mean-pooled, the router maps each mean to 3 logits (Linear(D, H) -> GELU ->
Linear(H, 3)), the logits are averaged over the windows, `skip_bias` is added to the skip logit, and the
argmax is the count (ties go to the lower count).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from linrec.models.staging import write_dir_atomically

ROUTER_CONFIG = "router_config.json"
ROUTER_WEIGHTS = "router.safetensors"
FORMAT = "linrec_router"
DEFAULT_ROUTER_HIDDEN = 128  # Dr.LLM's router width
DEFAULT_NUM_WINDOWS = 4


class LayerRouters:
    """Every layer's router, on the model's device, in fp32."""

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], num_windows: int):
        self.weights = weights
        self.num_windows = num_windows

    @property
    def num_layers(self) -> int:
        return len(self.weights)

    @torch.no_grad()
    def decide(self, layer: int, hidden: torch.Tensor, skip_bias: float = 0.0) -> int:
        """The count (0, 1 or 2) layer `layer`'s router gives a request whose tokens' layer input is hidden [n, D]."""
        w_in, b_in, w_out, b_out = self.weights[layer]
        n = hidden.shape[0]
        windows = min(self.num_windows, n)
        bounds = [round(i * n / windows) for i in range(windows + 1)]
        x = hidden.float()
        means = torch.stack([x[bounds[i] : bounds[i + 1]].mean(0) for i in range(windows)])  # [W, D]
        logits = F.linear(F.gelu(F.linear(means, w_in, b_in)), w_out, b_out).mean(0)  # [3]
        logits[0] += skip_bias
        return int(torch.argmax(logits).item())  # the first maximum: ties go to the lower count


def _expected(num_layers: int, hidden_size: int, router_hidden: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for layer in range(num_layers):
        shapes[f"layers.{layer}.in.weight"] = (router_hidden, hidden_size)
        shapes[f"layers.{layer}.in.bias"] = (router_hidden,)
        shapes[f"layers.{layer}.out.weight"] = (3, router_hidden)
        shapes[f"layers.{layer}.out.bias"] = (3,)
    return shapes


def load_routers(path: str | Path, num_layers: int, hidden_size: int, device: torch.device | str) -> LayerRouters:
    """Read a router directory for a model of `num_layers` layers of width `hidden_size`. Raises
    FileNotFoundError or ValueError with one line that names the file and what was expected."""
    path = Path(path)
    config_path, weights_path = path / ROUTER_CONFIG, path / ROUTER_WEIGHTS
    for file in (config_path, weights_path):
        if not file.is_file():
            raise FileNotFoundError(f"expected a router file {file} (docs/routing.md)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: expected JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("format_version") != 1:
        raise ValueError(f"{config_path}: expected format {FORMAT!r} and format_version 1")
    for key, want in (("num_layers", num_layers), ("hidden_size", hidden_size)):
        if config.get(key) != want:
            raise ValueError(f"{config_path}: expected {key} {want} (the model's), got {config.get(key)!r}")
    router_hidden, num_windows = config.get("router_hidden"), config.get("num_windows")
    for key, value in (("router_hidden", router_hidden), ("num_windows", num_windows)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{config_path}: expected {key} a positive integer, got {value!r}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path}: expected a safetensors file ({e})") from None
    expected = _expected(num_layers, hidden_size, router_hidden)
    for name, shape in expected.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise ValueError(f"{weights_path}: expected tensor {name!r} {list(shape)}, missing")
        if tuple(tensor.shape) != shape or not tensor.is_floating_point():
            raise ValueError(
                f"{weights_path}: expected {name!r} a float tensor {list(shape)}, "
                f"got {tensor.dtype} {list(tensor.shape)}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{weights_path}: expected finite values in {name!r}")
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ValueError(f"{weights_path}: unexpected tensor {unknown[0]!r} (the format has layers.<l>.in/out)")
    weights = [
        tuple(
            tensors[f"layers.{layer}.{part}"].to(device, torch.float32)
            for part in ("in.weight", "in.bias", "out.weight", "out.bias")
        )
        for layer in range(num_layers)
    ]
    return LayerRouters(weights, num_windows)


def write_random_routers(
    dst: str | Path,
    num_layers: int,
    hidden_size: int,
    seed: int = 0,
    router_hidden: int = DEFAULT_ROUTER_HIDDEN,
    num_windows: int = DEFAULT_NUM_WINDOWS,
    base_model_name_or_path: str | None = None,
) -> Path:
    """A seeded random router directory (for tests and demos; a trained one has the same layout): weights
    N(0, 1/fan_in) and zero biases, so that the decisions follow the input and vary between layers and prompts."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in _expected(num_layers, hidden_size, router_hidden).items():
        if len(shape) == 1:
            tensors[name] = torch.zeros(shape)
        else:
            tensors[name] = torch.randn(*shape, generator=g) / shape[1] ** 0.5
    config = {
        "format": FORMAT,
        "format_version": 1,
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "router_hidden": router_hidden,
        "num_windows": num_windows,
    }
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path

    def write(tmp: Path) -> None:
        (tmp / ROUTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / ROUTER_WEIGHTS))

    write_dir_atomically(dst, write)
    return Path(dst)

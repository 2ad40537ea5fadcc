"""Checkpoints whose config.json was written by any supported transformers release load, and load alike.

Configs are saved by the installed transformers (save_pretrained, so through its own JSON encoder) and read
from fixtures that older releases wrote (fixtures/transformers_configs, see its README.md); each must give the
linrec config the case expects. transformers 4.x writes non-finite floats as bare `Infinity` tokens, 5.x as
{"__float__": "Infinity"} objects; 5.x moves rope_theta / rope_scaling into rope_parameters.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version
from safetensors.torch import load_file, save_file

from linrec.models.batch import ForwardBatch
from linrec.models.demo import write_demo_model
from linrec.models.loader import linearize_config, load_model, read_hf_config, read_json_object, resolve_dtype
from linrec.models.mamba2 import Mamba2Config
from linrec.models.registry import get_model_class
from linrec.models.rope import RopeConfig

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures" / "transformers_configs"
FIXTURE_VERSIONS = sorted((p.name for p in FIXTURES.iterdir() if p.is_dir()), key=Version)
BASE_MODEL_TYPES = ("llama", "qwen2", "mistral")  # read as Liger-GLA through linearize


def _load_writer() -> Any:
    # Importable without torch so that an old transformers in a bare venv can run it; loaded by path here.
    spec = importlib.util.spec_from_file_location("transformers_config_writer", FIXTURES / "write_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WRITER = _load_writer()
CASES = sorted(WRITER.CASES)


def _rope(theta: float, max_pos: int, rope_type: str = "default", **scaling: Any) -> RopeConfig:
    return RopeConfig(head_dim=16, theta=theta, rope_type=rope_type, max_position_embeddings=max_pos, **scaling)


# case -> linrec config attributes the case must give (an Exception subclass and message: it must be refused)
EXPECTED: dict[str, Any] = {
    "mamba2": {"time_step_limit": (0.0, math.inf), "n_groups": 2, "chunk_size": 16, "tie_word_embeddings": True},
    "llama": {"model_type": "liger_gla", "rope": _rope(500000.0, 2048), "qkv_bias": False},
    "llama_rope_llama3": {
        "rope": _rope(
            500000.0,
            131072,
            "llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        )
    },
    "llama_rope_linear": {"rope": _rope(10000.0, 2048, "linear", factor=2.0)},
    "qwen2": {"model_type": "liger_qwen2_gla", "rope": _rope(1000000.0, 32768), "qkv_bias": True, "head_dim": 16},
    "qwen2_rope_dynamic": {"rope": _rope(1000000.0, 32768, "dynamic", factor=2.0)},
    "qwen2_rope_yarn": (ValueError, "unsupported rope_type 'yarn'"),
    "mistral": {"model_type": "liger_mistral_gla", "rope": _rope(1000000.0, 131072), "qkv_bias": False},
    "mistral_rope_linear": {"rope": _rope(10000.0, 131072, "linear", factor=4.0)},
    "gla": {"clamp_min": -math.inf, "use_short_conv": True, "tie_word_embeddings": True},
    "gated_deltanet": {"head_dim": 16, "expand_v": 2.0, "tie_word_embeddings": True},
}
EXPECTED_DTYPE = {"mamba2": torch.float32, "llama": torch.bfloat16}  # others write none: float32


def linrec_config(hf_config: dict[str, Any]) -> Any:
    """The linrec config load_model would build from this config.json dict."""
    if hf_config.get("model_type") in BASE_MODEL_TYPES:
        hf_config = linearize_config(hf_config, "liger-gla")
    return get_model_class(hf_config["model_type"]).config_class.from_hf(hf_config)


def save_with_installed_transformers(case: str, dst: Path) -> dict[str, Any]:
    """config.json of `case` saved by the installed transformers into dst, as linrec's reader returns it."""
    WRITER.write_config(case, dst)
    return read_hf_config(dst)


def check_expected(case: str, config: Any) -> None:
    for name, value in EXPECTED[case].items():
        assert getattr(config, name) == value, f"{case}: {name}"


# -- the config.json reader ----------------------------------------------------------------------------


def test_reader_decodes_every_non_finite_float_spelling(tmp_path: Path) -> None:
    file = tmp_path / "config.json"
    file.write_text(
        '{"a": [0.0, {"__float__": "Infinity"}, Infinity], "b": {"c": {"__float__": "-Infinity"}, "d": -Infinity},'
        ' "e": {"__float__": "NaN"}, "f": NaN, "g": {"__float__": "NaN", "other": 1}}'
    )
    value = read_json_object(file)
    assert value["a"] == [0.0, math.inf, math.inf]
    assert value["b"] == {"c": -math.inf, "d": -math.inf}
    assert math.isnan(value["e"]) and math.isnan(value["f"])
    assert value["g"] == {"__float__": "NaN", "other": 1}  # not a tagged float: left as it is


@pytest.mark.parametrize("tag", ['"Inf"', '"infinity"', "1.0", "null"])
def test_reader_refuses_an_unknown_float_tag(tmp_path: Path, tag: str) -> None:
    (tmp_path / "config.json").write_text(
        f'{{"model_type": "mamba2", "time_step_limit": [0.0, {{"__float__": {tag}}}]}}'
    )
    with pytest.raises(ValueError, match=r"expected a tagged float .*Infinity.*, got .*__float__") as info:
        read_hf_config(tmp_path)
    assert "config.json" in str(info.value) and "\n" not in str(info.value)


def test_mamba2_time_step_limit_that_is_not_two_numbers_is_a_value_error() -> None:
    # an undecoded tagged float reaching the parser must be a clear ValueError, not float()'s TypeError
    for limit in ([0.0, {"__float__": "Infinity"}], [0.0], "0,inf", [0.0, True]):
        with pytest.raises(ValueError, match="expected time_step_limit as \\[lo, hi\\] numbers"):
            Mamba2Config.from_hf({"time_step_limit": limit})


# -- configs saved by the installed transformers and by older releases ----------------------------------


@pytest.mark.parametrize("case", CASES)
def test_installed_transformers_config_parses_as_expected(case: str, tmp_path: Path) -> None:
    hf_config = save_with_installed_transformers(case, tmp_path)
    expected = EXPECTED[case]
    if isinstance(expected, tuple):
        with pytest.raises(expected[0], match=expected[1]):
            linrec_config(hf_config)
        return
    check_expected(case, linrec_config(hf_config))
    assert resolve_dtype("auto", hf_config) == EXPECTED_DTYPE.get(case, torch.float32)


@pytest.mark.parametrize("version", FIXTURE_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_fixture_parses_like_installed_transformers(case: str, version: str, tmp_path: Path) -> None:
    fixture = FIXTURES / version / f"{case}.json"
    old = read_json_object(fixture)
    assert old["transformers_version"] == version
    new = save_with_installed_transformers(case, tmp_path)
    expected = EXPECTED[case]
    if isinstance(expected, tuple):
        for hf_config in (old, new):
            with pytest.raises(expected[0], match=expected[1]):
                linrec_config(hf_config)
        return
    assert linrec_config(old) == linrec_config(new)
    check_expected(case, linrec_config(old))
    assert resolve_dtype("auto", old) == resolve_dtype("auto", new)


def test_fixtures_cover_every_case_and_the_oldest_supported_release() -> None:
    for version in FIXTURE_VERSIONS:
        assert sorted(p.stem for p in (FIXTURES / version).glob("*.json")) == CASES, version
    # Fixtures may come from releases older than the range too (checkpoints outlive the release that wrote
    # them), but the lowest release the range admits must be among them.
    lowest = _lowest_supported().release[:2]
    assert any(Version(v).release[:2] == lowest for v in FIXTURE_VERSIONS), (
        f"expected a fixture written by transformers {'.'.join(map(str, lowest))}.x, the lowest pyproject.toml "
        f"admits; got {FIXTURE_VERSIONS}"
    )


# -- full loads: transformers' config.json over demo-sized random weights ----------------------------

# case -> the demo family whose weights fit the case's shapes
LOAD_CASES = {
    "mamba2": "mamba2",
    "gla": "gla",
    "gated_deltanet": "gated_deltanet",
    "llama": "liger_gla",
    "qwen2": "liger_gla",
    "mistral": "liger_gla",
}
DEMO_OVERRIDES = {"gla": {"clamp_min": -math.inf}}  # the non-finite field the gla case adds to the demo


@pytest.fixture(scope="module")
def demo_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    return {f: write_demo_model(root / f, f) / "model.safetensors" for f in sorted(set(LOAD_CASES.values()))}


def checkpoint_dir(case: str, source: str, demo_weights: dict[str, Path], dst: Path) -> Path:
    """dst holding `case`'s config.json (saved by the installed transformers, or a fixture of `source`)
    and the matching demo weights."""
    if source == "installed":
        WRITER.write_config(case, dst)
    else:
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(FIXTURES / source / f"{case}.json", dst / "config.json")
    weights = dst / "model.safetensors"
    shutil.copyfile(demo_weights[LOAD_CASES[case]], weights)
    if case == "qwen2":
        # Qwen2 always has q/k/v biases, which the Llama-shaped demo lacks: add random ones.
        tensors = load_file(str(weights))
        gen = torch.Generator().manual_seed(0)
        for name in [n for n in tensors if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))]:
            tensors[name.replace(".weight", ".bias")] = torch.randn(tensors[name].shape[0], generator=gen)
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return dst


def forward(model: Any, ids: torch.Tensor) -> torch.Tensor:
    state = model.allocate_state(2)
    return model.compute_logits(model(ids, ForwardBatch.build([len(ids)]), state))


@pytest.mark.parametrize("source", ["installed", *FIXTURE_VERSIONS])
@pytest.mark.parametrize("case", sorted(LOAD_CASES))
def test_load_model_builds_the_expected_config(case: str, source: str, demo_weights, tmp_path: Path) -> None:
    path = checkpoint_dir(case, source, demo_weights, tmp_path / case)
    linearize = "liger-gla" if case in BASE_MODEL_TYPES else None
    model = load_model(path, linearize=linearize)
    check_expected(case, model.config)
    assert next(model.parameters()).dtype == EXPECTED_DTYPE.get(case, torch.float32)
    family = LOAD_CASES[case]
    if family != "liger_gla":  # the demo config with what the case adds is the config the case describes
        demo = {**get_model_class(family).demo_hf_config(), "vocab_size": 262, **DEMO_OVERRIDES.get(case, {})}
        assert model.config == get_model_class(family).config_class.from_hf(demo)


@pytest.mark.parametrize("source", ["installed", *FIXTURE_VERSIONS])
@torch.no_grad()
def test_mamba2_load_matches_transformers_from_the_same_directory(source: str, demo_weights, tmp_path: Path) -> None:
    path = checkpoint_dir("mamba2", source, demo_weights, tmp_path / "mamba2")
    assert read_hf_config(path)["time_step_limit"] == [0.0, math.inf]
    ours = load_model(path)
    assert ours.config.time_step_limit == (0.0, math.inf)
    from transformers.models.mamba2 import modeling_mamba2

    # MambaRMSNormGated until 5.24, Mamba2RMSNormGated from 5.25
    gated_norm = getattr(modeling_mamba2, "Mamba2RMSNormGated", None) or modeling_mamba2.MambaRMSNormGated
    if "group_size" not in inspect.signature(gated_norm).parameters:
        # Its torch path then normalizes the gated output over all n_groups at once, where later releases and
        # linrec normalize each group on its own: not an oracle for this n_groups=2 model.
        pytest.skip(f"transformers {transformers.__version__}'s torch Mamba2 norms all groups together")
    hf = transformers.Mamba2ForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    assert tuple(hf.config.time_step_limit) == (0.0, math.inf)
    ids = torch.randint(0, 262, (37,), generator=torch.Generator().manual_seed(3))  # > 2 of its 16-token chunks
    ref = hf(ids[None], use_cache=False).logits[0]
    torch.testing.assert_close(forward(ours, ids), ref, atol=1e-4, rtol=1e-4)


# -- the supported range ---------------------------------------------------------------------------


def _supported_transformers() -> Any:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.name == "transformers":
            return requirement.specifier
    raise AssertionError("pyproject.toml does not list transformers among the dependencies")


def _lowest_supported() -> Version:
    lower = [Version(s.version) for s in _supported_transformers() if s.operator in (">=", "==", "~=")]
    assert lower, "expected a lower bound on transformers in pyproject.toml"
    return max(lower)


def test_installed_transformers_is_in_the_supported_range() -> None:
    specifier = _supported_transformers()
    assert any(s.operator in ("<", "<=", "==", "~=") for s in specifier), (
        f"expected an upper bound on transformers (its config format may move again), got {specifier}"
    )
    assert Version(transformers.__version__) in specifier, (
        f"transformers {transformers.__version__} is installed, outside pyproject.toml's {specifier}"
    )


def test_fixture_time_step_limit_spellings() -> None:
    # the two encodings the reader must decode, as the releases wrote them
    assert "Infinity\n" in (FIXTURES / "4.56.2" / "mamba2.json").read_text()
    assert json.loads((FIXTURES / "5.24.0" / "mamba2.json").read_text())["time_step_limit"][1] == {
        "__float__": "Infinity"
    }

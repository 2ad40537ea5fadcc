"""Sparse adapters over HTTP: a peft SHiRA adapter (--lora-modules) and one in linrec's sparse-delta format
(/v1/load_lora_adapter) answer as their merged models do (official `openai` client), are listed with their
type, count their switches in /metrics, and leave the base model's answers and weights as they were."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from linrec.engine.async_llm import AsyncLLM
from linrec.engine.config import EngineConfig
from linrec.models.demo import demo_llama_config
from linrec.models.sparse import write_sparse_delta
from linrec.models.tokenizer import write_byte_tokenizer

openai = pytest.importorskip("openai")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

MODEL = "demo"  # the served name (tests/server/conftest.app_over)
PROMPTS = ["Hello there", "The cat sat"]
GREEDY = {"temperature": 0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}
ENGINE = {"linearize": "liger-gla", "device": "cpu", "dtype": "float32", "max_num_seqs": 8, "max_model_len": 256}


def _llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(**demo_llama_config())
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _save(model: torch.nn.Module, dst: Path) -> str:
    model.save_pretrained(str(dst), safe_serialization=True)
    write_byte_tokenizer(dst)
    return str(dst)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    """The base Llama; a peft SHiRA adapter and a linrec sparse delta; each adapter merged into a copy of the
    base (peft's merge_and_unload, and the delta added by hand): the references."""
    root = tmp_path_factory.mktemp("sparse-api")
    out = {"base": _save(_llama(), root / "base")}
    shira = peft.get_peft_model(
        _llama(), peft.ShiraConfig(r=4, target_modules=["q_proj", "down_proj"], init_weights=False, random_seed=3)
    )
    with torch.no_grad():  # large values: an adapter that leaked into a base answer would change its tokens
        for name, param in shira.named_parameters():
            if "shira_weight" in name:
                param.normal_(std=1.0)
    shira.save_pretrained(str(root / "shira"))
    out["shira"] = str(root / "shira")
    out["shira_merged"] = _save(shira.merge_and_unload(), root / "shira_merged")
    gen = torch.Generator().manual_seed(5)
    model = _llama()
    modules = {}
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"):
        weight = model.get_submodule(name).weight
        out_features, in_features = weight.shape
        flat = torch.randperm(out_features * in_features, generator=gen)[: out_features * in_features // 50]
        values = torch.randn(flat.numel(), generator=gen)
        modules[name] = (torch.stack([flat // in_features, flat % in_features]), values)
        with torch.no_grad():
            weight.view(-1)[flat] += values
    out["delta"] = str(write_sparse_delta(root / "delta", modules))
    out["delta_merged"] = _save(model, root / "delta_merged")
    return out


@contextlib.contextmanager
def served(tools, engine: dict, **server_config) -> Iterator[tuple[str, AsyncLLM]]:
    llm = AsyncLLM(EngineConfig(**engine))
    try:
        with tools.run_app(tools.app_over(llm, None, **server_config)) as base_url:
            yield base_url, llm
    finally:
        llm.shutdown()


def answers(base_url: str, model: str) -> list[str]:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    return [client.completions.create(model=model, prompt=p, **GREEDY).choices[0].text for p in PROMPTS]


@pytest.fixture(scope="module")
def references(dirs, tools) -> dict[str, list[str]]:
    out = {}
    for name in ("base", "shira_merged", "delta_merged"):
        with served(tools, {**ENGINE, "model": dirs[name]}) as (base_url, _):
            out[name] = answers(base_url, MODEL)
    assert len({str(v) for v in out.values()}) == 3, "each adapter must change the answers, or this proves nothing"
    return out


def test_sparse_adapters_answer_as_their_merged_models_and_leave_the_base_alone(dirs, references, tools) -> None:
    engine = {**ENGINE, "model": dirs["base"], "enable_lora": True, "max_loras": 2}
    with served(tools, engine, lora_modules=(("sh", dirs["shira"]),)) as (base_url, llm):
        projections = llm.engine.model.projections()
        before = {name: m.weight.detach().clone() for name, m in projections.items()}
        load = {"lora_name": "sd", "lora_path": dirs["delta"]}
        assert httpx.post(base_url + "/v1/load_lora_adapter", json=load, timeout=60).status_code == 200
        cards = httpx.get(base_url + "/v1/models", timeout=60).json()["data"]
        assert [(c["id"], c.get("parent"), c.get("adapter_type")) for c in cards] == [
            (MODEL, None, None),
            ("sh", MODEL, "shira"),
            ("sd", MODEL, "sparse_delta"),
        ]
        for _ in range(2):  # switch back and forth: every answer is its own model's
            assert answers(base_url, "sh") == references["shira_merged"]
            assert answers(base_url, MODEL) == references["base"]
            assert answers(base_url, "sd") == references["delta_merged"]
        # the three models from concurrent clients, their requests sharing steps: the same answers
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda model: answers(base_url, model), ["sh", MODEL, "sd"]))
        assert together == [references["shira_merged"], references["base"], references["delta_merged"]]
        metrics = httpx.get(base_url + "/metrics", timeout=60).text

        def metric(name: str) -> float:
            lines = [line for line in metrics.splitlines() if line.startswith(f"linrec:{name}")]
            assert lines, name
            return float(lines[0].split()[-1])

        assert metric("sparse_adapter_switches_total") >= 6
        assert metric("sparse_adapter_mixed_steps_total") == llm.engine.scheduler.num_sparse_mixed_steps
        llm.engine.runner.sparse_switch.switch_to(-1)  # whatever ran last: back to the base weights
        for name, module in projections.items():
            assert torch.equal(module.weight, before[name]), name  # bit for bit after every switch

"""The server over an engine it knows only through engine/client.py's EngineClient: a stand-in engine that is no
AsyncLLM (what a remote engine looks like to the app) serves completions, chat, streaming, models, metrics and
health through the official openai client; and AsyncLLM itself satisfies the protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from linrec.engine.adapters import AdapterInfo, AdapterNotFoundError
from linrec.engine.client import EngineClient, EngineDeadError, EngineInfo
from linrec.engine.core import EngineStats
from linrec.engine.output import SampleDelta
from linrec.engine.sampling_params import SamplingParams
from linrec.engine.state_store import StateNotFoundError
from linrec.models.tokenizer import load_tokenizer


class EchoEngine:
    """Answers every prompt with its own first max_tokens tokens, one per delta: no model, no EngineCore."""

    def __init__(self, model_dir: str):
        self._tokenizer = load_tokenizer(model_dir)
        self._model_dir = model_dir
        self.generated: list[list[int]] = []
        self.aborted: list[str] = []
        self.healthy = True

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(self._model_dir, 96, 256, 2, False, num_replicas=3)

    async def generate(
        self, prompt_token_ids, params: SamplingParams, request_id=None, **kwargs
    ) -> AsyncIterator[SampleDelta]:
        self.generated.append(list(prompt_token_ids))
        tokens = (list(prompt_token_ids) * params.max_tokens)[: params.max_tokens]
        for i, token in enumerate(tokens):
            await asyncio.sleep(0)
            last = i == len(tokens) - 1
            delta = SampleDelta(request_id or "x", 0, self._tokenizer.decode([token]), [token], [], None)
            if last:
                delta.finish_reason = "length"
                delta.num_prompt_tokens, delta.num_cached_tokens = len(prompt_token_ids), 0
            yield delta

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=0, num_waiting=0, num_slots_used=0, num_slots_total=7, state_bytes_per_request=1)

    def check_health(self) -> None:
        if not self.healthy:
            raise EngineDeadError("every replica is gone")

    def has_lora_adapter(self, lora_name: str) -> bool:
        return False

    def list_lora_adapters(self) -> list[AdapterInfo]:
        return []

    async def load_lora_adapter(self, lora_name: str, lora_path: str) -> AdapterInfo:
        raise AssertionError("not served")

    async def remove_lora_adapter(self, lora_name: str) -> None:
        raise AdapterNotFoundError(lora_name)

    async def state_info(self, state_id, cache_salt=None):
        raise StateNotFoundError(state_id)

    delete_state = set_state_meta = export_state = state_info

    async def import_state(self, data, state_id, cache_salt=None, meta=None):
        raise StateNotFoundError(state_id)

    async def fork_state(self, state_id, new_state_id, cache_salt=None, meta=None):
        raise StateNotFoundError(state_id)

    def shutdown(self, timeout: float = 5.0) -> None:
        pass


def test_the_app_serves_any_engine_client(server_model_dir, tools) -> None:
    engine = EchoEngine(server_model_dir)
    assert isinstance(engine, EngineClient)
    app = tools.app_over(engine)
    with tools.run_app(app) as base_url:
        import openai

        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="demo", prompt=[5, 6, 7], max_tokens=4, temperature=0.0)
        assert out.choices[0].finish_reason == "length" and out.usage.prompt_tokens == 3
        assert engine.generated[-1] == [5, 6, 7]
        text = "".join(
            chunk.choices[0].delta.content or ""
            for chunk in client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
            )
        )
        assert text and len(engine.generated) == 2
        assert [m.id for m in client.models.list().data] == ["demo"]
        metrics = httpx.get(f"{base_url}/metrics").text
        assert 'linrec:state_slots_total{model_name="demo"} 7.0' in metrics
        assert httpx.get(f"{base_url}/health").status_code == 200
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve("resp_unknown")
        engine.healthy = False
        assert httpx.get(f"{base_url}/health").status_code == 500


def test_async_llm_is_an_engine_client(server_model_dir) -> None:
    from linrec.engine.async_llm import AsyncLLM
    from linrec.engine.config import EngineConfig

    llm = AsyncLLM(EngineConfig(model=server_model_dir, device="cpu", max_num_seqs=2))
    try:
        assert isinstance(llm, EngineClient)
        info = llm.info
        assert info.vocab_size == llm.engine.vocab_size and info.num_layers == len(llm.engine.model.decoder_layers())
        assert info.num_replicas == 1 and not info.serves_adapters
        assert llm.stats().num_slots_total == 2
    finally:
        llm.shutdown()

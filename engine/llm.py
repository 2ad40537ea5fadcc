"""LLM: the offline API (vLLM-like): generate over many prompts, chat with the tokenizer's template."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from linrec.engine.adapters import LoRARequest
from linrec.engine.config import EngineConfig
from linrec.engine.core import EngineCore
from linrec.engine.request import CompletionOutput, EngineRequest, RequestOutput
from linrec.engine.sampling_params import SamplingParams
from linrec.engine.scheduler import QueueFullError

PromptType = str | Sequence[int]


def normalize_prompts(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt (text or token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]
    for p in prompts:
        if not isinstance(p, str) and not (isinstance(p, Sequence) and all(isinstance(t, int) for t in p)):
            raise TypeError(f"expected a prompt as a string or a list of token ids, got {type(p).__name__}")
    return prompts


class LLM:
    """Offline generation over a linrec engine.

    >>> llm = LLM()  # the default model shipped with linrec
    >>> llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = EngineConfig.dtype,
        kernel_backend: str = EngineConfig.kernel_backend,
        max_num_seqs: int = EngineConfig.max_num_seqs,
        max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens,
        state_memory: int | float = EngineConfig.state_memory,
        enable_prefix_caching: bool = EngineConfig.enable_prefix_caching,
        progress: bool = False,
        **kwargs: Any,
    ):
        config = EngineConfig(
            model=model,
            dtype=dtype,
            kernel_backend=kernel_backend,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            state_memory=state_memory,
            enable_prefix_caching=enable_prefix_caching,
            **kwargs,
        )
        self.engine = EngineCore(config, progress=progress)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        cache_salt: str | None = None,
        layer_route: str | Sequence[int] | Sequence[str | Sequence[int] | None] | None = None,
        layer_route_skip_bias: float = 0.0,
        store_state: str | Sequence[str | None] | None = None,
        resume_state: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to its end. lora_request (one for all prompts, or one per prompt) serves them with a
        LoRA adapter (LLM(..., enable_lora=True)); an adapter name seen for the first time is read from its
        lora_path. cache_salt keeps their prefix-cache states apart from other salts'. layer_route (one route
        for all prompts, or one per prompt, None for every layer once) gives each layer's count: 0 skip,
        1 execute, 2 repeat; "auto" lets the model's routers decide it (LLM(..., router=DIR)), with
        layer_route_skip_bias added to their skip logits (docs/routing.md). store_state keeps each prompt's end
        state under an id (one id, or one per prompt); resume_state continues the conversation stored under an
        id, the prompt then holding only the new tokens (docs/responses.md)."""
        prompt_list = normalize_prompts(prompts)
        loras = self._lora_names(lora_request, len(prompt_list))
        # one route (a sequence of ints, or "auto") for every prompt, or one route, "auto" or None per prompt
        if layer_route is not None and not isinstance(layer_route, str):
            layer_route = list(layer_route)
        is_one_route = not isinstance(layer_route, list) or all(isinstance(r, int) for r in layer_route)
        routes = _per_prompt(layer_route, len(prompt_list), is_one_route, "layer_route")
        routes = [r if r is None or isinstance(r, str) else tuple(r) for r in routes]
        stores = _per_prompt(
            store_state, len(prompt_list), store_state is None or isinstance(store_state, str), "store_state"
        )
        resumes = _per_prompt(
            resume_state, len(prompt_list), resume_state is None or isinstance(resume_state, str), "resume_state"
        )
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = _per_prompt(
            sampling_params, len(prompt_list), isinstance(sampling_params, SamplingParams), "SamplingParams"
        )
        pending: list[tuple] = []
        for prompt, params, lora_name, route, store, resume in zip(
            prompt_list, params_list, loras, routes, stores, resumes
        ):
            text = prompt if isinstance(prompt, str) else None
            token_ids = self.tokenizer.encode(prompt) if text is not None else [int(t) for t in prompt]
            pending.append((str(next(self._ids)), text, token_ids, params, lora_name, route, store, resume))
        results: dict[str, RequestOutput] = {
            rid: RequestOutput(
                rid,
                text,
                ids,
                [CompletionOutput(i, "", [], [] if p.logprobs is not None else None, None) for i in range(p.n)],
                False,
            )
            for rid, text, ids, p, *_ in pending
        }
        queue = list(reversed(pending))
        while queue or self.engine.has_unfinished():
            while queue:  # submit as many as the waiting queue takes; the rest wait for room
                rid, _text, ids, params, lora_name, route, store, resume = queue[-1]
                try:
                    request = EngineRequest(
                        rid,
                        ids,
                        params,
                        lora_name=lora_name,
                        layer_route=route,
                        route_skip_bias=layer_route_skip_bias,
                        cache_salt=cache_salt,
                        store_state=store,
                        resume_state=resume,
                    )
                    self.engine.add_request(request)
                except QueueFullError:
                    break
                queue.pop()
            for delta in self.engine.step():
                out = results[delta.request_id]
                sample = out.outputs[delta.index]
                sample.text += delta.text
                sample.token_ids.extend(delta.token_ids)
                if sample.logprobs is not None:
                    sample.logprobs.extend(delta.logprobs)
                if delta.layer_route is not None:
                    sample.layer_route = delta.layer_route
                if delta.finish_reason is not None:
                    sample.finish_reason = delta.finish_reason
                    sample.stop_reason = delta.stop_reason
        for out in results.values():
            out.finished = True
        return [results[rid] for rid, *_ in pending]

    def _lora_names(
        self, lora_request: LoRARequest | Sequence[LoRARequest | None] | None, num_prompts: int
    ) -> list[str | None]:
        """The adapter name of each prompt, loading adapters this engine has not seen (by lora_path)."""
        is_one = lora_request is None or isinstance(lora_request, LoRARequest)
        requests = _per_prompt(lora_request, num_prompts, is_one, "lora_request")
        adapters = self.engine.adapters
        names: list[str | None] = []
        for request in requests:
            if request is None:
                names.append(None)
                continue
            if adapters is None:
                raise ValueError("expected LLM(..., enable_lora=True) to serve a lora_request")
            if request.lora_name not in adapters:
                adapters.load(request.lora_name, request.lora_path)
            names.append(request.lora_name)
        return names

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        *,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them, rendered by the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(conv, add_generation_prompt) for conv in conversations]
        return self.generate(prompts, sampling_params, lora_request=lora_request)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        if not messages:
            raise ValueError("expected at least one chat message, got none")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"the tokenizer of {self.engine.model_path} has no chat template")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)


def _per_prompt(value, num_prompts: int, is_one: bool, what: str) -> list:
    """`value` for every prompt when `is_one`, else the sequence of one value per prompt."""
    if is_one:
        return [value] * num_prompts
    values = list(value)
    if len(values) != num_prompts:
        raise ValueError(f"expected one {what} per prompt, got {len(values)} for {num_prompts}")
    return values

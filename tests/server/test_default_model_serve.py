"""A newcomer's first contact: `linrec serve` with no model, then the official `openai` client. The shipped
default model (models/default/) must answer a chat completion and a completion in readable English, where
the random demo it replaced answered in random bytes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from linrec.loadtest.run import started_server

openai = pytest.importorskip("openai")


def test_linrec_serve_with_no_model_answers_in_english(tmp_path: Path, assert_english) -> None:
    args = argparse.Namespace(port=None, model=None, api_key=None, server_args=[], startup_timeout=180.0)
    with started_server(args, tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        (model,) = [m.id for m in client.models.list().data]
        assert model == "linrec-default"

        chat = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=48,
            temperature=0,
        )
        assert chat.choices[0].message.role == "assistant"
        assert_english(chat.choices[0].message.content)

        # A newcomer's prompts. The model read only the Python docs: a prompt that asks for version numbers
        # ("The standard library of Python" -> " 3.0.1.1.1...") gets them, so these are prose.
        completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=48, temperature=0)
        assert_english(completion.choices[0].text)
        assert completion.usage.completion_tokens > 0

"""Server-sent events stay one `data:` line each, whatever characters the text carries."""

from __future__ import annotations

import json

import httpx
import pytest

from linrec.server.serving import _event

openai = pytest.importorskip("openai")

MODEL = "demo"
# Every character str.splitlines breaks on; JSON escapes the ASCII ones, the server the rest.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
PROMPT = "a\u2028b\x85c\u2029d"


def test_event_escapes_every_line_break_and_round_trips() -> None:
    body = {"text": f"x{LINE_BREAKS}y", "nested": [{"t": "\u2028"}]}
    event = _event(body)
    assert event.endswith("\n\n") and event.startswith("data: ")
    line = event[: -len("\n\n")]
    assert line.splitlines() == [line]
    assert json.loads(line.removeprefix("data: ")) == body


def test_streamed_text_with_unicode_line_separators(live_server) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "echo": True, "max_tokens": 4, "temperature": 0, "stream": True}
    response = httpx.post(f"{live_server.v1}/completions", json=body, timeout=30)
    assert response.status_code == 200
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    for event in events:
        assert event.splitlines() == [event], f"an event spans several lines under str.splitlines: {event!r}"
    texts = [json.loads(e.removeprefix("data: "))["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts).startswith(PROMPT)

    # The official client reassembles exactly the text the non-streaming response carries.
    client = live_server.client()
    whole = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=4, temperature=0)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == whole.choices[0].text
    assert whole.choices[0].text.startswith(PROMPT)

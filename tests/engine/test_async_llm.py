"""AsyncLLM: streaming deltas from the engine thread, refusal, and cancellation freeing the slot."""

from __future__ import annotations

import asyncio
import threading

import pytest

from linrec import LLM, SamplingParams
from linrec.engine.async_llm import AsyncLLM
from linrec.engine.config import EngineConfig
from linrec.engine.scheduler import QueueFullError


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    llm = AsyncLLM(EngineConfig(model=demo_model_dir(), max_num_seqs=4, max_waiting_requests=2))
    yield llm
    llm.shutdown()


def test_stream_concatenates_to_the_offline_result(engine, demo_model_dir):
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, n=2)
    prompt = [5, 6, 7, 8]

    async def collect():
        texts, tokens, reasons = ["", ""], [[], []], [None, None]
        async for delta in engine.generate(prompt, params):
            texts[delta.index] += delta.text
            tokens[delta.index] += delta.token_ids
            reasons[delta.index] = delta.finish_reason
        return texts, tokens, reasons

    texts, tokens, reasons = asyncio.run(collect())
    offline = LLM(demo_model_dir(), max_num_seqs=4).generate([prompt], params)[0]
    assert tokens == [o.token_ids for o in offline.outputs]
    assert texts == [o.text for o in offline.outputs]
    assert reasons == ["length", "length"]


def test_refused_request_raises_and_others_go_on(engine):
    async def run():
        with pytest.raises(ValueError, match="token ids"):
            async for _ in engine.generate([10**9], SamplingParams(max_tokens=2)):
                pass
        out = [d async for d in engine.generate([1, 2], SamplingParams(temperature=0, max_tokens=3))]
        return out

    deltas = asyncio.run(run())
    assert deltas[-1].finish_reason in ("length", "stop")


def test_cancelled_consumer_aborts_and_frees_its_slot(engine):
    scheduler = engine.engine.scheduler

    async def run():
        gen = engine.generate([1, 2, 3], SamplingParams(max_tokens=4000, ignore_eos=True))
        await gen.__anext__()
        assert scheduler.allocator.num_used == 1
        await gen.aclose()  # what a disconnected HTTP client does
        for _ in range(200):
            if scheduler.allocator.num_used == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(run())


def test_caller_cancelled_before_the_engine_accepts_leaves_the_engine_running(engine, monkeypatch):
    """A client that disconnects while its request still sits in the command queue must not kill the
    engine thread (it once did: set_result on the cancelled `accepted` future raised in the thread)."""
    core = engine.engine
    entered, release = threading.Event(), threading.Event()
    step = core.step

    def blocked_step():
        entered.set()
        release.wait(10)
        return step()

    async def run():
        holder = engine.generate([1, 2], SamplingParams(max_tokens=4000, ignore_eos=True))
        await holder.__anext__()  # the engine thread now steps in a loop
        monkeypatch.setattr(core, "step", blocked_step)
        assert await asyncio.to_thread(entered.wait, 10)  # ... and is stuck in a step: commands wait
        waiting = asyncio.ensure_future(anext(engine.generate([3, 4], SamplingParams(max_tokens=2))))
        await asyncio.sleep(0.05)  # the add is queued; the caller now gives up
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        monkeypatch.setattr(core, "step", step)
        release.set()
        await holder.aclose()
        return [d async for d in engine.generate([5, 6], SamplingParams(temperature=0, max_tokens=3))]

    deltas = asyncio.run(asyncio.wait_for(run(), 60))  # a dead engine thread would leave it hanging
    assert engine.errored is None and deltas[-1].finish_reason in ("length", "stop")
    assert core.scheduler.num_waiting == 0 and core.scheduler.allocator.num_used == 0


def test_full_waiting_queue_is_refused(demo_model_dir):
    config = EngineConfig(model=demo_model_dir(), max_num_seqs=1, max_num_batched_tokens=1, max_waiting_requests=1)
    llm = AsyncLLM(config)

    async def run():
        params = SamplingParams(max_tokens=50, ignore_eos=True)
        first = llm.generate(list(range(1, 200)), params)
        second = llm.generate([1, 2], params)
        third = llm.generate([3, 4], params)
        await first.__anext__()  # running: holds the only slot
        task = asyncio.ensure_future(second.__anext__())  # waits in the queue
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError):
            await third.__anext__()
        task.cancel()
        await first.aclose()

    try:
        asyncio.run(run())
    finally:
        llm.shutdown()

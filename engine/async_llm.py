"""AsyncLLM: the engine loop on its own thread, streaming per-request deltas to asyncio callers.

The HTTP event loop never runs model code. It talks to the engine thread through a command queue
(add, abort) and receives deltas on one asyncio.Queue per request; the typed messages keep the
boundary narrow enough to move the engine into its own process later.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from linrec.engine.adapters import AdapterInfo, AdapterNotFoundError
from linrec.engine.client import EngineDeadError, EngineInfo, RequestFailedError
from linrec.engine.config import EngineConfig
from linrec.engine.core import EngineCore, EngineStats
from linrec.engine.output import SampleDelta
from linrec.engine.request import EngineRequest, RequestStatus
from linrec.engine.sampling_params import InvalidRequestError, SamplingParams
from linrec.engine.state_store import StateInfo

logger = logging.getLogger(__name__)


@dataclass
class _Add:
    request: EngineRequest
    accepted: concurrent.futures.Future  # set once the engine validated and queued it (or refused it)


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Call:
    """Run fn(*args) on the engine thread (stored-state operations: they touch the pool)."""

    fn: object
    args: tuple
    done: concurrent.futures.Future


class AsyncLLM:
    def __init__(self, config: EngineConfig, progress: bool = False):
        self.engine = EngineCore(config, progress=progress)
        self._commands: queue.Queue[_Add | _Abort | _Call | None] = queue.Queue()
        # request id -> (its event loop, its queue of SampleDelta | Exception)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopped = threading.Event()
        self.errored: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="linrec-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def info(self) -> EngineInfo:
        engine = self.engine
        return EngineInfo(
            engine.model_path,
            engine.max_model_len,
            engine.vocab_size,
            len(engine.model.decoder_layers()),
            engine.adapters is not None,
        )

    def stats(self) -> EngineStats:
        """A snapshot for metrics (read on the caller's thread; each count may be one step stale)."""
        return self.engine.stats()

    def has_lora_adapter(self, lora_name: str) -> bool:
        return self.engine.adapters is not None and lora_name in self.engine.adapters

    async def remove_lora_adapter(self, lora_name: str) -> None:
        self.unload_lora_adapter(lora_name)

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        layer_route: tuple[int, ...] | str | None = None,
        route_skip_bias: float = 0.0,
        store_state: str | None = None,
        resume_state: str | None = None,
        state_meta: dict | None = None,
    ) -> AsyncIterator[SampleDelta]:
        """Queue a prompt and yield its deltas until all n samples finish. lora_name: a loaded adapter (None:
        the base model); cache_salt: keeps its prefix-cache states apart from other salts'. store_state: keep the
        end state under this id; resume_state: continue the conversation stored under this id (prompt_token_ids
        are then only the new tokens); state_meta: kept with the stored state (docs/responses.md).

        Raises ValueError / QueueFullError / AdapterNotFoundError before the first delta if the engine refuses
        the request. Cancelling the consumer (client gone) aborts the request and frees its slot within one step.
        """
        if self.errored is not None:
            raise EngineDeadError(_dead_message(self.errored))
        if lora_name is not None:
            # An adapter that fell out of the host tier is read here, in a worker thread: the engine thread
            # then finds it in memory, and nobody else's request waits on this disk read.
            await asyncio.to_thread(self.engine.resolve_adapter, lora_name)
        if resume_state is not None:  # likewise a stored state that went to disk
            await asyncio.to_thread(self.engine.states.prefetch, resume_state)
        request_id = request_id or self.new_request_id()
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, stream)
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        request = EngineRequest(
            request_id,
            list(prompt_token_ids),
            params,
            lora_name=lora_name,
            layer_route=layer_route,
            route_skip_bias=route_skip_bias,
            cache_salt=cache_salt,
            store_state=store_state,
            resume_state=resume_state,
            state_meta=state_meta,
        )
        self._commands.put(_Add(request, accepted))
        if self.errored is not None:  # the engine died after the check above: nobody will take the add
            self._refuse_queued_commands()
        finished = False
        try:
            await asyncio.wrap_future(accepted)
            num_open = params.n
            while num_open:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason == RequestStatus.FINISHED_ERROR.value:
                    raise RequestFailedError(
                        f"request {request_id} failed inside the engine and was ended; the server log has "
                        "the details, and other requests were not affected"
                    )
                if item.finish_reason is not None:
                    num_open -= 1
                yield item
            finished = True
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def load_lora_adapter(self, lora_name: str, lora_path: str) -> AdapterInfo:
        """Read and register an adapter in a worker thread (the engine goes on meanwhile). Raises
        AdapterExistsError, FileNotFoundError or ValueError with one line saying what was expected."""
        if self.engine.adapters is None:
            raise InvalidRequestError("this engine serves no LoRA adapters (start it with --enable-lora)")
        return await asyncio.to_thread(self.engine.adapters.load, lora_name, lora_path)

    def unload_lora_adapter(self, lora_name: str) -> None:
        """Forget an adapter: later requests for it are refused; the running ones finish on it."""
        if self.engine.adapters is None:
            raise AdapterNotFoundError(f"The lora adapter '{lora_name}' cannot be found.")
        self.engine.adapters.unload(lora_name)

    def list_lora_adapters(self) -> list[AdapterInfo]:
        return self.engine.adapters.list() if self.engine.adapters is not None else []

    # -- stored states (docs/responses.md): each runs on the engine thread, between steps --------------------------

    async def state_info(self, state_id: str, cache_salt: str | None = None) -> StateInfo:
        return await self._call(self.engine.state_info, state_id, cache_salt)

    async def delete_state(self, state_id: str, cache_salt: str | None = None) -> None:
        await self._call(self.engine.delete_state, state_id, cache_salt)

    async def set_state_meta(self, state_id: str, meta: dict, cache_salt: str | None = None) -> None:
        await self._call(self.engine.set_state_meta, state_id, meta, cache_salt)

    async def export_state(self, state_id: str, cache_salt: str | None = None) -> bytes:
        await asyncio.to_thread(self.engine.states.prefetch, state_id)
        return await self._call(self.engine.export_state, state_id, cache_salt)

    async def import_state(
        self, data: bytes, state_id: str, cache_salt: str | None = None, meta: dict | None = None
    ) -> StateInfo:
        return await self._call(self.engine.import_state, data, state_id, cache_salt, meta)

    async def fork_state(
        self, state_id: str, new_state_id: str, cache_salt: str | None = None, meta: dict | None = None
    ) -> StateInfo:
        await asyncio.to_thread(self.engine.states.prefetch, state_id)
        return await self._call(self.engine.fork_state, state_id, new_state_id, cache_salt, meta)

    async def _call(self, fn, *args):
        if self.errored is not None:
            raise EngineDeadError(_dead_message(self.errored))
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Call(fn, args, done))
        if self.errored is not None:
            self._refuse_queued_commands()
        return await asyncio.wrap_future(done)

    def check_health(self) -> None:
        """Raise EngineDeadError unless the engine thread is alive and serving."""
        if self.errored is not None:
            raise EngineDeadError(_dead_message(self.errored))
        if not self._thread.is_alive() and not self._stopped.is_set():
            raise EngineDeadError("the engine thread is not running")

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort([request_id]))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self._commands.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():  # the engine thread is done with the pool: stored states go to disk
            self.engine.close()

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                self._drain_commands(block=not self.engine.has_unfinished())
                if self.engine.has_unfinished():
                    for delta in self.engine.step():
                        self._emit(delta.request_id, delta)
        except BaseException as exc:  # noqa: BLE001 -- every waiting caller must hear of it
            logger.exception("linrec engine thread stopped")
            self.errored = exc
            for request_id in list(self._streams):
                self._emit(request_id, EngineDeadError(_dead_message(exc)))
            self._refuse_queued_commands()

    def _refuse_queued_commands(self) -> None:
        """After the engine died: adds still queued are refused (their callers would wait forever)."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add) and command.accepted.set_running_or_notify_cancel():
                command.accepted.set_exception(EngineDeadError(_dead_message(self.errored)))
            elif isinstance(command, _Call) and command.done.set_running_or_notify_cancel():
                command.done.set_exception(EngineDeadError(_dead_message(self.errored)))

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            # A caller cancelled while its add was queued (client gone) also cancelled `accepted`:
            # skip the add (its abort follows in the queue). Once running, `accepted` cannot be cancelled.
            if isinstance(command, _Add) and command.accepted.set_running_or_notify_cancel():
                try:
                    self.engine.add_request(command.request)
                except Exception as exc:  # refused: the caller raises it, the engine goes on
                    command.accepted.set_exception(exc)
                else:
                    command.accepted.set_result(None)
            elif isinstance(command, _Abort):
                self.engine.abort(command.request_ids)
            elif isinstance(command, _Call) and command.done.set_running_or_notify_cancel():
                try:
                    result = command.fn(*command.args)
                except Exception as exc:  # refused (unknown id, a bad import): the caller raises it
                    command.done.set_exception(exc)
                else:
                    command.done.set_result(result)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _emit(self, request_id: str, item: SampleDelta | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, stream = target
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            pass


def _dead_message(exc: BaseException) -> str:
    # The exception's text may quote whichever request was running: only its type leaves the process.
    return f"the engine stopped ({type(exc).__name__}); the server log has the details"

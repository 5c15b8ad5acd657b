"""AsyncEngine: the engine loop on its own thread, with an asyncio-facing generate()/abort().

Only the engine thread touches the LLMEngine. Callers hand it commands (add, abort) through
a queue; it runs steps while there is work and sends each request's outputs back to that
caller's asyncio queue with call_soon_threadsafe. So the HTTP event loop never blocks on the
model, and any number of callers can stream at once.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from glmserve.engine.llm_engine import LLMEngine
from glmserve.engine.outputs import StreamOutput
from glmserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")
RATE_WINDOW_S = 10.0  # tokens/s is measured over this trailing window


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    num_running: int  # choices not finished yet

    def push(self, item: StreamOutput | BaseException) -> None:
        _call_soon(self.loop, self.outputs.put_nowait, item)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Hand work to a caller's event loop; a loop closed under a live request must not kill the engine."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        logger.warning("dropping output for a request whose event loop is closed")


def _deliver(items: list[tuple[asyncio.Queue, StreamOutput]]) -> None:
    for outputs, out in items:
        outputs.put_nowait(out)


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]):
        """Pass a factory (e.g. `lambda: LLMEngine(path, config)`) so the model loads on the engine
        thread: OpenMP thread teams are per master thread, and torch ops ran about twice as fast
        there as in a thread other than the one that loaded the model (docs/engine.md). A ready
        LLMEngine is accepted too. Load errors re-raise here."""
        factory = engine if callable(engine) else (lambda: engine)
        self.engine: LLMEngine | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._token_times: collections.deque[tuple[float, int]] = collections.deque()
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self._stopping = False
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(factory, ready), name="glmserve-engine", daemon=True)
        self._thread.start()
        ready.result()

    # -- caller side (any thread, usually the event loop) --------------------------------------
    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, lora: str | None = None
    ) -> AsyncIterator[StreamOutput]:
        """Yield outputs as they come, of all params.n choices (told apart by `out.index`), on the
        base model or the LoRA adapter `lora`. ValueError (UnknownAdapterError) before the first
        output if the request is invalid. Leaving the loop early (break, cancellation, client gone)
        aborts the request."""
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n)
        accepted: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("add", request_id, prompt_token_ids, params, lora, stream, accepted))
        await asyncio.wrap_future(accepted)  # raises the engine's ValueError
        num_running = params.n
        try:
            while num_running:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                num_running -= item.finished
                yield item
        finally:
            if num_running:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread between steps (e.g. loading an adapter); its result or error."""
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("call", fn, done))
        return await asyncio.wrap_future(done)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(("stop",))
        self._thread.join(timeout_s)

    def stats(self) -> dict[str, float]:
        now = time.monotonic()
        recent = sum(n for t, n in list(self._token_times) if now - t <= RATE_WINDOW_S)
        return {
            **self.engine.stats(),
            "generation_tokens_per_s": recent / RATE_WINDOW_S,
            "num_generated_tokens": self.num_generated_tokens,
            "num_prompt_tokens": self.num_prompt_tokens,
        }

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    # -- engine thread ---------------------------------------------------------------------------
    def _run(self, factory: Callable[[], LLMEngine], ready: concurrent.futures.Future) -> None:
        try:
            self.engine = factory()
        except BaseException as error:  # surfaces in the constructor
            ready.set_exception(error)
            return
        ready.set_result(None)
        while True:
            block = not self.engine.has_unfinished
            if not self._drain_commands(block):
                break
            if self.engine.has_unfinished:
                self._step()
        self._fail_all(EngineDeadError("the engine stopped"))

    def _drain_commands(self, block: bool) -> bool:
        """Apply waiting commands (blocking for one if idle); False once asked to stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if command[0] == "stop":
                return False
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: tuple) -> None:
        if command[0] == "abort":
            if self.engine.abort(command[1]):
                self._streams.pop(command[1], None)
            return
        if command[0] == "call":
            _, fn, done = command
            try:
                done.set_result(fn(self.engine))
            except Exception as error:  # the caller's to handle; the loop goes on
                done.set_exception(error)
            return
        _, request_id, prompt_token_ids, params, lora, stream, accepted = command
        try:
            self.engine.add_request(request_id, prompt_token_ids, params, lora)
        except (ValueError, LookupError) as error:
            accepted.set_exception(error)
            return
        self._streams[request_id] = stream
        self.num_prompt_tokens += len(prompt_token_ids)
        accepted.set_result(None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:  # a model failure must not kill the loop or hang callers
            logger.exception("engine step failed; aborting its requests")
            for request_id in list(self._streams):
                self.engine.abort(request_id)
            self._fail_all(RuntimeError(f"engine step failed: {error}"))
            return
        num_tokens = 0
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            num_tokens += len(out.new_token_ids)
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                stream.num_running -= 1
                if stream.num_running == 0:
                    del self._streams[out.request_id]
            deliveries.setdefault(stream.loop, []).append((stream.outputs, out))
        # One wake-up of each event loop per step, not one per stream: the loop's thread then
        # takes a core from the 2 torch threads once per step (oversubscription is costly here).
        for loop, items in deliveries.items():
            _call_soon(loop, _deliver, items)
        self._record_tokens(num_tokens)

    def _record_tokens(self, num_tokens: int) -> None:
        now = time.monotonic()
        self.num_generated_tokens += num_tokens
        self._token_times.append((now, num_tokens))
        while self._token_times and now - self._token_times[0][0] > RATE_WINDOW_S:
            self._token_times.popleft()

    def _fail_all(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.push(error)
        self._streams.clear()

"""EngineLoop: the one thread that owns an LLMEngine and drives step(); the asyncio event loop talks to it by queues.

Requests and aborts go in through a thread-safe queue and are applied between steps, so an abort frees its KV slot
before the next step runs. What the thread has for the event loop (acceptances, each step's outputs grouped by the
RequestHandle, one per HTTP request, that owns them) goes back in one call_soon_threadsafe per batch of commands
and per step: each call wakes the event loop through a pipe. No coroutine ever waits on the model: the engine is
touched by this thread only.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from calm_engine.engine.llm_engine import LLMEngine
from calm_engine.engine.request import RequestOutput
from calm_engine.sampling_params import SamplingParams

logger = logging.getLogger("calm_engine.serve")


class QueueFull(Exception):
    """The waiting queue is full: answered with 503 and Retry-After."""


class NotAccepting(Exception):
    """The server is shutting down, or the engine failed: answered with 503."""


class EngineFailed(Exception):
    """The engine raised inside step(); every request in flight ends with it."""


class Mailbox:
    """What the engine thread delivered to one request, waiting for its one reader on the event loop: a list and at
    most one waiting future. An asyncio.Queue does the same for any number of readers and writers, at several times
    the cost per item, and a 64-stream load delivers an item per stream every few milliseconds.

    A reader may wait for several items at once (take_all(wanted)): a stream that sends its text every few steps
    (stream_interval) is then woken once per event rather than once per step. An item put with `urgent` (a request
    finished, or the engine failed) wakes the reader however many it wanted."""

    __slots__ = ("_loop", "_items", "_waiter", "_wanted", "_urgent")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop  # not asyncio.get_running_loop() per wait: on Python 3.11 each call is a getpid() syscall
        self._items: list = []
        self._waiter: asyncio.Future | None = None
        self._wanted = 1
        self._urgent = False

    def put_nowait(self, item, urgent: bool = True) -> None:
        self._items.append(item)
        self._urgent = self._urgent or urgent
        if self._waiter is not None and (self._urgent or len(self._items) >= self._wanted):
            waiter, self._waiter = self._waiter, None
            if not waiter.done():
                waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self):
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.pop(0)

    async def get(self):
        """The oldest item, once there is one."""
        while not self._items:
            await self._wait(1)
        return self._items.pop(0)

    async def take_all(self, wanted: int = 1) -> list:
        """Every item delivered so far, oldest first, once there are `wanted` (at least one) or an urgent one."""
        wanted = max(1, wanted)
        while len(self._items) < wanted and not (self._urgent and self._items):
            await self._wait(wanted)
        items, self._items, self._urgent = self._items, [], False
        return items

    async def _wait(self, wanted: int) -> None:
        self._waiter, self._wanted = self._loop.create_future(), wanted
        try:
            await self._waiter
        finally:  # also when cancelled: put_nowait must not wake a reader that left
            self._waiter = None


class RequestHandle:
    """The event-loop side of one HTTP request: its engine request ids (one per prompt and choice), a future that
    resolves once the engine accepted them all (or holds the engine's ValueError), and its step outputs (each a list
    of RequestOutput, or the exception that ended the engine)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request_ids: list[str]):
        self.request_ids = request_ids
        self.accepted: asyncio.Future = loop.create_future()
        self.failed_at: int | None = None  # which engine request the engine refused, if it refused one
        self.outputs = Mailbox(loop)


@dataclass(frozen=True, slots=True)
class LoopStats:
    """running and waiting count engine requests (one per prompt and choice); waiting includes those not yet added."""

    running: int
    waiting: int
    slots_used: int
    slots_total: int


class EngineLoop:
    """Owns `engine` on a daemon thread. `capacity` = KV slots + max_waiting: engine requests in flight at most."""

    def __init__(self, engine: LLMEngine, max_waiting: int, metrics=None):
        self.engine = engine
        self.slots = engine.cache.slots
        self.capacity = self.slots + max_waiting
        self.metrics = metrics
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._owners: dict[str, RequestHandle] = {}  # engine thread only
        self._lock = threading.Lock()  # guards _in_flight and _accepting
        self._in_flight = 0
        self._accepting = True
        self._running = 0
        self._slots_used = 0
        self.failure: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._for_loop: list[tuple] = []  # (function, *args) for the event loop, handed over by _flush
        self._thread = threading.Thread(target=self._run, name="calm-engine-loop", daemon=True)

    # ---- called from the event loop ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def submit(self, request_ids: list[str], prompts: Sequence, params: Sequence[SamplingParams]) -> RequestHandle:
        """Queue engine requests (all or none); raises QueueFull or NotAccepting without queueing anything."""
        with self._lock:
            if not self._accepting or self.failure is not None:
                raise NotAccepting(self.failure or "the server is shutting down")
            if self._in_flight + len(request_ids) > self.capacity:
                raise QueueFull(f"{self._in_flight} requests in flight, room for {self.capacity}")
            self._in_flight += len(request_ids)
        handle = RequestHandle(self._loop, list(request_ids))
        self._inbox.put(("add", handle, list(prompts), list(params)))
        return handle

    def abort(self, request_ids: Sequence[str]) -> None:
        """Abort requests (a no-op for finished ones); applied before the next step."""
        self._inbox.put(("abort", list(request_ids)))

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def abort_all(self) -> None:
        self._inbox.put(("abort_all",))

    def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever still runs and end the thread."""
        self.stop_accepting()
        if self._thread.is_alive():
            self._inbox.put(("stop",))
            self._thread.join(timeout)

    @property
    def accepting(self) -> bool:
        return self._accepting and self.failure is None and self._thread.is_alive()

    def stats(self) -> LoopStats:
        running = self._running
        return LoopStats(running, max(0, self._in_flight - running), self._slots_used, self.slots)

    # ---- the engine thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._apply_commands():
                self._flush()
                if self.engine.has_unfinished_requests():
                    self._step()
                    self._flush()
                self._running = len(self.engine.scheduler.running)
                self._slots_used = self.slots - len(self.engine.scheduler.free_slots)
            self._flush()
        except BaseException as error:  # noqa: BLE001 - any failure of the engine ends every request in flight
            logger.exception("the engine loop failed; the server answers 503 from now on")
            self._fail(error)

    def _apply_commands(self) -> bool:
        """Apply queued commands; blocks while the engine is idle. False once told to stop."""
        block = not self.engine.has_unfinished_requests()
        while True:
            try:
                command = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            kind = command[0]
            if kind == "add":
                self._add(*command[1:])
            elif kind == "abort":
                self._abort(command[1])
            elif kind == "abort_all":
                self._abort(list(self._owners))
            elif kind == "stop":
                self._abort(list(self._owners))
                return False

    def _add(self, handle: RequestHandle, prompts: list, params: list[SamplingParams]) -> None:
        added = []
        try:
            for request_id, prompt, p in zip(handle.request_ids, prompts, params, strict=True):
                self.engine.add_request(request_id, prompt, p)
                added.append(request_id)
        except Exception as error:
            for request_id in added:
                self.engine.abort(request_id)
            self._release(len(handle.request_ids))
            handle.failed_at = len(added)
            self._call(_resolve, handle.accepted, error)
            if not isinstance(error, (ValueError, TypeError)):  # not the request's fault: the engine is broken
                raise
            return
        for request_id in added:
            self._owners[request_id] = handle
        self._call(_resolve, handle.accepted, None)

    def _abort(self, request_ids: list[str]) -> None:
        aborted: dict[RequestHandle, list[RequestOutput]] = {}
        for request_id in request_ids:
            handle = self._owners.pop(request_id, None)
            if not self.engine.abort(request_id):
                continue
            self._release(1)
            if self.metrics is not None:
                self.metrics.count_finished("abort")
            if handle is not None:  # the stream ends with finish_reason "abort" (e.g. at shutdown)
                aborted.setdefault(handle, []).append(RequestOutput(request_id, [], [], [], True, "abort"))
        if aborted:
            self._call(_deliver, aborted)

    def _step(self) -> None:
        start = time.perf_counter()
        outputs = self.engine.step()
        seconds = time.perf_counter() - start
        groups: dict[RequestHandle, list[RequestOutput]] = {}
        for output in outputs:
            handle = self._owners.get(output.request_id)
            if output.finished:
                self._owners.pop(output.request_id, None)
                self._release(1)
                if self.metrics is not None:
                    self.metrics.count_finished(output.finish_reason)
            if handle is not None:
                groups.setdefault(handle, []).append(output)
        if self.metrics is not None:
            self.metrics.observe_step(seconds, sum(len(o.new_token_ids) for o in outputs))
        if groups:
            self._call(_deliver, groups)

    def _release(self, count: int) -> None:
        with self._lock:
            self._in_flight -= count

    def _fail(self, error: BaseException) -> None:
        self.failure = f"the engine failed: {type(error).__name__}: {error}"
        failed = EngineFailed(self.failure)
        handles = set(self._owners.values())
        self._owners.clear()
        with self._lock:
            self._in_flight = 0
        self._running = self._slots_used = 0
        self._call(_deliver, {handle: failed for handle in handles})
        while True:  # requests queued after the failure never reach the engine
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                self._call(_resolve, command[1].accepted, failed)
        self._flush()

    def _call(self, function, *args) -> None:
        """Run function(*args) on the event loop at the next _flush."""
        self._for_loop.append((function, *args))

    def _flush(self) -> None:
        if not self._for_loop:
            return
        calls, self._for_loop = self._for_loop, []
        try:
            self._loop.call_soon_threadsafe(_run_all, calls)
        except RuntimeError:  # the event loop is closed: nobody waits for this any more
            pass


def _run_all(calls: list[tuple]) -> None:
    for function, *args in calls:
        function(*args)


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _deliver(groups: dict[RequestHandle, list[RequestOutput] | BaseException]) -> None:
    for handle, item in groups.items():
        urgent = isinstance(item, BaseException) or any(output.finished for output in item)
        handle.outputs.put_nowait(item, urgent)

"""Blocking calls off the Trio thread, cheaply when there are many.

`trio.to_thread.run_sync` hands every call to a thread and back, which costs far more than a
`stat` or a 4 KiB read (about 165 µs on the 2-core test machine). A folder of 10,000 small files
makes tens of thousands of such calls. `Offload` keeps up to *threads* threads pulling calls from
one queue while there are any (and for a moment after), so under load a call costs a queue append
and one wake-up of the Trio thread; an idle `Offload` holds no thread.

Its threads live inside `async with offload.running():`, which waits for them before it ends. A
call behaves like `trio.to_thread.run_sync` without `abandon_on_cancel`: cancelled while queued it
never runs; once running it is waited for.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar, TypeVarTuple, Unpack

import outcome
import trio
import trio.lowlevel

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: How long an idle thread waits for another call before it is given back.
LINGER = 0.005

_QUEUED, _RUNNING, _CANCELLED = 0, 1, 2


class _Call:
    __slots__ = ("args", "fn", "state", "task")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], task: trio.lowlevel.Task):
        self.fn = fn
        self.args = args
        self.task = task
        self.state = _QUEUED


class Offload:
    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError("an Offload needs at least one thread")
        self.threads = threads
        self._calls: deque[_Call] = deque()
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)
        self._running = 0  # threads started and not yet given back
        self._waiting = 0  # of those, how many wait for a call
        self._token: trio.lowlevel.TrioToken | None = None
        self._open = False  # inside running(): calls are accepted
        self._closed = True  # threads stop waiting for more calls
        self._stopped = trio.Event()  # set when the last thread exits after closing
        self._stopped.set()
        #: Calls accepted so far: what tests and benchmarks count to see calls shared.
        self.calls = 0

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Offload]:
        """Calls are served inside this block; at its end, what is queued runs and the threads
        exit before the block does."""
        self._token = trio.lowlevel.current_trio_token()
        self._closed = False
        self._open = True
        try:
            yield self
        finally:
            self._open = False
            with self._lock:
                self._closed = True
                self._more.notify_all()
                if self._running:
                    self._stopped = trio.Event()
            with trio.CancelScope(shield=True):
                await self._stopped.wait()

    async def run_sync(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> T:
        if not self._open:
            raise RuntimeError("an Offload serves calls only inside running()")
        await trio.lowlevel.checkpoint_if_cancelled()
        self.calls += 1
        call = _Call(fn, args, trio.lowlevel.current_task())
        with self._lock:
            self._calls.append(call)
            if self._waiting:
                self._more.notify()
                start = False
            else:
                start = self._running < self.threads
                if start:
                    self._running += 1
        if start:
            trio.lowlevel.start_thread_soon(self._serve, self._thread_ended)

        def abort(_: Any) -> trio.lowlevel.Abort:
            with self._lock:
                if call.state == _QUEUED:
                    call.state = _CANCELLED  # the thread that meets it drops it
                    return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED

        # The thread reschedules us with the call's outcome, which this unwraps.
        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    @staticmethod
    def _thread_ended(result: outcome.Outcome[None]) -> None:
        result.unwrap()  # _serve catches what its calls raise; anything else is a bug to see

    def _next(self) -> _Call | None:
        """The next queued call, marked running (the lock is held)."""
        while self._calls:
            call = self._calls.popleft()
            if call.state == _QUEUED:
                call.state = _RUNNING
                return call
        return None

    def _serve(self) -> None:
        """One thread: run queued calls, wait LINGER for more, then give the thread back."""
        assert self._token is not None
        token = self._token
        self._lock.acquire()
        try:
            while True:
                call = self._next()
                if call is None and not self._closed:
                    self._waiting += 1
                    self._more.wait(LINGER)
                    self._waiting -= 1
                    call = self._next()
                if call is None:
                    self._running -= 1
                    if self._closed and not self._running:
                        token.run_sync_soon(self._stopped.set)
                    return
                self._lock.release()
                try:
                    result = outcome.capture(call.fn, *call.args)
                    token.run_sync_soon(trio.lowlevel.reschedule, call.task, result)
                finally:
                    self._lock.acquire()
        finally:
            self._lock.release()

"""Offload: blocking calls in a few threads, with to_thread's semantics."""

from __future__ import annotations

import threading
import time

import pytest
import trio
import trio.testing

from trio_sync.core.offload import Offload


async def test_calls_run_in_threads_and_return_or_raise() -> None:
    offload = Offload(2)
    async with offload.running():
        assert await offload.run_sync(threading.get_ident) != threading.get_ident()
        assert await offload.run_sync(pow, 2, 10) == 1024
        with pytest.raises(ZeroDivisionError):
            await offload.run_sync(divmod, 1, 0)


async def test_no_more_threads_than_asked_for_at_once() -> None:
    offload = Offload(3)
    lock = threading.Lock()
    now = peak = 0

    def work() -> None:
        nonlocal now, peak
        with lock:
            now += 1
            peak = max(peak, now)
        time.sleep(0.01)
        with lock:
            now -= 1

    async with offload.running(), trio.open_nursery() as nursery:
        for _ in range(30):
            nursery.start_soon(offload.run_sync, work)
    assert peak == 3


async def test_one_thread_runs_calls_in_the_order_they_were_made() -> None:
    offload = Offload(1)
    holding, release = threading.Event(), threading.Event()
    done: list[int] = []

    def hold() -> None:
        holding.set()
        release.wait()

    async with offload.running(), trio.open_nursery() as nursery:
        nursery.start_soon(offload.run_sync, hold)  # the rest queue up behind it
        await trio.to_thread.run_sync(holding.wait)
        for i in range(100):
            nursery.start_soon(offload.run_sync, done.append, i)
            await trio.testing.wait_all_tasks_blocked()  # queued before the next one starts
        release.set()
    assert done == list(range(100))


async def test_a_call_cancelled_while_queued_never_runs() -> None:
    offload = Offload(1)
    holding, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def hold() -> None:
        holding.set()
        release.wait()

    async with offload.running(), trio.open_nursery() as nursery:
        nursery.start_soon(offload.run_sync, hold)  # takes the only thread
        await trio.to_thread.run_sync(holding.wait)
        queued = trio.CancelScope()
        nursery.start_soon(_cancelled_call, offload, ran, queued)
        await trio.testing.wait_all_tasks_blocked()
        queued.cancel()
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert ran == []


async def _cancelled_call(offload: Offload, ran: list[str], scope: trio.CancelScope) -> None:
    with scope:
        await offload.run_sync(ran.append, "queued")


async def test_a_running_call_is_waited_for_when_cancelled() -> None:
    offload = Offload(1)
    started, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def slow() -> None:
        started.set()
        release.wait()
        finished.append("slow")

    async def call() -> None:
        with scope:
            await offload.run_sync(slow)
        returned.set()

    scope, returned = trio.CancelScope(), trio.Event()
    async with offload.running(), trio.open_nursery() as nursery:
        nursery.start_soon(call)
        await trio.to_thread.run_sync(started.wait)
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert not returned.is_set()  # still waiting for the thread, not abandoned
        release.set()
        await returned.wait()
        assert finished == ["slow"]


async def test_calls_are_refused_outside_running_and_the_block_waits_for_its_threads() -> None:
    offload = Offload(2)
    with pytest.raises(RuntimeError):
        await offload.run_sync(time.sleep, 0)
    started = threading.Event()
    finished: list[str] = []

    def slow() -> None:
        started.set()
        time.sleep(0.05)
        finished.append("slow")

    async with trio.open_nursery() as outside:
        async with offload.running():
            outside.start_soon(offload.run_sync, slow)  # its caller does not end the block
            await trio.to_thread.run_sync(started.wait)
        assert finished == ["slow"]
    with pytest.raises(RuntimeError):
        await offload.run_sync(time.sleep, 0)
    async with offload.running():  # and it can be used again
        assert await offload.run_sync(len, "abc") == 3

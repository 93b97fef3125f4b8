"""Coalescing calls into requests (client/batching.py), on Trio's autojump clock."""

from __future__ import annotations

import trio
import trio.testing

from trio_sync.client.batching import GATHER_STEP, QUIET, Batcher, Pending


class Recorder:
    """A send that answers each item with itself and notes each request and when it went."""

    def __init__(self) -> None:
        self.requests: list[tuple[float, list[int]]] = []

    async def send(self, batch: list[Pending[int, int]]) -> None:
        self.requests.append((trio.current_time(), [p.item for p in batch]))
        await trio.sleep(0.01)  # the round trip
        for pending in batch:
            pending.resolve(pending.item)


async def test_a_lone_call_goes_at_once_and_a_burst_is_gathered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    batcher: Batcher[int, int] = Batcher(recorder.send, max_items=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        start = trio.current_time()
        assert await batcher.call(1) == 1  # a user's single save: no waiting for company
        assert recorder.requests == [(start, [1])]

        await trio.sleep(QUIET * 2)
        recorder.requests.clear()

        async def burst() -> None:  # workers finishing one after another, 1 ms apart
            async with trio.open_nursery() as callers:
                for i in range(20):
                    callers.start_soon(batcher.call, i)
                    await trio.sleep(0.001)

        await burst()
        sizes = [len(items) for _, items in recorder.requests]
        assert sum(sizes) == 20
        assert len(sizes) <= 3, sizes  # the first goes alone, the rest gathered

        recorder.requests.clear()
        await trio.sleep(GATHER_STEP / 2)  # soon after: a lone call waits a step for company
        sent = trio.current_time()
        await batcher.call(99)
        assert recorder.requests[0][0] > sent
        nursery.cancel_scope.cancel()

"""The log writer: lines leave the event loop's thread while it runs, none is lost at either end."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import trio

from trio_sync.logwriter import LogWriter


class RecordingStream(io.StringIO):
    """A text stream that remembers which thread wrote each piece."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: list[int] = []

    def write(self, text: str) -> int:
        self.writers.append(threading.get_ident())
        return super().write(text)


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, LogWriter, RecordingStream]]:
    stream = RecordingStream()
    writer = LogWriter(stream)
    writer.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test_logwriter")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(writer)
    try:
        yield logger, writer, stream
    finally:
        logger.removeHandler(writer)


@asynccontextmanager
async def writing(writer: LogWriter) -> AsyncIterator[None]:
    """The writer's task runs for the block and is cancelled at its end."""
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        yield
        nursery.cancel_scope.cancel()


async def wait_for_text(stream: RecordingStream, text: str) -> None:
    with trio.fail_after(5):
        while text not in stream.getvalue():  # noqa: ASYNC110 - a worker thread writes it
            await trio.sleep(0.005)


async def test_lines_are_written_off_the_loop_while_it_runs_and_directly_around_it(
    logged: tuple[logging.Logger, LogWriter, RecordingStream],
) -> None:
    logger, writer, stream = logged
    loop_thread = threading.get_ident()
    logger.info("before")
    assert stream.getvalue() == "INFO before\n"
    async with writing(writer):
        for n in range(100):
            logger.info("file %d", n)
        assert "file" not in stream.getvalue()  # gathered, not written by the loop
        await wait_for_text(stream, "file 99")
    logger.warning("after")
    lines = stream.getvalue().splitlines()
    assert lines == ["INFO before"] + [f"INFO file {n}" for n in range(100)] + ["WARNING after"]
    # The burst went out in one write, from a worker thread; before and after, directly.
    assert stream.writers[0] == loop_thread
    assert stream.writers[1:-1] == [stream.writers[1]] != [loop_thread]
    assert stream.writers[-1] == loop_thread


async def test_lines_from_other_threads_wake_the_writer(
    logged: tuple[logging.Logger, LogWriter, RecordingStream],
) -> None:
    logger, writer, stream = logged
    async with writing(writer):
        await trio.to_thread.run_sync(logger.info, "from a worker")
        await wait_for_text(stream, "from a worker")
        logger.info("from the loop")
        await wait_for_text(stream, "from the loop")
    assert stream.getvalue() == "INFO from a worker\nINFO from the loop\n"


async def test_lines_gathered_when_the_writer_is_cancelled_are_still_written(
    logged: tuple[logging.Logger, LogWriter, RecordingStream],
) -> None:
    logger, writer, stream = logged
    async with writing(writer):
        logger.info("stopping")
    assert stream.getvalue() == "INFO stopping\n"
    logger.info("stopped")
    assert stream.getvalue().endswith("INFO stopped\n")

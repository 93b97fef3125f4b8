"""Log lines written by a task of their own, so that the event loop never waits on the disk.

Client and server log a line for every file they move. Written on the Trio thread, each line is
a write(2) to stderr: a few microseconds, but often tens and sometimes milliseconds when the log
is a file on a disk that is busy with the synced files (client A taking in 10,000 small files,
under strace: median 3 us, one write in ten over 56 us, 0.25 s in all, all of it time in which
the event loop did nothing else). While `LogWriter.run` runs, lines gather for a moment and go
out together from a worker thread; before it starts and after it ends, each line is written as
it comes, so nothing logged at start-up or shutdown waits for a loop that is not there.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TextIO

import trio

#: How long the first line of a burst waits for others to join it.
GATHER_SECONDS = 0.02


class LogWriter(logging.Handler):
    """A handler writing formatted lines to *stream*, from a worker thread while `run` runs."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        # Guarded by the handler's lock, which `Handler.handle` holds around `emit`.
        self._lines: list[str] = []
        self._wake: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._loop_thread = 0
        self._limiter = trio.CapacityLimiter(1)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        wake = self._wake
        if wake is None:
            self._write([line])
            return
        self._lines.append(line)
        if len(self._lines) > 1:
            return  # the writer has been woken for this batch already
        if threading.get_ident() == self._loop_thread:
            wake.set()
            return
        assert self._token is not None
        # If the loop is ending, its writer writes what is left as it stops.
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(wake.set)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write gathered lines until cancelled, then what is left. Start it with
        `nursery.start`; one at a time."""
        self.acquire()
        try:
            self._token = trio.lowlevel.current_trio_token()
            self._loop_thread = threading.get_ident()
            self._wake = trio.Event()
        finally:
            self.release()
        try:
            task_status.started()
            while True:
                assert self._wake is not None
                await self._wake.wait()
                await trio.sleep(GATHER_SECONDS)
                self.acquire()
                try:
                    lines, self._lines = self._lines, []
                    self._wake = trio.Event()
                finally:
                    self.release()
                # Not abandoned on cancel: the lines are written before the task ends.
                await trio.to_thread.run_sync(self._write, lines, limiter=self._limiter)
        finally:
            self.acquire()
            try:
                self._wake = None
                lines, self._lines = self._lines, []
                self._write(lines)
            finally:
                self.release()

    def _write(self, lines: list[str]) -> None:
        if not lines:
            return
        # Nowhere left to report a log that cannot be written (a closed pipe, a full disk).
        with contextlib.suppress(OSError, ValueError):
            self.stream.write("".join(lines))
            self.stream.flush()

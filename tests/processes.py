"""Servers and clients as real processes, for tests that crash them (`kill -9`).

Starting a Python process that imports trio-sync costs about 0.4 s of CPU; a randomized history
starts a dozen. So a fork server (`python -m tests.processes`) imports trio-sync once and forks a
child for each request: the child runs the CLI's own `server_main` / `client_main` (signals,
shutdown, exit codes as in production), with its log (DEBUG for trio_sync) in a file. The fork
server reaps its children; tests watch each one through a pidfd and stop it with SIGTERM (a
clean stop) or SIGKILL (a crash).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from trio_sync import cli
from trio_sync.config import ClientConfig, ServerConfig

LOG_FORMAT = "%(created).3f {who} %(levelname)s %(name)s: %(message)s"
REPO = Path(__file__).resolve().parent.parent


# -- in the fork server and its children ------------------------------------------------------


def _child(request: dict[str, Any]) -> None:
    """Run one server or client, its output appended to its log; never returns."""
    code = 70
    cli.hold_stop_signals()  # as `trio-sync` does first: a stop that comes early waits for it
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        logging.basicConfig(
            level=logging.DEBUG, format=LOG_FORMAT.format(who=request["who"]), stream=sys.stderr
        )
        for noisy in ("httpx", "httpcore", "hpack", "hypercorn", "quart"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        values = dict(request["config"])
        if request["kind"] == "server":
            values["data_dir"] = Path(values["data_dir"])
            code = trio.run(cli.server_main, ServerConfig(**values))
        else:
            values["root"] = Path(values["root"])
            code = trio.run(cli.client_main, ClientConfig(**values), False)
        print(f"exit {code}", flush=True)
    except BaseException:
        logging.exception("the process failed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    """Fork a child for each JSON request read from stdin; write its pid to stdout."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        sys.stdout.write(f"{pid}\n")
        sys.stdout.flush()


# -- in the tests -------------------------------------------------------------------------------


@dataclass
class Child:
    """One server or client process."""

    pid: int
    log: Path
    _pidfd: int

    @property
    def running(self) -> bool:
        return self._pidfd >= 0

    async def wait(self) -> None:
        if self._pidfd < 0:
            return
        await trio.lowlevel.wait_readable(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1

    def signal(self, signum: int) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    async def stop(self, grace: float = 10.0) -> bool:
        """SIGTERM and wait; SIGKILL if it has not ended after *grace* seconds. True if it ended
        by itself."""
        self.signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            await self.wait()
            return True
        await self.crash()
        return False

    async def crash(self) -> None:
        """kill -9: no clean-up of any kind runs."""
        self.signal(signal.SIGKILL)
        await self.wait()


class ForkServer:
    def __init__(self, process: trio.Process) -> None:
        self._process = process
        self._lock = trio.Lock()
        self._pending = b""
        self.children: list[Child] = []

    async def spawn(self, kind: str, who: str, config: dict[str, Any], log: Path) -> Child:
        request = {"kind": kind, "who": who, "config": config, "log": str(log)}
        assert self._process.stdin is not None
        async with self._lock:
            await self._process.stdin.send_all(json.dumps(request).encode() + b"\n")
            pid = int(await self._read_line())
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = -1  # already gone: its log says why
        child = Child(pid, log, pidfd)
        self.children.append(child)
        return child

    async def _read_line(self) -> bytes:
        assert self._process.stdout is not None
        while b"\n" not in self._pending:
            data = await self._process.stdout.receive_some()
            if not data:
                raise RuntimeError("the fork server ended")
            self._pending += data
        line, self._pending = self._pending.split(b"\n", 1)
        return line


@asynccontextmanager
async def fork_server() -> AsyncIterator[ForkServer]:
    """A fork server for the block; every child still running at its end is killed."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.processes"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    server = ForkServer(process)
    try:
        yield server
    finally:
        with trio.CancelScope(shield=True):
            for child in server.children:
                await child.crash()
            assert process.stdin is not None
            await process.stdin.aclose()
            await process.wait()


@dataclass
class _Process:
    """A server or client process, which may be stopped, crashed and started again."""

    forks: ForkServer
    log: Path
    child: Child | None = field(default=None, init=False)

    @property
    def running(self) -> bool:
        return self.child is not None

    async def _start(self, kind: str, who: str, config: dict[str, Any], marker: str) -> str:
        """Start it; the first line of this start's log that holds *marker* ("" for none)."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.child = await self.forks.spawn(kind, who, config, self.log)
        return await wait_for_log(self.child, offset, marker) if marker else ""

    async def stop(self) -> None:
        if self.child is not None:
            await self.child.stop()
            self.child = None

    async def crash(self) -> None:
        if self.child is not None:
            await self.child.crash()
            self.child = None


@dataclass
class ServerProcess(_Process):
    """A trio-sync server; a restart keeps its port and data."""

    data_dir: Path
    token: str
    port: int = 0
    url: str = ""

    async def start(self) -> None:
        config = {
            "data_dir": str(self.data_dir),
            "port": self.port,
            "token": self.token,
            "graceful_timeout": 1.0,
        }
        line = await self._start("server", "server", config, "listening on ")
        self.url = line.split("listening on ", 1)[1].split()[0]
        self.port = int(self.url.rsplit(":", 1)[1])


@dataclass
class ClientProcess(_Process):
    name: str
    root: Path
    settings: dict[str, Any] = field(default_factory=dict)

    async def start(self, *, wait: bool = False) -> None:
        """With *wait*, return once its first reconcile is done."""
        config = {"root": str(self.root), "name": self.name, **self.settings}
        await self._start("client", self.name, config, "in sync with " if wait else "")


async def wait_for_log(child: Child, offset: int, marker: str, timeout: float = 30.0) -> str:
    """The first line after *offset* in *child*'s log that holds *marker*."""
    deadline = time.monotonic() + timeout
    while True:
        line = _line_with(child.log, offset, marker)
        if line is not None:
            return line
        if not child.running or time.monotonic() > deadline:
            raise AssertionError(f"{child.log.name}: no {marker!r} (see {child.log})")
        with trio.move_on_after(0.01):
            await child.wait()


def _line_with(log: Path, offset: int, marker: str) -> str | None:
    with contextlib.suppress(FileNotFoundError), open(log, encoding="utf-8", errors="replace") as f:
        f.seek(offset)
        return next((line for line in f if marker in line), None)
    return None


if __name__ == "__main__":
    main()

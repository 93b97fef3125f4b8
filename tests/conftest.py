"""Shared fixtures: a real server on an ephemeral loopback port, real clients on temp folders."""

from __future__ import annotations

import ctypes
import mmap
import os
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import trio

from trio_sync.client.batching import Batches
from trio_sync.client.engine import Engine
from trio_sync.client.index import Index
from trio_sync.client.landing import Landing
from trio_sync.client.remote import Remote
from trio_sync.client.scanner import Scanner
from trio_sync.client.transfer import Parking, PartialFiles, Transfer
from trio_sync.config import ClientConfig, ServerConfig
from trio_sync.core.budget import ByteBudget
from trio_sync.core.durable import group_syncer
from trio_sync.core.offload import Offload
from trio_sync.protocol.paths import STATE_DIR_NAME
from trio_sync.server.serve import RunningServer, run_server

TOKEN = "test-token-0123456789"


@dataclass
class ServerHandle:
    data_dir: Path
    nursery: trio.Nursery
    port: int = 0
    keepalive: float = 15.0
    #: Other ServerConfig fields.
    settings: dict[str, Any] = field(default_factory=dict)
    running: RunningServer | None = None
    _stop: trio.Event = field(default_factory=trio.Event)
    _done: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        assert self.running is not None
        return self.running.url

    async def start(self) -> None:
        self._stop, self._done = trio.Event(), trio.Event()
        config = ServerConfig(
            self.data_dir, port=self.port, token=TOKEN, keepalive=self.keepalive,
            graceful_timeout=1.0, **self.settings,
        )  # fmt: skip
        self.running = await self.nursery.start(self._serve, config)
        self.port = int(self.running.url.rsplit(":", 1)[1])  # a restart keeps the port

    async def _serve(
        self, config: ServerConfig, task_status: trio.TaskStatus[RunningServer]
    ) -> None:
        try:
            await run_server(config, stop=self._stop, task_status=task_status)
        finally:
            self._done.set()

    async def stop(self) -> None:
        self._stop.set()
        await self._done.wait()


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[ServerHandle]:
    handle = ServerHandle(tmp_path / "server", nursery)
    await handle.start()
    yield handle
    await handle.stop()


@dataclass
class ClientHandle:
    engine: Engine
    root: Path
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)

    async def stop(self) -> None:
        self.cancel_scope.cancel()
        await self.done.wait()


@pytest.fixture
def client_config(server: ServerHandle, tmp_path: Path) -> Callable[..., ClientConfig]:
    def make(name: str, **overrides: object) -> ClientConfig:
        values: dict[str, object] = {
            "root": tmp_path / name,
            "server_url": server.url,
            "token": TOKEN,
            "name": name,
            "backoff_initial": 0.05,
            "backoff_max": 0.5,
            "debounce_ms": 50,
            "settle_seconds": 0.1,
        }
        values.update(overrides)
        return ClientConfig(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def start_client(
    nursery: trio.Nursery, client_config: Callable[..., ClientConfig]
) -> Callable[..., object]:
    """`await start_client("a")`: a live client, returned once its first reconcile is done."""

    async def start(name: str, *, wait: bool = True, **overrides: object) -> ClientHandle:
        """With wait=False, return at once (the server may be down; the client retries)."""
        engine = Engine(client_config(name, **overrides))
        handle = ClientHandle(engine, engine.root)

        async def run(task_status: trio.TaskStatus[None]) -> None:
            if not wait:
                task_status.started()
            try:
                with handle.cancel_scope:
                    await engine.run(task_status=task_status if wait else trio.TASK_STATUS_IGNORED)
            finally:
                handle.done.set()

        await nursery.start(run)
        return handle

    return start


def write(path: Path, data: bytes | str) -> None:
    """Write *data* to *path*, making its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def tree(root: Path) -> dict[str, bytes]:
    """Every synced file below *root* with its content (the state folder left out)."""
    out: dict[str, bytes] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not (Path(folder) == root and d == STATE_DIR_NAME)]
        for name in files:
            full = Path(folder) / name
            with suppress(FileNotFoundError, IsADirectoryError):  # changed meanwhile: poll again
                out[full.relative_to(root).as_posix()] = full.read_bytes()
    return out


async def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait until *check()* holds; fail after *timeout* seconds. Sync is asynchronous by nature,
    so tests wait for an observable outcome instead of sleeping for a guessed time."""
    with trio.fail_after(timeout):
        while not check():  # noqa: ASYNC110 - the outcome is on disk, not an event
            await trio.sleep(0.02)


def folders(root: Path) -> set[str]:
    out: set[str] = set()
    for folder, dirs, _files in os.walk(root):
        dirs[:] = [d for d in dirs if not (Path(folder) == root and d == STATE_DIR_NAME)]
        out.update((Path(folder) / d).relative_to(root).as_posix() for d in dirs)
    return out


async def in_sync(*roots: Path, timeout: float = 15.0) -> None:
    """Wait until every root holds the same files (with the same bytes) and the same folders."""

    def same() -> bool:
        trees = [(tree(r), folders(r)) for r in roots]
        return all(t == trees[0] for t in trees[1:])

    try:
        await eventually(same, timeout)
    except trio.TooSlowError:
        raise AssertionError(
            f"not in sync: {[sorted(tree(r)) + sorted(folders(r)) for r in roots]}"
        ) from None


async def traffic(server: ServerHandle, verify: ssl.SSLContext | bool = True) -> dict[str, Any]:
    """The server's request and byte counters (`GET /info`)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(headers=headers, verify=verify) as client:
        info = (await client.get(server.url + "/info")).json()
    result: dict[str, Any] = info["traffic"]
    return result


def requests_between(before: dict[str, Any], after: dict[str, Any], route: str) -> int:
    return int(after["requests"].get(route, 0)) - int(before["requests"].get(route, 0))


def open_fds_to(path: Path, *, read_only: bool = False) -> list[str]:
    """This process's file descriptors open on *path* (clients in tests run in it); with
    *read_only*, only those opened for reading alone."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") != str(path):
                continue
            if read_only:
                info = Path(f"/proc/self/fdinfo/{fd}").read_text()
                if int(info.split("flags:")[1].split()[0], 8) & os.O_ACCMODE != os.O_RDONLY:
                    continue
            found.append(fd)
    return found


class ClientParts(NamedTuple):
    transfer: Transfer
    scanner: Scanner
    early_sends: trio.Nursery
    landing: Landing


@asynccontextmanager
async def client_parts(
    server: ServerHandle, root: Path, *, syncfs: bool = False
) -> AsyncIterator[ClientParts]:
    """What a client's worker uses, made the way the engine makes them, on a real server."""
    state = root / STATE_DIR_NAME
    (state / "tmp").mkdir(parents=True)
    io, db = Offload(4), Offload(1)
    async with (
        io.running(),
        db.running(),
        Remote(server.url, TOKEN, "a") as remote,
        trio.open_nursery() as nursery,
    ):
        index = await Index.open(state / "index.sqlite", db)
        batches = Batches(remote, compress=False)
        await nursery.start(batches.run)
        group = group_syncer(state / "tmp") if syncfs else None
        landing = Landing(root, state / "tmp", io, syncfs=group, client="t")
        await nursery.start(landing.run)
        transfer = Transfer(
            root, state, index, batches, remote, io, "a", Parking(state / "tmp"),
            ByteBudget(20 * 2**20), landing, PartialFiles(3600), compress=False,
        )  # fmt: skip
        async with trio.open_nursery() as early_sends:
            yield ClientParts(transfer, Scanner(root, io), early_sends, landing)
        nursery.cancel_scope.cancel()


def resident_pages(path: Path) -> int:
    """Pages of *path* in the page cache (mincore(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    vector = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        start = ctypes.c_char.from_buffer(mapped)
        try:
            address = ctypes.c_void_p(ctypes.addressof(start))
            if libc.mincore(address, ctypes.c_size_t(size), vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del start
    return sum(page & 1 for page in vector)


def takes_o_direct(folder: Path) -> bool:
    probe = folder / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    try:
        with mmap.mmap(-1, mmap.PAGESIZE) as aligned:
            os.write(fd, aligned)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def evict(path: Path) -> None:
    """Drop *path*'s pages from the page cache (written back already)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)

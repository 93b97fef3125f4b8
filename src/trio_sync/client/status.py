"""`trio-sync status`: a running client answers on a socket in its state folder; without one,
what the state folder and the folder itself say.

The socket (`DIR/.trio-sync/status.sock`, owner-only like the folder it is in) answers each
connection with one JSON document and closes it: nothing is read from the asker, so nothing it
sends can do harm.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from ..protocol.paths import STATE_DIR_NAME
from .conflicts import CONFLICT_TAG, original_name
from .guard import HELD_FILE
from .settings import load

log = logging.getLogger("trio_sync.client")

SOCKET_NAME = "status.sock"
#: How long `trio-sync status` waits for a running client's answer.
ASK_TIMEOUT = 5.0


async def serve(
    path: Path,
    report: Callable[[], Awaitable[dict[str, Any]]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer status questions on the Unix socket *path* until cancelled."""
    await trio.to_thread.run_sync(_remove, path)  # left by a client that was killed
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            with _short(path) as address:
                await sock.bind(address)  # owner-only: the state folder is
        except OSError as e:
            log.warning("no status socket at %s (%s): `status` shows the state on disk", path, e)
            task_status.started()
            return
        sock.listen(8)

        async def answer(stream: trio.SocketStream) -> None:
            async with stream:
                with trio.move_on_after(ASK_TIMEOUT):
                    await stream.send_all(json.dumps(await report()).encode() + b"\n")

        try:
            task_status.started()
            await trio.serve_listeners(answer, [trio.SocketListener(sock)])
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove, path)


def ask(folder: Path) -> dict[str, Any] | None:
    """The running client's status, or None if none answers."""
    path = folder / STATE_DIR_NAME / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(ASK_TIMEOUT)
        try:
            with _short(path) as address:
                sock.connect(address)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            return None
    try:
        answer = json.loads(data)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def on_disk(folder: Path) -> dict[str, Any]:
    """What can be told without a running client."""
    state = folder / STATE_DIR_NAME
    loaded = load(state)
    held: dict[str, Any] | None = None
    with contextlib.suppress(OSError, ValueError):
        held = json.loads((state / HELD_FILE).read_text())
    return {
        "running": False,
        "server": loaded[0].server_url if loaded else None,
        "name": loaded[0].name if loaded else None,
        "held_deletes": held,
    }


def conflicts(folder: Path) -> list[dict[str, str]]:
    """The conflict copies in *folder*: each with the path it is a copy of, when it was set
    aside and by which client (as its name says)."""
    found = []
    for top, dirs, files in os.walk(folder):
        if Path(top) == folder:
            dirs[:] = [d for d in dirs if d != STATE_DIR_NAME]
        for name in [*files, *dirs]:
            match = CONFLICT_TAG.search(name)
            if match is None:
                continue
            rel = (Path(top) / name).relative_to(folder).as_posix()
            parent = rel.rpartition("/")[0]
            original = original_name(name)
            day, clock, client = _parts(match[0])
            found.append(
                {
                    "path": rel,
                    "original": f"{parent}/{original}" if parent else original,
                    "when": f"{day[:4]}-{day[4:6]}-{day[6:]}"
                    f" {clock[:2]}:{clock[2:4]}:{clock[4:]} UTC",
                    "client": client,
                }
            )
    return sorted(found, key=lambda c: c["path"])


def _parts(tag: str) -> tuple[str, str, str]:
    """`.sync-conflict-20261124-153012-laptop` → the day, the time and the client."""
    day, clock, client = tag.removeprefix(".sync-conflict-").split("-", 2)
    return day, clock, client


@contextlib.contextmanager
def _short(path: Path) -> Iterator[str]:
    """A name for socket *path* that fits a socket address (108 bytes, however deep the synced
    folder is): through an open descriptor of its folder (`/proc/self/fd/N/name`)."""
    if not os.path.isdir("/proc/self/fd"):
        yield os.fspath(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

"""One exception tree for the whole package.

Foreign errors (httpx, OSError from the network, sqlite3) are translated into these at one boundary
each, so callers decide on *our* types: is this fatal, retryable, or a per-path problem?
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from .protocol.models import FileEntry


class TrioSyncError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidPath(TrioSyncError, ValueError):
    """A path that must never be read or written: absolute, `..`, control characters, ..."""


class ProtocolError(TrioSyncError):
    """The other side sent something that does not follow docs/protocol.md."""


class RemoteError(TrioSyncError):
    """Talking to the server failed."""


class ServerUnavailable(RemoteError):
    """Network trouble or a 5xx: worth retrying later."""


class AuthenticationFailed(RemoteError):
    """The server rejected our token. Retrying cannot help."""


class ServerNotTrusted(RemoteError):
    """The server could not be verified (TLS): its certificate is not the pinned one, or no
    trusted CA signed it. Nothing was sent to it; retrying cannot help."""


class RejectedByServer(RemoteError):
    """A 4xx other than 401/409: the request itself is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"server answered {status}: {message}")
        self.status = status


class IncompatibleServer(TrioSyncError):
    """The server cuts files into chunks another way; syncing would see every file as changed."""


class ServerReset(RemoteError):
    """The server's identity changed under us (its data dir was replaced)."""


class Conflict(RemoteError):
    """The server refused a change to keep its tree consistent.

    `reason` is "stale" (the path moved on since our base revision), "blocked" (a file stands
    where this path needs a folder, or a non-empty folder where it needs a file; `blocking` is
    that entry) or "not_empty" (a folder cannot be deleted while it holds live entries).
    """

    MESSAGES = {
        "stale": "changed on the server since our base revision",
        "blocked": "a file and a folder would share a name",
        "not_empty": "the folder is not empty on the server",
    }

    def __init__(
        self,
        path: str,
        current: FileEntry | None,
        *,
        reason: str = "stale",
        blocking: FileEntry | None = None,
    ) -> None:
        super().__init__(f"{path}: {self.MESSAGES.get(reason, reason)}")
        self.path = path
        self.current = current
        self.reason = reason
        self.blocking = blocking


class ChunksMissing(RemoteError):
    """A commit named chunks the server does not hold."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(f"{len(missing)} chunk(s) missing on the server")
        self.missing = missing


class FolderInUse(TrioSyncError):
    """Another client process is already syncing this folder."""


class LocalChanged(TrioSyncError):
    """The local file changed while we were working on it; look at it again."""


class StateError(TrioSyncError):
    """The client's state database failed (a full disk, most often); the client pauses the path
    and tries again, the folder itself is untouched."""


class DiskFull(TrioSyncError):
    """Not enough free space for a download; the client waits for space and tries again."""


class StoreError(TrioSyncError):
    """The server's storage refused an operation (bad hash, bad size)."""


@asynccontextmanager
async def single_error() -> AsyncIterator[None]:
    """Nurseries group errors; callers here decide on one. Prefer the fatal one, then any
    RemoteError (several tasks often see the same outage at once), then the first other error.
    A group of nothing but cancellations stays as it is, for trio to unwind."""
    try:
        yield
    except BaseExceptionGroup as group:
        flat = _flatten(group)
        for kind in (AuthenticationFailed, ServerReset, RemoteError, ProtocolError, Exception):
            for error in flat:
                if isinstance(error, kind):
                    raise error from group
        raise


def _flatten(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            out.extend(_flatten(error))
        elif not isinstance(error, trio.Cancelled):
            out.append(error)
    return out

"""The client's memory of the last synced state of every path (the "base" of the three-way merge).

SQLite in the state folder, mirrored in a dict: reads are free, writes go through to disk in the
same step as the file operation they record, so a restart resumes without re-transferring.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.offload import Offload
from ..core.reconcile import Content, Side
from ..errors import StateError
from ..protocol.models import DIR, Chunk, FileEntry

#: A stat cache entry recorded within this long of the file's mtime is "racy": a same-size write in
#: the same timestamp tick would not show in the stat, so such an entry is re-hashed before trusted.
RACY_WINDOW_NS = 2_000_000_000


#: How many chunks of removed files `has_chunk` still remembers (about 4 MiB of memory).
REMEMBER_GONE_CHUNKS = 20_000


def is_racy(mtime_ns: int) -> bool:
    return mtime_ns >= time.time_ns() - RACY_WINDOW_NS


_SCHEMA = """
CREATE TABLE IF NOT EXISTS base (
    path TEXT PRIMARY KEY,
    rev INTEGER NOT NULL,
    kind TEXT NOT NULL,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunks TEXT NOT NULL,
    executable INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    racy INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


_PUT = "INSERT OR REPLACE INTO base VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def _row(e: BaseEntry) -> tuple[Any, ...]:
    chunks = json.dumps([[c.hash, c.size] for c in e.chunks])
    return (
        e.path, e.rev, e.kind, e.hash, e.size, chunks, int(e.executable), e.mtime_ns, e.inode,
        int(e.racy),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class StatKey:
    """What we compare to decide whether a file may have changed without reading it."""

    size: int
    mtime_ns: int
    inode: int
    executable: bool


@dataclass(frozen=True, slots=True)
class BaseEntry:
    path: str
    rev: int
    kind: str
    hash: str
    size: int
    chunks: tuple[Chunk, ...]
    executable: bool
    mtime_ns: int
    inode: int
    racy: bool

    @property
    def is_dir(self) -> bool:
        return self.kind == DIR

    @property
    def side(self) -> Side:
        return Side(self.rev, Content(self.hash, self.executable, self.is_dir))

    @property
    def stat_key(self) -> StatKey:
        return StatKey(self.size, self.mtime_ns, self.inode, self.executable)

    @classmethod
    def synced(cls, entry: FileEntry, stat: StatKey, *, we_wrote_it: bool) -> BaseEntry:
        """The base after a sync. A file we wrote ourselves carries the server's mtime, which no
        later write can reproduce, so its stat is trustworthy at once."""
        return cls(
            path=entry.path,
            rev=entry.rev,
            kind=entry.kind,
            hash=entry.hash,
            size=entry.size,
            chunks=entry.chunks,
            executable=entry.executable,
            mtime_ns=stat.mtime_ns,
            inode=stat.inode,
            racy=not we_wrote_it and is_racy(stat.mtime_ns),
        )


class Index:
    def __init__(
        self,
        conn: sqlite3.Connection,
        entries: dict[str, BaseEntry],
        meta: dict[str, str],
        offload: Offload,
    ):
        self._conn = conn
        #: One thread: the connection is used by one thread at a time, in call order.
        self._offload = offload
        self._entries = entries
        self._meta = meta
        #: chunk hash -> {path: offset}: where each chunk was when its file was last synced.
        self._by_chunk: dict[str, dict[str, int]] = {}
        #: Chunks no synced file holds any more, newest last: a rename is a deletion and a new
        #: file, and the new file's content is still known (to the server, too) if it comes second.
        self._gone: OrderedDict[str, None] = OrderedDict()
        for entry in entries.values():
            self._link_chunks(entry)

    @classmethod
    async def open(cls, path: Path, offload: Offload) -> Index:
        """Open the index at *path*; *offload* must have exactly one thread."""
        if offload.threads != 1:
            raise ValueError("the index needs an Offload of one thread")

        def _open() -> Index:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            entries = {}
            for row in conn.execute("SELECT * FROM base"):
                p, rev, kind, h, size, chunks, ex, mtime, inode, racy = row
                entries[p] = BaseEntry(
                    p, rev, kind, h, size, tuple(Chunk(*c) for c in json.loads(chunks)), bool(ex),
                    mtime, inode, bool(racy),
                )  # fmt: skip
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            return cls(conn, entries, meta, offload)

        return await offload.run_sync(_open)

    async def _run(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        try:
            await self._offload.run_sync(self._conn.execute, sql, params)
        except sqlite3.Error as e:  # the memory mirror is only changed after a write succeeds
            raise StateError(f"cannot write the state database: {e}") from e

    def get(self, path: str) -> BaseEntry | None:
        return self._entries.get(path)

    def paths(self) -> list[str]:
        return list(self._entries)

    def files(self) -> dict[str, StatKey]:
        """The synced files (no folders), each with its stat when it was synced."""
        return {p: e.stat_key for p, e in self._entries.items() if not e.is_dir}

    async def put(self, entry: BaseEntry) -> None:
        await self._run(_PUT, _row(entry))
        self._unlink_chunks(entry.path)
        self._entries[entry.path] = entry
        self._link_chunks(entry)

    def _link_chunks(self, entry: BaseEntry) -> None:
        offset = 0
        for chunk in entry.chunks:
            self._by_chunk.setdefault(chunk.hash, {}).setdefault(entry.path, offset)
            offset += chunk.size

    def _unlink_chunks(self, path: str) -> None:
        old = self._entries.get(path)
        if old is None:
            return
        for chunk in old.chunks:
            places = self._by_chunk.get(chunk.hash)
            if places is not None:
                places.pop(path, None)
                if not places:
                    del self._by_chunk[chunk.hash]
                    self._gone[chunk.hash] = None
                    if len(self._gone) > REMEMBER_GONE_CHUNKS:
                        self._gone.popitem(last=False)

    def has_chunk(self, hash: str) -> bool:
        """Whether a synced file has or recently had this chunk (so the server has it, or had
        it)."""
        return hash in self._by_chunk or hash in self._gone

    def chunk_sources(self, hash: str) -> list[tuple[str, int]]:
        """(path, offset) where a chunk with this hash was when those files were last synced.
        The files may have changed since: read, then verify the hash."""
        return list(self._by_chunk.get(hash, {}).items())

    async def replace_many(self, removed: list[str], added: list[BaseEntry]) -> None:
        """Remove the entries of *removed*, then put *added*, in one transaction."""
        rows = [_row(e) for e in added]

        def write() -> None:
            conn = self._conn
            conn.execute("BEGIN")
            try:
                conn.executemany("DELETE FROM base WHERE path = ?", [(p,) for p in removed])
                conn.executemany(_PUT, rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        try:
            await self._offload.run_sync(write)
        except sqlite3.Error as e:
            raise StateError(f"cannot write the state database: {e}") from e
        for path in removed:
            self._unlink_chunks(path)
            self._entries.pop(path, None)
        for entry in added:
            self._unlink_chunks(entry.path)
            self._entries[entry.path] = entry
            self._link_chunks(entry)

    async def remove(self, path: str) -> None:
        await self._run("DELETE FROM base WHERE path = ?", (path,))
        self._unlink_chunks(path)
        self._entries.pop(path, None)

    async def clear(self) -> None:
        await self._run("DELETE FROM base")
        self._entries.clear()
        self._by_chunk.clear()
        self._gone.clear()

    def meta(self, key: str) -> str | None:
        return self._meta.get(key)

    async def set_meta(self, key: str, value: str) -> None:
        await self._run("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        self._meta[key] = value

    async def aclose(self) -> None:
        await self._offload.run_sync(self._conn.close)

"""Server storage behind two narrow interfaces: `MetaStore` (versions, history) and `BlobStore`
(content-addressed chunks). The embedded defaults are SQLite and local disk; a PostgreSQL or
object-store backend implements the same two protocols.

All methods are async; the SQLite and disk implementations run their blocking work in threads
(SQLite through `trio.to_thread.run_sync` with a limiter of one; the chunk files, touched once
per chunk, through an `Offload`), so the event loop never waits on the disk.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import trio

from ..core.direct import ChunkFiles
from ..core.durable import (
    fsync_dir,
    group_syncer,
    synced_around,
    unlink_quietly,
    write_durably,
)
from ..core.hashing import content_hash, hash_bytes
from ..core.offload import Offload
from ..errors import Conflict, StoreError
from ..protocol.models import (
    CHUNKER,
    DIR,
    FILE,
    MAX_CHUNK_SIZE,
    MAX_MOVE_CHUNKS,
    Chunk,
    CommitRequest,
    FileEntry,
    MoveRequest,
    check_hash,
)

log = logging.getLogger("trio_sync.server")

#: What one commit of a batch came to: (entry, created_new_revision), or why it was refused.
CommitResult = tuple[FileEntry, bool] | Conflict | StoreError


class MetaStore(Protocol):
    async def server_id(self) -> str: ...
    async def latest_rev(self) -> int: ...
    async def current(self, path: str) -> FileEntry | None: ...
    async def commit(self, request: CommitRequest, origin: str) -> tuple[FileEntry, bool]:
        """Apply *request* if its base is still current. Returns (entry, created_new_revision).

        Raises `Conflict` carrying the current entry when the base is stale.
        """
        ...

    async def commit_many(self, requests: list[CommitRequest], origin: str) -> list[CommitResult]:
        """`commit` for each request, in order, each result on its own (an error is returned,
        not raised), in one durable write."""
        ...

    async def move(self, request: MoveRequest, origin: str) -> list[FileEntry]:
        """Move a folder and everything below it, in one durable write: a version at the new
        path for each live entry (parents first, each naming the path it came from), then a
        deletion of each old one (children first, each naming its new path). Returns the new
        versions in order.

        Raises `Conflict`: "stale" if the live entries below the folder are not the ones
        expected, "blocked" if the target or one of its parents is taken; `StoreError` if
        their versions list more than MAX_MOVE_CHUNKS chunks.
        """
        ...

    async def changes_since(
        self, rev: int, limit: int, max_bytes: int = ...
    ) -> list[FileEntry]: ...
    async def list_current(
        self, after_path: str, limit: int, max_bytes: int = ...
    ) -> list[FileEntry]: ...
    async def prune_history(self, superseded_before: float) -> int:
        """Forget versions replaced before this time (never a path's current version)."""
        ...

    async def history(self, path: str, limit: int) -> list[Kept]:
        """The kept versions of *path*, newest first, renames named (`Kept.renamed`)."""
        ...

    async def deleted_below(self, folder: str, limit: int) -> list[Kept]:
        """Paths below *folder* ("" for all) whose current version is a deletion, newest
        first, renames named."""
        ...

    async def as_of(self, path: str, when: float, limit: int) -> list[FileEntry]:
        """The live versions that were current at *when* (a Unix time) at *path* and below
        it ("" for all), by path."""
        ...

    async def referenced(self, hashes: list[str]) -> set[str]:
        """Which of these chunks some remaining version still uses."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Kept:
    """A version as history shows it: the entry and when it was committed (Unix time)."""

    entry: FileEntry
    committed_at: float
    #: For a file's creation, the path it was renamed from; for its deletion, the path it was
    #: renamed to (a deletion and a creation of the same content by the same client, moments
    #: apart: how a rename reaches the server; or the two ends of a folder's move).
    renamed: str | None = None


class ChunkBatch(Protocol):
    async def add(self, hash: str, data: bytes) -> None:
        """Take one chunk; StoreError if *data* is empty, too big, or not what *hash* names."""
        ...

    async def add_many(self, chunks: list[tuple[str, bytes]]) -> set[str]:
        """Take several chunks at once (small ones: one hand-off for all); returns the hashes
        refused, for the reasons `add` gives."""
        ...


class BlobStore(Protocol):
    async def missing(self, hashes: Iterable[str]) -> list[str]:
        """The hashes not stored. Those that are get a fresh timestamp: a client that was just
        told the server has a chunk will commit it soon, so garbage collection leaves it."""
        ...

    def batch(self) -> AbstractAsyncContextManager[ChunkBatch]:
        """Chunks added inside the block are stored, durably, when it ends without an error, and
        not at all if it ends with one. A store may make a whole batch durable at once."""
        ...

    async def put(self, hash: str, data: bytes) -> None:
        """A batch of one chunk."""
        ...

    async def get(self, hash: str) -> bytes | None: ...
    async def get_some(self, hashes: Sequence[str], max_bytes: int) -> list[bytes | None]:
        """The first chunks of *hashes* in order (None for one not stored): at least one, and
        no more once they add up to *max_bytes*, so that small chunks are read together."""
        ...

    async def idle_since(self, before: float) -> list[str]:
        """Chunks neither stored nor asked about since *before* (a time.time() value)."""
        ...

    async def delete(self, hashes: list[str], *, idle_since: float) -> int:
        """Delete these chunks unless they were touched since; returns how many went."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    rev INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    deleted INTEGER NOT NULL,
    kind TEXT NOT NULL,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunks TEXT NOT NULL,
    executable INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    origin TEXT NOT NULL,
    committed_at REAL NOT NULL,
    moved TEXT  -- for a version a folder's move made: the path at the move's other end
);
CREATE INDEX IF NOT EXISTS versions_by_path ON versions (path, rev);
CREATE TABLE IF NOT EXISTS current (
    path TEXT PRIMARY KEY,
    rev INTEGER NOT NULL REFERENCES versions (rev)
);
-- Which versions use which chunk, so garbage collection can ask about a chunk directly.
CREATE TABLE IF NOT EXISTS version_chunks (hash TEXT NOT NULL, rev INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS version_chunks_by_hash ON version_chunks (hash);
CREATE INDEX IF NOT EXISTS version_chunks_by_rev ON version_chunks (rev);
"""

#: The version of a path before a revision: deleted, hash, size.
_PREVIOUS = (
    "SELECT deleted, hash, size FROM versions WHERE path = ? AND rev < ? ORDER BY rev DESC LIMIT 1"
)
#: The two ends of a rename are looked for this close to each other, by the same client.
RENAME_REVS = 1000
RENAME_SECONDS = 60.0
_NEAR = "v.rev BETWEEN ? AND ? AND v.origin = ? AND v.path != ? AND v.committed_at BETWEEN ? AND ?"
_BEFORE_IT = (
    "(SELECT {} FROM versions q WHERE q.path = v.path AND q.rev < v.rev"
    " ORDER BY q.rev DESC LIMIT 1)"
)
#: Where a deleted file went: its content created elsewhere (the path new, or deleted before).
_RENAMED_TO = (
    f"SELECT v.path FROM versions v WHERE {_NEAR} AND v.deleted = 0 AND v.kind != '{DIR}'"
    f" AND v.hash = ? AND COALESCE({_BEFORE_IT.format('q.deleted')}, 1) = 1"
    " ORDER BY abs(v.rev - ?) LIMIT 1"
)
#: Where a created file came from: a deletion of a path that held its content.
_RENAMED_FROM = (
    f"SELECT v.path FROM versions v WHERE {_NEAR} AND v.deleted = 1"
    f" AND {_BEFORE_IT.format('CASE WHEN q.deleted THEN NULL ELSE q.hash END')} = ?"
    " ORDER BY abs(v.rev - ?) LIMIT 1"
)

_COLUMNS = (
    "v.rev, v.path, v.deleted, v.kind, v.hash, v.size, v.chunks, v.executable, v.mtime_ns,"
    " v.origin, v.moved"
)
_CHUNKS_COLUMN = 6
#: The most one chunk takes in a stored chunk list (`["<64 hex>", 2097152], `; each list
#: adds its brackets).
_CHUNK_JSON_MAX = 79
#: A page of listings or events stops after about this many bytes of chunk lists.
PAGE_BYTES = 8 * 1024 * 1024


def _at_or_below(column: str, folder: str) -> tuple[str, tuple[str, ...]]:
    """An SQL condition for *column* naming *folder* or a path below it ("" for every path)."""
    if not folder:
        return "1", ()
    # Paths below "a/b" sort between "a/b/" and "a/b0" ("0" follows "/" in code points).
    return f"({column} = ? OR ({column} >= ? AND {column} < ?))", (
        folder,
        folder + "/",
        folder + "0",
    )


def _entry(row: tuple[Any, ...]) -> FileEntry:
    rev, path, deleted, kind, hash_, size, chunks, executable, mtime_ns, origin, moved = row
    return FileEntry(
        path=path,
        rev=rev,
        deleted=bool(deleted),
        kind=kind,
        hash=hash_,
        size=size,
        chunks=tuple(Chunk(h, s) for h, s in json.loads(chunks)),
        executable=bool(executable),
        mtime_ns=mtime_ns,
        origin=origin,
        moved_from=None if deleted else moved,
    )


class SQLiteMetaStore:
    """Versions and the current-path table in one SQLite file, WAL mode, one connection.

    One connection behind a limiter of one: SQLite serialises writers anyway, and the commit check
    (base still current?) and the insert must be one transaction.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._limiter = trio.CapacityLimiter(1)

    @classmethod
    async def open(cls, path: Path) -> SQLiteMetaStore:
        def _open() -> sqlite3.Connection:
            # Created private before SQLite opens it; its -wal and -shm files take its mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(versions)")}
            if "moved" not in columns:  # a store from before folder moves
                conn.execute("ALTER TABLE versions ADD COLUMN moved TEXT")
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('server_id', ?)",
                (uuid.uuid4().hex,),
            )
            if conn.execute("SELECT 1 FROM meta WHERE key = 'chunk_refs'").fetchone() is None:
                _fill_chunk_refs(conn)  # a store from before garbage collection existed
            _check_chunker(conn)
            return conn

        return cls(await trio.to_thread.run_sync(_open))

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def server_id(self) -> str:
        row = await self._run(
            lambda: self._conn.execute("SELECT value FROM meta WHERE key='server_id'").fetchone()
        )
        return str(row[0])

    async def latest_rev(self) -> int:
        row = await self._run(
            lambda: self._conn.execute("SELECT COALESCE(MAX(rev), 0) FROM versions").fetchone()
        )
        return int(row[0])

    def _current(self, path: str) -> FileEntry | None:
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM current c JOIN versions v ON v.rev = c.rev WHERE c.path = ?",
            (path,),
        ).fetchone()
        return _entry(row) if row else None

    async def current(self, path: str) -> FileEntry | None:
        result: FileEntry | None = await self._run(self._current, path)
        return result

    def _live(self, path: str) -> FileEntry | None:
        entry = self._current(path)
        return entry if entry is not None and not entry.deleted else None

    def _first_live_below(self, path: str) -> FileEntry | None:
        # Paths below "a/b" sort between "a/b/" and "a/b0" ("0" follows "/" in code points).
        row = self._conn.execute(
            f"SELECT {_COLUMNS} FROM current c JOIN versions v ON v.rev = c.rev"
            " WHERE c.path >= ? AND c.path < ? AND v.deleted = 0 ORDER BY c.path LIMIT 1",
            (path + "/", path + "0"),
        ).fetchone()
        return _entry(row) if row else None

    def _insert(self, req: CommitRequest, origin: str, moved: str | None = None) -> FileEntry:
        chunks = json.dumps([[c.hash, c.size] for c in req.chunks])
        rev = self._conn.execute(
            "INSERT INTO versions (path, deleted, kind, hash, size, chunks, executable, mtime_ns,"
            " origin, committed_at, moved) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                req.path,
                int(req.deleted),
                req.kind,
                req.hash,
                req.size,
                chunks,
                int(req.executable),
                req.mtime_ns,
                origin,
                time.time(),
                moved,
            ),
        ).lastrowid
        assert rev is not None
        self._conn.executemany(
            "INSERT INTO version_chunks (hash, rev) VALUES (?, ?)",
            [(h, rev) for h in dict.fromkeys(c.hash for c in req.chunks)],
        )
        self._conn.execute(
            "INSERT INTO current (path, rev) VALUES (?, ?)"
            " ON CONFLICT (path) DO UPDATE SET rev = excluded.rev",
            (req.path, rev),
        )
        return FileEntry(
            path=req.path,
            rev=rev,
            deleted=req.deleted,
            kind=req.kind,
            hash=req.hash,
            size=req.size,
            chunks=req.chunks,
            executable=req.executable,
            mtime_ns=req.mtime_ns,
            origin=origin,
            moved_from=None if req.deleted else moved,
        )

    def _apply(self, req: CommitRequest, origin: str) -> tuple[FileEntry, bool]:
        """Check and apply one change inside an open transaction. The tree stays consistent:
        every live entry's parents are live folders, and no file has anything below it.

        Returns (entry, created); raises Conflict.
        """
        cur = self._current(req.path)
        live = cur if cur is not None and not cur.deleted else None
        if req.base_rev != (cur.rev if cur else 0) and not (live is None and req.base_rev == 0):
            raise Conflict(req.path, cur)
        if req.deleted:
            if live is None:
                if cur is None:
                    raise Conflict(req.path, None)
                return cur, False  # deleting a tombstone: nothing to do
            if live.kind == DIR and self._first_live_below(req.path) is not None:
                raise Conflict(req.path, cur, reason="not_empty")
        else:
            missing = self._parents_for(req.path, cur)
            if req.kind == FILE:
                below = self._first_live_below(req.path)
                if below is not None:
                    raise Conflict(req.path, cur, reason="blocked", blocking=below)
            if live is not None and _same(live, req):
                return live, False
            for ancestor in missing:  # parents exist explicitly, so empty folders can too
                self._insert(CommitRequest(path=ancestor, base_rev=0, kind=DIR), origin)
        return self._insert(req, origin), True

    def _commit_many(self, reqs: list[CommitRequest], origin: str) -> list[CommitResult]:
        """Each change checked and applied on its own, all in one transaction (one fsync)."""
        conn = self._conn
        results: list[CommitResult] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for req in reqs:
                conn.execute("SAVEPOINT one")
                try:
                    entry, created = self._apply(req, origin)
                except Conflict as conflict:
                    conn.execute("ROLLBACK TO one")
                    results.append(conflict)
                else:
                    results.append((entry, created))
                conn.execute("RELEASE one")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    async def commit_many(self, requests: list[CommitRequest], origin: str) -> list[CommitResult]:
        checked: list[CommitRequest] = []
        bad: dict[int, CommitResult] = {}
        for i, req in enumerate(requests):
            if not req.deleted and req.kind == FILE and content_hash(req.chunks) != req.hash:
                bad[i] = StoreError(f"{req.path}: 'hash' does not match the chunk list")
            else:
                checked.append(req)
        applied: list[CommitResult] = await self._run(self._commit_many, checked, origin)
        done = iter(applied)
        return [bad[i] if i in bad else next(done) for i in range(len(requests))]

    def _parents_for(self, path: str, cur: FileEntry | None) -> list[str]:
        """The missing parent folders of *path*, to create before it; Conflict "blocked" if a
        file stands where one of them must be."""
        parents = path.split("/")[:-1]
        missing = []
        for ancestor in ("/".join(parents[: i + 1]) for i in range(len(parents))):
            existing = self._live(ancestor)
            if existing is None:
                missing.append(ancestor)
            elif existing.kind == FILE:
                raise Conflict(path, cur, reason="blocked", blocking=existing)
        return missing

    def _move(self, req: MoveRequest, origin: str) -> list[FileEntry]:
        conn = self._conn
        where, params = _at_or_below("c.path", req.source)
        live_below = (
            f"FROM current c JOIN versions v ON v.rev = c.rev WHERE {where} AND v.deleted = 0"
        )
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Counted before anything is loaded: the folder may hold far more than expected.
            count, listed = conn.execute(
                f"SELECT COUNT(*), COALESCE(SUM(length(v.chunks)), 0) {live_below}", params
            ).fetchone()
            if count != len(req.expect):
                raise Conflict(req.source, self._current(req.source))
            if listed > MAX_MOVE_CHUNKS * _CHUNK_JSON_MAX + 2 * count:  # surely too many
                raise StoreError(f"{req.source}: too big to move as one; move it path by path")
            live = [
                _entry(row)
                for row in conn.execute(f"SELECT {_COLUMNS} {live_below} ORDER BY c.path", params)
            ]
            if sum(len(e.chunks) for e in live) > MAX_MOVE_CHUNKS:
                raise StoreError(f"{req.source}: too big to move as one; move it path by path")
            cut = len(req.source) + 1
            found = {e.path[cut:]: e.rev for e in live}
            if found != req.expect or live[0].kind != DIR:
                raise Conflict(req.source, self._current(req.source))
            target = self._current(req.target)
            taken = target if target is not None and not target.deleted else None
            taken = taken or self._first_live_below(req.target)
            if taken is not None:
                raise Conflict(req.target, target, reason="blocked", blocking=taken)
            out = [
                self._insert(CommitRequest(path=p, base_rev=0, kind=DIR), origin)
                for p in self._parents_for(req.target, target)
            ]

            def moved(path: str) -> str:
                return req.target + path[len(req.source) :]

            for entry in live:  # by path: parents first
                request = CommitRequest(
                    path=moved(entry.path), base_rev=0, kind=entry.kind, hash=entry.hash,
                    size=entry.size, chunks=entry.chunks, executable=entry.executable,
                    mtime_ns=entry.mtime_ns,
                )  # fmt: skip
                out.append(self._insert(request, origin, moved=entry.path))
            for entry in reversed(live):  # children first
                request = CommitRequest(path=entry.path, base_rev=entry.rev, deleted=True)
                out.append(self._insert(request, origin, moved=moved(entry.path)))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return out

    async def move(self, request: MoveRequest, origin: str) -> list[FileEntry]:
        result: list[FileEntry] = await self._run(self._move, request, origin)
        return result

    async def commit(self, request: CommitRequest, origin: str) -> tuple[FileEntry, bool]:
        (result,) = await self.commit_many([request], origin)
        if isinstance(result, Exception):
            raise result
        return result

    def _page(self, sql: str, params: tuple[Any, ...], max_bytes: int) -> list[FileEntry]:
        """The rows of *sql* as entries, stopping once their chunk lists pass *max_bytes* (at
        least one row): a page of versions of huge files must not need gigabytes."""
        out: list[FileEntry] = []
        total = 0
        for row in self._conn.execute(sql, params):
            out.append(_entry(row))
            total += len(row[_CHUNKS_COLUMN])
            if total >= max_bytes:
                break
        return out

    async def changes_since(
        self, rev: int, limit: int, max_bytes: int = PAGE_BYTES
    ) -> list[FileEntry]:
        sql = f"SELECT {_COLUMNS} FROM versions v WHERE v.rev > ? ORDER BY v.rev LIMIT ?"
        result: list[FileEntry] = await self._run(self._page, sql, (rev, limit), max_bytes)
        return result

    async def list_current(
        self, after_path: str, limit: int, max_bytes: int = PAGE_BYTES
    ) -> list[FileEntry]:
        sql = (
            f"SELECT {_COLUMNS} FROM current c JOIN versions v ON v.rev = c.rev"
            " WHERE c.path > ? AND v.deleted = 0 ORDER BY c.path LIMIT ?"
        )
        result: list[FileEntry] = await self._run(self._page, sql, (after_path, limit), max_bytes)
        return result

    def _kept(self, sql: str, params: tuple[Any, ...]) -> list[Kept]:
        rows = self._conn.execute(sql, params).fetchall()
        return [self._renamed(Kept(_entry(row[:-1]), row[-1]), row[-2]) for row in rows]

    def _renamed(self, kept: Kept, moved: str | None) -> Kept:
        """*kept* with the other end of its rename, if it is one end of one."""
        if moved is not None:
            return replace(kept, renamed=moved)  # a folder's move recorded it
        entry = kept.entry
        if entry.kind == DIR or (not entry.deleted and entry.size == 0):
            return kept  # a folder, or an empty file: nothing tells one from another
        conn = self._conn
        before = conn.execute(_PREVIOUS, (entry.path, entry.rev)).fetchone()
        created = before is None or before[0]
        if not entry.deleted and not created:
            return kept  # a change, neither end of a rename
        if entry.deleted and created:
            return kept  # deleted twice
        window = (
            entry.rev - RENAME_REVS, entry.rev + RENAME_REVS, entry.origin, entry.path,
            kept.committed_at - RENAME_SECONDS, kept.committed_at + RENAME_SECONDS,
        )  # fmt: skip
        if entry.deleted:
            if not before[2]:
                return kept  # it was empty
            other = conn.execute(_RENAMED_TO, (*window, before[1], entry.rev)).fetchone()
        else:
            other = conn.execute(_RENAMED_FROM, (*window, entry.hash, entry.rev)).fetchone()
        return replace(kept, renamed=other[0]) if other else kept

    async def history(self, path: str, limit: int) -> list[Kept]:
        sql = (
            f"SELECT {_COLUMNS}, v.committed_at FROM versions v WHERE v.path = ?"
            " ORDER BY v.rev DESC LIMIT ?"
        )
        result: list[Kept] = await self._run(self._kept, sql, (path, limit))
        return result

    async def deleted_below(self, folder: str, limit: int) -> list[Kept]:
        where, params = _at_or_below("c.path", folder)
        sql = (
            f"SELECT {_COLUMNS}, v.committed_at FROM current c JOIN versions v ON v.rev = c.rev"
            f" WHERE {where} AND c.path != ? AND v.deleted = 1 ORDER BY v.rev DESC LIMIT ?"
        )
        result: list[Kept] = await self._run(self._kept, sql, (*params, folder, limit))
        return result

    async def as_of(self, path: str, when: float, limit: int) -> list[FileEntry]:
        where, params = _at_or_below("path", path)
        sql = (
            f"SELECT {_COLUMNS} FROM versions v JOIN ("
            f"  SELECT path, MAX(rev) AS rev FROM versions WHERE committed_at <= ? AND {where}"
            "   GROUP BY path"
            ") m ON v.rev = m.rev WHERE v.deleted = 0 ORDER BY v.path LIMIT ?"
        )
        rows = await self._run(lambda: self._conn.execute(sql, (when, *params, limit)).fetchall())
        return [_entry(row) for row in rows]

    def _prune(self, before: float) -> int:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            old = [
                r
                for (r,) in conn.execute(
                    "SELECT v.rev FROM versions v WHERE v.rev NOT IN (SELECT rev FROM current)"
                    " AND EXISTS (SELECT 1 FROM versions n WHERE n.path = v.path"
                    " AND n.rev > v.rev AND n.committed_at < ?)",
                    (before,),
                )
            ]
            conn.executemany("DELETE FROM version_chunks WHERE rev = ?", [(r,) for r in old])
            conn.executemany("DELETE FROM versions WHERE rev = ?", [(r,) for r in old])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return len(old)

    async def prune_history(self, superseded_before: float) -> int:
        pruned: int = await self._run(self._prune, superseded_before)
        return pruned

    async def referenced(self, hashes: list[str]) -> set[str]:
        def query() -> set[str]:
            used: set[str] = set()
            for i in range(0, len(hashes), 500):
                part = hashes[i : i + 500]
                marks = ",".join("?" * len(part))
                used.update(
                    h
                    for (h,) in self._conn.execute(
                        f"SELECT DISTINCT hash FROM version_chunks WHERE hash IN ({marks})", part
                    )
                )
            return used

        result: set[str] = await self._run(query)
        return result

    async def aclose(self) -> None:
        await self._run(self._conn.close)


#: The chunker of stores that predate the `chunker` key in `meta`.
_FIRST_CHUNKER = "fastcdc-2016/256K-1M-4M/blake3"


def _check_chunker(conn: sqlite3.Connection) -> None:
    """Refuse a store whose files were cut by another chunker: today's clients would hash the same
    content differently and take every such file for a different one."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'chunker'").fetchone()
    if row is None:
        used = conn.execute("SELECT 1 FROM versions WHERE chunks != '[]' LIMIT 1").fetchone()
        stored = _FIRST_CHUNKER if used else CHUNKER
        conn.execute("INSERT INTO meta (key, value) VALUES ('chunker', ?)", (stored,))
    else:
        stored = row[0]
    if stored != CHUNKER:
        raise StoreError(
            f"this data folder holds files chunked as {stored!r}; this version of trio-sync"
            f" chunks as {CHUNKER!r}. Run the version that made it, or start a new data folder"
            " and let the clients upload again."
        )


def _fill_chunk_refs(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    for rev, chunks in conn.execute("SELECT rev, chunks FROM versions").fetchall():
        conn.executemany(
            "INSERT INTO version_chunks (hash, rev) VALUES (?, ?)",
            [(h, rev) for h in dict.fromkeys(h for h, _ in json.loads(chunks))],
        )
    conn.execute("INSERT INTO meta (key, value) VALUES ('chunk_refs', '1')")
    conn.execute("COMMIT")


#: How DiskBlobStore names chunk files below `chunks/`, as recorded in `chunk-layout`.
LAYOUT = "ab/<hash>\n"


class DiskBlobStore:
    """Chunks as files named by their hash under `root/ab/<hash>`.

    One level of 256 folders: a store fills them all within its first few thousand chunks and
    then only adds files. Two levels (65,536 folders, the layout before) made nearly every chunk
    of a new store create a folder, which cost the server about a third of its system time.

    A chunk is written to `tmp/` once its hash checks out, and renamed into place only after its
    content is on disk, so a crash leaves either no chunk or a whole, correct one. A batch is made
    durable together where syncfs(2) is sure to be as good as fsync (`core.durable.group_syncer`):
    all its temp files in one call, then all its renames in one more, instead of an fsync per
    chunk file and per folder (which cost the server about 3 s of the 20 s that 10,000 files of
    4 KiB took end to end). Elsewhere, or with *group_sync* off, each chunk file and each folder it
    lands in is fsynced.

    With *direct* (`--direct-store`), chunk files are written and read with O_DIRECT where the
    filesystem takes it (`core.direct`). The checks are the same either way: a write is durable
    before its rename, a read is hashed.
    """

    def __init__(
        self,
        root: Path,
        tmp: Path,
        *,
        offload: Offload,
        group_sync: bool = True,
        direct: bool = False,
    ) -> None:
        # Plain strings: a path object per chunk costs more than the chunk's syscalls.
        self._root = os.fspath(root)
        self._tmp = os.fspath(tmp)
        self._offload = offload
        self._names = itertools.count()  # temp file names, unique within the process
        self._syncfs = group_syncer(tmp) if group_sync else None
        #: With *direct*, written and read around the page cache (`core.direct`).
        self._files = ChunkFiles(MAX_CHUNK_SIZE, direct=direct)

    @property
    def direct(self) -> bool:
        return self._files.direct

    @classmethod
    def open(
        cls, data_dir: Path, *, offload: Offload, group_sync: bool = True, direct: bool = False
    ) -> DiskBlobStore:
        """The store in *data_dir*. With *direct*, its chunk files bypass the page cache where
        the filesystem allows. Blocking."""
        root, tmp = data_dir / "chunks", data_dir / "tmp"
        root.mkdir(parents=True, exist_ok=True, mode=0o700)  # private whatever the umask
        tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in tmp.iterdir():  # from a crash or a kill -9: never complete chunks
            leftover.unlink(missing_ok=True)
        layout = data_dir / "chunk-layout"
        if not layout.exists():
            _flatten_two_levels(root)
            write_durably(layout, LAYOUT)
        elif (found := layout.read_text()) != LAYOUT:
            raise StoreError(f"{root} holds chunks laid out as {found.strip()!r}, not {LAYOUT!r}")
        if direct and not ChunkFiles(MAX_CHUNK_SIZE, direct=True).works_in(os.fspath(tmp)):
            log.warning("%s does not take O_DIRECT: chunk files go through the page cache", tmp)
            direct = False
        return cls(root, tmp, offload=offload, group_sync=group_sync, direct=direct)

    def _path(self, hash: str) -> str:
        check_hash(hash)
        return f"{self._root}/{hash[:2]}/{hash}"

    async def missing(self, hashes: Iterable[str]) -> list[str]:
        paths = [(h, self._path(h)) for h in hashes]

        def check() -> list[str]:
            absent = []
            for hash, path in paths:
                try:
                    os.utime(path)
                except FileNotFoundError:
                    absent.append(hash)
            return absent

        return await self._offload.run_sync(check)

    async def idle_since(self, before: float) -> list[str]:
        def scan() -> list[str]:
            found = []
            for dirpath, _dirs, files in os.walk(self._root):
                for name in files:
                    with contextlib.suppress(FileNotFoundError):
                        if os.stat(os.path.join(dirpath, name)).st_mtime < before:
                            found.append(name)
            return found

        return await self._offload.run_sync(scan)

    async def delete(self, hashes: list[str], *, idle_since: float) -> int:
        def remove() -> int:
            gone = 0
            for hash in hashes:
                path = self._path(hash)
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(path).st_mtime < idle_since:
                        os.unlink(path)
                        gone += 1
            return gone

        return await self._offload.run_sync(remove)

    def _stage(self, hash: str, data: bytes) -> tuple[str, str] | None:
        """Write a checked chunk to a temp file: (temp, final), or None if it is stored already."""
        final = self._path(hash)
        if len(data) > MAX_CHUNK_SIZE or not data:
            raise StoreError(f"chunk size must be 1..{MAX_CHUNK_SIZE} bytes")
        if hash_bytes(data) != hash:
            raise StoreError("chunk content does not match its hash")
        if self._get(hash) is not None:  # stored and sound: just fresh again for the collector
            with contextlib.suppress(FileNotFoundError):
                os.utime(final)
                return None
        # Not stored, or stored damaged (`_get` removed it): these checked bytes repair it.
        tmp = f"{self._tmp}/{hash}.{next(self._names)}.part"
        try:
            self._files.write(tmp, data, fsync=self._syncfs is None)
        except BaseException:
            unlink_quietly(tmp)
            raise
        return tmp, final

    def _land(self, staged: list[tuple[str, str]]) -> None:
        """Rename staged chunks into place, durably. Their content is on disk before any name
        points at it."""
        if self._syncfs is not None:
            with synced_around(self._syncfs, self._tmp):
                for tmp, final in staged:
                    self._rename(tmp, final)
        else:
            folders = {self._rename(tmp, final) for tmp, final in staged}
            for folder in folders:
                fsync_dir(folder)

    def _rename(self, tmp: str, final: str) -> str:
        folder = os.path.dirname(final)
        try:
            os.replace(tmp, final)
        except FileNotFoundError:  # the chunk's folder does not exist yet
            with contextlib.suppress(FileExistsError):
                os.mkdir(folder, 0o700)
            if self._syncfs is None:
                fsync_dir(self._root)  # the new folder must survive a crash with its chunk
            os.replace(tmp, final)
        return folder

    @asynccontextmanager
    async def batch(self) -> AsyncIterator[ChunkBatch]:
        batch = _DiskBatch(self._offload, self._stage)
        try:
            yield batch
            # Not cancellable once running; if it fails half way, what it did not rename is
            # removed below.
            await self._offload.run_sync(self._land, batch.staged)
            batch.staged.clear()
        finally:
            if batch.staged:
                with trio.CancelScope(shield=True):
                    await self._offload.run_sync(_unlink_all, batch.staged)

    async def put(self, hash: str, data: bytes) -> None:
        async with self.batch() as batch:
            await batch.add(hash, data)

    def _get(self, hash: str) -> bytes | None:
        """The chunk's bytes, verified; None if it is not stored. A chunk whose bytes no longer
        match its hash (a bad disk, a restore gone wrong) is removed, so that the store reports
        it missing and the next upload of that content stores it again."""
        path = self._path(hash)
        try:
            data = self._files.read(path)
        except FileNotFoundError:
            return None
        if hash_bytes(data) == hash:
            return data
        log.error("chunk %s is damaged on disk (%d bytes); removed until it is uploaded again",
                  hash, len(data))  # fmt: skip
        unlink_quietly(path)
        return None

    async def get(self, hash: str) -> bytes | None:
        return await self._offload.run_sync(self._get, hash)

    async def get_some(self, hashes: Sequence[str], max_bytes: int) -> list[bytes | None]:
        def read() -> list[bytes | None]:
            found: list[bytes | None] = []
            total = 0
            for hash in hashes:
                data = self._get(hash)
                found.append(data)
                total += len(data) if data is not None else 0
                if total >= max_bytes:
                    break
            return found

        return await self._offload.run_sync(read)


class _DiskBatch:
    def __init__(
        self, offload: Offload, stage: Callable[[str, bytes], tuple[str, str] | None]
    ) -> None:
        self._offload = offload
        self._stage = stage
        self.staged: list[tuple[str, str]] = []  # (temp, final), appended on the Trio thread

    async def add(self, hash: str, data: bytes) -> None:
        # Not cancellable mid-write: _stage removes its own temp file if it fails.
        staged = await self._offload.run_sync(self._stage, hash, data)
        if staged is not None:
            self.staged.append(staged)

    async def add_many(self, chunks: list[tuple[str, bytes]]) -> set[str]:
        def stage_all() -> tuple[list[tuple[str, str]], set[str]]:
            staged: list[tuple[str, str]] = []
            refused: set[str] = set()
            for hash, data in chunks:
                try:
                    one = self._stage(hash, data)
                except StoreError:
                    refused.add(hash)
                    continue
                except BaseException:
                    _unlink_all(staged)  # the batch never hears of them
                    raise
                if one is not None:
                    staged.append(one)
            return staged, refused

        staged, refused = await self._offload.run_sync(stage_all)
        self.staged.extend(staged)
        return refused


def _unlink_all(staged: list[tuple[str, str]]) -> None:
    """Remove the temp files of a batch; those already renamed are gone already."""
    for tmp, _final in staged:
        unlink_quietly(tmp)


def _flatten_two_levels(root: Path) -> None:
    """Move chunks from the older `ab/cd/<hash>` layout to `ab/<hash>`. A crash midway leaves
    every chunk under one name or the other, and the next start (with no `chunk-layout` file
    yet) finishes the move."""
    for top in os.scandir(root):
        if not top.is_dir(follow_symlinks=False):
            continue
        moved = False
        for sub in os.scandir(top.path):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for chunk in os.scandir(sub.path):
                os.replace(chunk.path, os.path.join(top.path, chunk.name))
                moved = True
            os.rmdir(sub.path)
        if moved:
            fsync_dir(top.path)


def _same(entry: FileEntry, req: CommitRequest) -> bool:
    if entry.kind != req.kind:
        return False
    if entry.kind == DIR:
        return True
    return (entry.hash, entry.executable, entry.mtime_ns) == (
        req.hash,
        req.executable,
        req.mtime_ns,
    )

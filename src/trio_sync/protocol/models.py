"""Records that cross the wire, with their JSON form and validation.

A file version is an ordered list of chunks. Each chunk is named by the BLAKE3-256 hash of its
bytes; the file's content hash is BLAKE3 over the concatenated binary chunk digests, so the server
can check a commit's hash from its chunk list without reading any content.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from blake3 import blake3

from ..errors import ProtocolError
from .paths import check_path

#: Content-defined chunking (FastCDC, as implemented by the `fastcdc` package, whose gear table
#: is part of this contract): chunk sizes lie between CDC_MIN and CDC_MAX, about CDC_AVG on average.
#: Every client must cut the same content the same way, or equal files would get different hashes.
CDC_MIN = 128 * 1024
CDC_AVG = 512 * 1024
CDC_MAX = 2 * 1024 * 1024
#: Named in `GET /info`; a client refuses a server that announces another.
CHUNKER = "fastcdc-2016/128K-512K-2M/blake3"
#: The largest chunk anyone accepts: the chunker never cuts a bigger one. Every chunk of a file
#: but its last is at least CDC_MIN, so a chunk list has at most size / CDC_MIN + 1 entries.
MAX_CHUNK_SIZE = CDC_MAX
#: The most bytes the chunks of one `POST /chunks` may decode to: a zstd frame of a few hundred
#: bytes can stand for a whole chunk of zeros, so the bytes on the wire bound nothing.
MAX_DECODED_PER_REQUEST = 64 * 1024 * 1024
#: The most chunk hashes one `POST /chunks/missing` may ask about.
MAX_HASHES_PER_QUERY = 10_000
#: The most chunks one `POST /chunks/fetch` may ask for.
MAX_FETCH = 4096
#: The longest a `POST /chunks/fetch` may wait for chunks that are not stored yet, in seconds.
MAX_FETCH_WAIT = 30.0
#: The most commits one `POST /commits` may carry.
MAX_COMMITS = 1000
#: Entries one `POST /move` may carry (the folder and everything below it), and chunks their
#: versions may list in all (about 25 GiB at the average chunk size): the server holds them in
#: memory while it moves them. A bigger folder moves path by path.
MAX_MOVE = 10_000
MAX_MOVE_CHUNKS = 50_000
#: The most chunks one file version may have (about 1 TiB at the average chunk size).
MAX_CHUNKS = 1_048_576
#: Integers on the wire fit SQLite's (and most languages') signed 64 bits.
MAX_INT = 2**63 - 1
#: Names sent in headers (client name) are bounded and printable.
MAX_NAME_LEN = 64
#: The header by which a client that shares its token with others names itself.
CLIENT_HEADER = "X-Trio-Sync-Client"
#: Uploads of at least this many chunk bytes are announced before the chunks are sent (`POST
#: /announce`), so that other clients can fetch them while the rest is still arriving. Smaller
#: ones take less time to upload than an announcement saves. (A file sent while it is hashed is
#: announced in steps as soon as any of it is lacking: `client/early.py`.)
ANNOUNCE_MIN_SIZE = 8 * 1024 * 1024
#: An announcement lists at most this many chunks (8 GiB at the average size); it goes to every
#: connected client as one event, so it stays small. Bigger files are simply not announced.
MAX_ANNOUNCED_CHUNKS = 16_384
#: A step of an announcement (the chunks an uploader cut since its last one) lists at most this
#: many; an uploader that has more to announce at once sends several steps.
MAX_STEP_CHUNKS = 1024

FILE = "file"
DIR = "dir"
KINDS = (FILE, DIR)

_HASH = re.compile(r"[0-9a-f]{64}")
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_NAME = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_NAME_LEN}}}")


def check_hash(value: object) -> str:
    if not isinstance(value, str) or not _HASH.fullmatch(value):
        raise ProtocolError(f"not a content hash: {value!r}")
    return value


def check_name(value: object) -> str:
    """Client names: letters, digits, `.`, `_`, `-`; they end up in file names and logs."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ProtocolError(f"client name must match [A-Za-z0-9._-]{{1,64}}: {value!r}")
    return value


def is_valid_name(value: object) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def _int(data: dict[str, Any], key: str, *, minimum: int = 0) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value <= MAX_INT:
        raise ProtocolError(f"{key!r} must be an integer from {minimum} to {MAX_INT}")
    return value


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{key!r} must be a boolean")
    return value


@dataclass(frozen=True, slots=True)
class Chunk:
    hash: str
    size: int

    def to_json(self) -> list[Any]:
        return [self.hash, self.size]

    @classmethod
    def from_json(cls, data: object) -> Chunk:
        if not isinstance(data, list) or len(data) != 2:
            raise ProtocolError("a chunk is [hash, size]")
        size = data[1]
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_CHUNK_SIZE:
            raise ProtocolError(f"chunk size must be 1..{MAX_CHUNK_SIZE}")
        return cls(check_hash(data[0]), size)


def _kind(data: dict[str, Any]) -> str:
    kind = data.get("kind", FILE)
    if kind not in KINDS:
        raise ProtocolError(f"'kind' must be one of {KINDS}")
    return str(kind)


def content_hash(chunks: Iterable[Chunk]) -> str:
    """The file's hash: BLAKE3 over the concatenated 32-byte chunk digests, in order."""
    h = blake3()
    for chunk in chunks:
        h.update(bytes.fromhex(chunk.hash))
    return h.hexdigest()


def _chunks(data: dict[str, Any], *, most: int = MAX_CHUNKS) -> tuple[Chunk, ...]:
    raw = data.get("chunks", [])
    if not isinstance(raw, list) or len(raw) > most:
        raise ProtocolError(f"'chunks' must be a list of at most {most} chunks")
    chunks = tuple(Chunk.from_json(c) for c in raw)
    # The chunker's bounds: a list of tiny chunks would make a small file cost its every
    # reader (listings, events, indexes) far more than its content.
    if any(c.size < CDC_MIN for c in chunks[:-1]):
        raise ProtocolError(f"every chunk but the last must be at least {CDC_MIN} bytes")
    return chunks


def _content(data: dict[str, Any], *, most: int = MAX_CHUNKS) -> tuple[str, int, tuple[Chunk, ...]]:
    """A file's hash, size and chunks, checked against each other."""
    chunks = _chunks(data, most=most)
    size = _size(data, chunks)
    hash = check_hash(data.get("hash"))
    if content_hash(chunks) != hash:
        raise ProtocolError("'hash' does not match the chunk list")
    return hash, size, chunks


def _size(data: dict[str, Any], chunks: tuple[Chunk, ...]) -> int:
    size = _int(data, "size")
    if size != sum(c.size for c in chunks):
        raise ProtocolError("'size' is not the sum of the chunk sizes")
    return size


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One version of one path on the server; `deleted` versions are tombstones.

    Folders are entries too (`kind` "dir", no content), so empty folders exist on the wire.
    """

    path: str
    rev: int
    deleted: bool = False
    kind: str = FILE
    hash: str = ""
    size: int = 0
    chunks: tuple[Chunk, ...] = field(default=())
    executable: bool = False
    mtime_ns: int = 0
    origin: str = ""
    #: On a version a folder's move (`POST /move`) made: the path it moved from. A client
    #: holding that folder as the server had it may rename it instead of path by path.
    moved_from: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.deleted:
            return {"path": self.path, "rev": self.rev, "deleted": True, "origin": self.origin}
        if self.kind == DIR:
            out: dict[str, Any] = {
                "path": self.path,
                "rev": self.rev,
                "deleted": False,
                "kind": DIR,
                "origin": self.origin,
            }
            if self.moved_from is not None:
                out["moved_from"] = self.moved_from
            return out
        out = {
            "path": self.path,
            "rev": self.rev,
            "deleted": False,
            "kind": FILE,
            "hash": self.hash,
            "size": self.size,
            "chunks": [c.to_json() for c in self.chunks],
            "executable": self.executable,
            "mtime_ns": self.mtime_ns,
            "origin": self.origin,
        }
        if self.moved_from is not None:
            out["moved_from"] = self.moved_from
        return out

    @classmethod
    def from_json(cls, data: object) -> FileEntry:
        if not isinstance(data, dict):
            raise ProtocolError("a file entry is a JSON object")
        path = check_path(data.get("path"))  # type: ignore[arg-type]
        rev = _int(data, "rev", minimum=1)
        origin = data.get("origin", "")
        if not isinstance(origin, str):
            raise ProtocolError("'origin' must be a string")
        if _bool(data, "deleted"):
            return cls(path=path, rev=rev, deleted=True, origin=origin)
        moved_from = data.get("moved_from")
        if moved_from is not None:
            moved_from = check_path(moved_from)
        if _kind(data) == DIR:
            return cls(path=path, rev=rev, kind=DIR, origin=origin, moved_from=moved_from)
        hash, size, chunks = _content(data)
        return cls(
            path=path,
            rev=rev,
            hash=hash,
            size=size,
            chunks=chunks,
            executable=_bool(data, "executable"),
            mtime_ns=_int(data, "mtime_ns"),
            origin=origin,
            moved_from=moved_from,
        )


@dataclass(frozen=True, slots=True)
class CommitRequest:
    """`POST /commit`: make *path* hold this content (or a tombstone), if it is still at `base_rev`.

    `base_rev` 0 means "I believe the path does not exist (or is deleted)".
    """

    path: str
    base_rev: int
    deleted: bool = False
    kind: str = FILE
    hash: str = ""
    size: int = 0
    chunks: tuple[Chunk, ...] = ()
    executable: bool = False
    mtime_ns: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "base_rev": self.base_rev}
        if self.deleted:
            out["deleted"] = True
        elif self.kind == DIR:
            out["kind"] = DIR
        else:
            out.update(
                hash=self.hash,
                size=self.size,
                chunks=[c.to_json() for c in self.chunks],
                executable=self.executable,
                mtime_ns=self.mtime_ns,
            )
        return out

    @classmethod
    def from_json(cls, data: object) -> CommitRequest:
        if not isinstance(data, dict):
            raise ProtocolError("a commit is a JSON object")
        path = check_path(data.get("path"))  # type: ignore[arg-type]
        base_rev = _int(data, "base_rev")
        if _bool(data, "deleted"):
            return cls(path=path, base_rev=base_rev, deleted=True)
        if _kind(data) == DIR:
            return cls(path=path, base_rev=base_rev, kind=DIR)
        chunks = _chunks(data)
        size = _size(data, chunks)
        return cls(
            path=path,
            base_rev=base_rev,
            hash=check_hash(data.get("hash")),
            size=size,
            chunks=chunks,
            executable=_bool(data, "executable"),
            mtime_ns=_int(data, "mtime_ns"),
        )


@dataclass(frozen=True, slots=True)
class MoveRequest:
    """`POST /move`: folder *source* and everything below it now live at *target*, if the
    server's live entries there are still exactly *expect*: each path relative to *source*
    ("" for the folder itself) with its revision."""

    source: str
    target: str
    expect: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "expect": self.expect}

    @classmethod
    def from_json(cls, data: object) -> MoveRequest:
        if not isinstance(data, dict):
            raise ProtocolError("a move is a JSON object")
        source = check_path(data.get("from"))  # type: ignore[arg-type]
        target = check_path(data.get("to"))  # type: ignore[arg-type]
        if target == source or target.startswith(source + "/"):
            raise ProtocolError("a folder cannot move into itself")
        expect = data.get("expect")
        if not isinstance(expect, dict) or not 0 < len(expect) <= MAX_MOVE or "" not in expect:
            raise ProtocolError(
                f"'expect' must map the folder (\"\") and up to {MAX_MOVE} paths below it to"
                " their revisions"
            )
        for rel in expect:
            if rel:
                check_path(f"{target}/{check_path(rel)}")  # the new path must be valid too
        revs = {rel: _int(expect, rel, minimum=1) for rel in expect}
        return cls(source=source, target=target, expect=revs)


@dataclass(frozen=True, slots=True)
class Incoming:
    """A file version a client has started to upload (`POST /announce`, then `event: incoming`).

    Not a change: nothing is committed, and the upload may never finish. Other clients may fetch
    its chunks ahead of the commit, into a partial file of their own; only the commit's `change`
    event makes them place it.

    Either the whole version at once (no `upload`), or one step of it: the chunks its uploader
    cut from `offset` on, under an `upload` id of the uploader's choosing. The last step carries
    the version's `hash` (and maybe no chunks); until then `hash` is None.
    """

    path: str
    hash: str | None
    size: int
    chunks: tuple[Chunk, ...]
    origin: str = ""
    upload: str = ""
    offset: int = 0

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "path": self.path,
            "size": self.size,
            "chunks": [c.to_json() for c in self.chunks],
            "origin": self.origin,
        }
        if self.hash is not None:
            data["hash"] = self.hash
        if self.upload:
            data["upload"] = self.upload
            data["offset"] = self.offset
        return data

    @classmethod
    def from_json(cls, data: object) -> Incoming:
        if not isinstance(data, dict):
            raise ProtocolError("an announcement is a JSON object")
        path = check_path(data.get("path"))  # type: ignore[arg-type]
        origin = data.get("origin", "")
        if not isinstance(origin, str) or len(origin) > MAX_NAME_LEN:
            raise ProtocolError("'origin' must be a client name")
        if "upload" in data:
            return cls._step(path, origin, data)
        if not isinstance(data.get("chunks"), list) or not data["chunks"]:
            raise ProtocolError("'chunks' must not be empty")
        hash, size, chunks = _content(data, most=MAX_ANNOUNCED_CHUNKS)
        return cls(path, hash, size, chunks, origin)

    @classmethod
    def _step(cls, path: str, origin: str, data: dict[str, Any]) -> Incoming:
        upload = data["upload"]
        if not isinstance(upload, str) or not _UPLOAD_ID.fullmatch(upload):
            raise ProtocolError("'upload' must be 32 hex digits")
        chunks = _chunks(data, most=MAX_STEP_CHUNKS)
        offset, size = _int(data, "offset"), _int(data, "size")
        end = offset + sum(c.size for c in chunks)
        hash = None if data.get("hash") is None else check_hash(data["hash"])
        if end > size or (hash is not None and end != size):
            raise ProtocolError("a step's chunks must lie within 'size', the last reach it")
        if chunks and end < size and chunks[-1].size < CDC_MIN:
            raise ProtocolError(f"every chunk but the file's last must be at least {CDC_MIN} bytes")
        if not chunks and hash is None:
            raise ProtocolError("a step has chunks, or the hash that ends the announcement")
        return cls(path, hash, size, chunks, origin, upload, offset)

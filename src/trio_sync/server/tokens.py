"""Client tokens: one per client, named, stored hashed, added and revoked while the server runs.

The store is a small SQLite file in the data dir (`tokens.db`), apart from the sync metadata: the
`trio-sync token` commands open it from their own process, and the server notices their commits
through `PRAGMA data_version` within a poll interval. Only SHA-256 digests of tokens are kept; a
token is 256 random bits, so a fast hash is enough, and it is shown once, when created.

A *shared* token is the setup from before tokens had names: one token for every client, whose
name then comes from the client's own header, as it did. A token file from that time is taken in
as the shared token on first start, so an upgrade locks nobody out.

Blocking: the server calls these through a thread.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import StoreError
from ..protocol.models import check_name

TOKENS_DB = "tokens.db"
#: The plain-text token file of servers before named tokens (taken in, then removed).
LEGACY_TOKEN_FILE = "token"
SHARED = "shared"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    last_seen REAL,
    last_from TEXT,
    shared INTEGER NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True, slots=True)
class TokenInfo:
    name: str
    created: float
    last_seen: float | None = None
    last_from: str | None = None
    #: The client's name comes from its header, not from the token (see the module docstring).
    shared: bool = False


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    # The prefix: a token never starts with "-" (which a command line would read as an
    # option), and secret scanners can recognise one.
    return "tsync_" + secrets.token_urlsafe(32)


class TokenStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @classmethod
    def open(cls, data_dir: Path) -> TokenStore:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = data_dir / TOKENS_DB
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)  # private from the start
        os.close(fd)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        return cls(conn)

    def close(self) -> None:
        self._conn.close()

    def add(self, name: str, token: str | None = None, *, shared: bool = False) -> str:
        """Add a token for client *name* (a new random one unless *token* is given); returns
        it. StoreError if *name* has one already."""
        check_name(name)
        token = token or new_token()
        try:
            self._conn.execute(
                "INSERT INTO tokens (name, digest, created, shared) VALUES (?, ?, ?, ?)",
                (name, digest(token), time.time(), int(shared)),
            )
        except sqlite3.IntegrityError:
            raise StoreError(f"a token named {name!r} exists already (revoke it first)") from None
        return token

    def revoke(self, name: str) -> bool:
        return self._conn.execute("DELETE FROM tokens WHERE name = ?", (name,)).rowcount > 0

    def list(self) -> list[TokenInfo]:
        rows = self._conn.execute(
            "SELECT name, created, last_seen, last_from, shared FROM tokens ORDER BY name"
        )
        return [TokenInfo(n, c, s, f, bool(sh)) for n, c, s, f, sh in rows]

    def by_digest(self) -> dict[str, TokenInfo]:
        rows = self._conn.execute(
            "SELECT digest, name, created, last_seen, last_from, shared FROM tokens"
        )
        return {d: TokenInfo(n, c, s, f, bool(sh)) for d, n, c, s, f, sh in rows}

    def version(self) -> int:
        """Changes when another connection (a `trio-sync token` command) commits."""
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def seen(self, visits: dict[str, tuple[float, str]]) -> None:
        """Record when and from where each named client was last seen."""
        with self._conn:
            self._conn.executemany(
                "UPDATE tokens SET last_seen = ?, last_from = ? WHERE name = ?",
                [(when, where, name) for name, (when, where) in visits.items()],
            )

    def take_in_legacy(self, data_dir: Path) -> bool:
        """Make a plain-text token file of an older server the shared token, then remove the
        file. True if there was one."""
        path = data_dir / LEGACY_TOKEN_FILE
        try:
            token = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return False
        if token and digest(token) not in self.by_digest():
            self.revoke(SHARED)
            self.add(SHARED, token, shared=True)
        path.unlink()
        return True

"""Who is asking: bearer tokens checked against the token store, failures limited per address,
and the event streams of a revoked token ended.

The token store (server/tokens.py) may change under a running server (`trio-sync token add` and
`revoke` commit from their own process): `watch` polls it and takes in each change within
POLL_SECONDS, ending the streams of every token that went away.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import trio

from .refusals import Refusal
from .tokens import SHARED, TokenInfo, TokenStore, digest

log = logging.getLogger("trio_sync.server")

#: How often the token store is checked for changes, and how often last-seen times are saved.
POLL_SECONDS = 0.5
SAVE_SEEN_SECONDS = 1.0
#: Failed attempts an address may make within FAILURE_WINDOW seconds before it gets 429.
FAILURES_ALLOWED = 10
FAILURE_WINDOW = 60.0
#: Event streams one token may hold open at once.
STREAMS_PER_TOKEN = 8
#: The status page's session: a cookie holding a random id, never the token.
SESSION_COOKIE = "tsync_session"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1000


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class Authenticator:
    def __init__(self, store: TokenStore | None, shared_token: str | None = None) -> None:
        """*shared_token*: one given on the command line or in the environment, for every
        client (kept in memory only)."""
        self._store = store
        self._shared = shared_token
        self._tokens: dict[str, TokenInfo] = {}
        self._version = -1
        self._limiter = trio.CapacityLimiter(1)  # one SQLite connection, one thread at a time
        self._failures: defaultdict[str, deque[float]] = defaultdict(deque)
        self._seen: dict[str, tuple[float, str]] = {}
        #: Token name -> its open event streams.
        self._streams: defaultdict[str, set[Stream]] = defaultdict(set)
        #: Session id -> (the token's digest, or None for the shared token; expiry, Trio time).
        self._sessions: dict[str, tuple[str | None, float]] = {}

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(partial(fn, *args), limiter=self._limiter)

    async def reload(self) -> None:
        """Take in the token store as it is now; end the streams of tokens that went away."""
        if self._store is None:
            return
        version = await self._call(self._store.version)
        if version == self._version:
            return
        self._tokens = await self._call(self._store.by_digest)
        self._version = version
        names = {info.name for info in self._tokens.values()}
        for name, streams in self._streams.items():
            if name not in names and not (name == SHARED and self._shared):
                for stream in streams:
                    stream.revoke()

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep up with the token store (run in the server's nursery)."""
        await self.reload()
        task_status.started()
        saved = trio.current_time()
        while True:
            await trio.sleep(POLL_SECONDS)
            await self.reload()
            self._forget_old_failures()
            if self._seen and trio.current_time() - saved >= SAVE_SEEN_SECONDS:
                await self.save_seen()
                saved = trio.current_time()

    async def save_seen(self) -> None:
        if self._store is not None and self._seen:
            seen, self._seen = self._seen, {}
            await self._call(self._store.seen, seen)

    async def admit(
        self, address: str, header: str | None, session: str | None = None
    ) -> TokenInfo | Refusal:
        """Who a request comes from, by its Authorization *header* (or, for reading the status
        page, its *session* cookie), or how it is refused. Every route passes here."""
        wait = self.retry_after(address)
        if wait is not None:
            retry = {"Retry-After": str(math.ceil(wait))}
            return Refusal(429, "too_many_failures", "too many wrong tokens; wait", headers=retry)
        info = self.identify(header)
        if info is None and header is None:
            info = self.by_session(session)
        if info is None and header is not None:
            await self.reload()  # perhaps a token added a moment ago: look at the store again
            info = self.identify(header)
        if info is None:
            self.failed(address)
            challenge = {"WWW-Authenticate": 'Bearer realm="trio-sync"'}
            return Refusal(401, "unauthorized", "missing or wrong bearer token", headers=challenge)
        self.saw(info.name, address)
        return info

    def identify(self, header: str | None) -> TokenInfo | None:
        """The client a request's Authorization header names, or None."""
        token = bearer(header)
        if token is None:
            return None
        if self._shared is not None and hmac.compare_digest(
            token.encode("utf-8"), self._shared.encode("utf-8")
        ):
            return TokenInfo(SHARED, 0.0, shared=True)
        # A dictionary look-up of the digest: what it could leak by its timing is the digest,
        # from which the token cannot be found.
        return self._tokens.get(digest(token))

    def open_session(self, token: str) -> str | None:
        """A new session id for the status page if *token* is valid, else None. The session
        holds the token's digest: a revoked token ends its sessions too."""
        info = self.identify(f"Bearer {token}")
        if info is None:
            return None
        while len(self._sessions) >= MAX_SESSIONS:  # oldest first: dicts keep insertion order
            del self._sessions[next(iter(self._sessions))]
        session = secrets.token_urlsafe(32)
        kept = None if info.shared else digest(token)
        self._sessions[session] = (kept, trio.current_time() + SESSION_SECONDS)
        return session

    def by_session(self, session: str | None) -> TokenInfo | None:
        if not session or (found := self._sessions.get(session)) is None:
            return None
        kept, expires = found
        if trio.current_time() >= expires:
            del self._sessions[session]
            return None
        if kept is None:
            return TokenInfo(SHARED, 0.0, shared=True) if self._shared else None
        return self._tokens.get(kept)

    def close_session(self, session: str | None) -> None:
        if session:
            self._sessions.pop(session, None)

    def saw(self, name: str, address: str) -> None:
        self._seen[name] = (time.time(), address)

    def retry_after(self, address: str) -> float | None:
        """Seconds *address* must wait before it may try again, or None if it may now."""
        failures = self._failures.get(address)
        if not failures:
            return None
        now = trio.current_time()
        while failures and failures[0] <= now - FAILURE_WINDOW:
            failures.popleft()
        if len(failures) < FAILURES_ALLOWED:
            if not failures:
                del self._failures[address]
            return None
        return failures[0] + FAILURE_WINDOW - now

    def _forget_old_failures(self) -> None:
        """Drop addresses whose last failure is out of the window: many addresses (IPv6 gives a
        peer plenty) must not grow this for ever."""
        cutoff = trio.current_time() - FAILURE_WINDOW
        for address in [a for a, times in self._failures.items() if times[-1] <= cutoff]:
            del self._failures[address]

    def failed(self, address: str) -> None:
        self._failures[address].append(trio.current_time())
        count = len(self._failures[address])
        if count <= FAILURES_ALLOWED:
            log.warning("rejected a request with a missing or wrong token from %s", address)
        if count == FAILURES_ALLOWED:
            log.warning("%s: too many wrong tokens; refusing it for a while", address)

    def full(self, info: TokenInfo, client: str) -> bool:
        """Whether *client* (with *info*'s token) holds its share of event streams already."""
        return sum(1 for s in self._streams[info.name] if s.client == client) >= (STREAMS_PER_TOKEN)

    @contextmanager
    def stream(self, info: TokenInfo, client: str) -> Iterator[Stream]:
        """Register one event stream of *client*; it is told if its token is revoked."""
        stream = Stream(client)
        if self._store is not None and self._revoked(info):
            stream.revoke()
        streams = self._streams[info.name]
        streams.add(stream)
        try:
            yield stream
        finally:
            streams.discard(stream)
            if not streams:
                del self._streams[info.name]

    def _revoked(self, info: TokenInfo) -> bool:
        if info.shared and info.name == SHARED and self._shared is not None:
            return False
        return all(known.name != info.name for known in self._tokens.values())


class Stream:
    """One event stream: a response body that waits, and must end if its token is revoked."""

    def __init__(self, client: str) -> None:
        self.client = client
        self.revoked = False
        self._scope: trio.CancelScope | None = None

    def revoke(self) -> None:
        self.revoked = True
        if self._scope is not None:
            self._scope.cancel()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Wrap each wait of the stream: a revocation ends it at once. A scope per wait, never
        across a `yield` of the body, so that it never cancels the server's own sending."""
        with trio.CancelScope() as self._scope:
            if self.revoked:
                self._scope.cancel()
            yield
        self._scope = None

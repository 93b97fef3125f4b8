"""The server as the client sees it: one httpx client, every endpoint of docs/protocol.md, and the
one place where httpx errors and HTTP status codes become our exceptions."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing, asynccontextmanager
from typing import Any, NoReturn, TypeVar, cast

import httpcore
import httpx
import trio

from ..config import ClientConfig
from ..core.tls import client_context, pinned_context
from ..errors import (
    AuthenticationFailed,
    ChunksMissing,
    Conflict,
    InvalidPath,
    ProtocolError,
    RejectedByServer,
    RemoteError,
    ServerNotTrusted,
    ServerUnavailable,
)
from ..protocol.frames import MEDIA_TYPE, MISSING, Frame, FrameParser, frame_header
from ..protocol.models import (
    CLIENT_HEADER,
    MAX_HASHES_PER_QUERY,
    CommitRequest,
    FileEntry,
    Incoming,
    MoveRequest,
    check_hash,
)
from ..protocol.sse import ServerSentEvent, SSEParser
from .network import use_gathering_reads

#: httpcore reads a response 64 KiB at a time and each read costs a trip through h11; chunk
#: downloads are megabytes. A class attribute, not a setting: without it this is a no-op.
READ_SIZE = 2**20
if isinstance(getattr(httpcore.AsyncHTTP11Connection, "READ_NUM_BYTES", None), int):
    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = READ_SIZE
#: Small chunk frames in an upload are joined into writes of about this many bytes.
WRITE_SIZE = 256 * 1024
T = TypeVar("T")


def _unavailable(method: str, url: str, error: httpx.TransportError) -> RemoteError:
    """A transport error as ours: an outage to retry, unless the server could not be verified,
    which no retry mends."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return ServerNotTrusted(f"cannot verify the server's certificate: {cause}")
        cause = cause.__cause__ or cause.__context__
    return ServerUnavailable(f"{method} {url}: {error!r}")


def _closing(iterator: AsyncIterator[T]) -> aclosing[AsyncGenerator[T, None]]:
    """httpx's body iterators are async generators typed as iterators; close them promptly."""
    return aclosing(cast(AsyncGenerator[T, None], iterator))


class Remote:
    def __init__(
        self,
        base_url: str,
        token: str,
        name: str,
        *,
        stream_idle_timeout: float = 45.0,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        """*verify*: how an https server is verified (core/tls.py)."""
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            verify=verify,
            headers={
                "Authorization": f"Bearer {token}",
                CLIENT_HEADER: name,
                "User-Agent": "trio-sync",
            },
            timeout=httpx.Timeout(60.0, connect=10.0),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        )
        use_gathering_reads(self._client)
        self._stream_timeout = httpx.Timeout(10.0, read=stream_idle_timeout)

    async def __aenter__(self) -> Remote:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, url, **kwargs)
        except httpx.TransportError as e:
            raise _unavailable(method, url, e) from e
        if response.status_code >= 300:
            _raise_for_status(response)
        return response

    @asynccontextmanager
    async def _stream(
        self, method: str, url: str, **kwargs: Any
    ) -> AsyncIterator[AsyncGenerator[bytes, None]]:
        """A streamed request: status checked, the raw body as pieces, transport errors (also
        those raised while reading) mapped to ServerUnavailable."""
        try:
            async with self._client.stream(method, url, **kwargs) as response:
                if response.status_code >= 300:
                    await response.aread()
                    _raise_for_status(response)
                async with _closing(response.aiter_raw()) as pieces:
                    yield pieces
        except httpx.TransportError as e:
            raise _unavailable(method, url, e) from e

    async def info(self) -> dict[str, Any]:
        data = _json((await self._request("GET", "/info")).content)
        if not isinstance(data, dict) or not isinstance(data.get("server_id"), str):
            raise ProtocolError("/info: no server_id")
        return data

    async def history(self, path: str) -> dict[str, Any]:
        """`GET /history`: the kept versions of *path* newest first (`versions`), and for a
        folder the paths below it whose last version is a deletion (`deleted_below`)."""
        data = _json((await self._request("GET", "/history", params={"path": path})).content)
        if not isinstance(data, dict) or not isinstance(data.get("versions"), list):
            raise ProtocolError("/history: no list of versions")
        return data

    async def restore(
        self, path: str, *, rev: int | None, before: float | None, to: str | None
    ) -> dict[str, Any]:
        """`POST /restore`: bring back version *rev* of *path*, or *path* and everything below
        it as it was at *before* (a Unix time), as new changes (at *to* if given)."""
        body: dict[str, Any] = {"path": path, "rev": rev, "before": before, "to": to}
        data = _json((await self._request("POST", "/restore", json=body)).content)
        if not isinstance(data, dict) or not isinstance(data.get("restored"), list):
            raise ProtocolError("/restore: no list of what was restored")
        return data

    async def list_files(self) -> tuple[str, int, dict[str, FileEntry]]:
        """Every live file on the server: (server_id, rev the listing starts from, entries)."""
        entries: dict[str, FileEntry] = {}
        header: dict[str, Any] | None = None

        def take(line: bytes) -> None:
            nonlocal header
            if not line.strip():
                return
            data = _json(line)
            if header is None:
                header = _object(data, "/files header")
            else:
                entry = _entry(data)
                entries[entry.path] = entry

        pending = b""
        async with self._stream("GET", "/files") as pieces:
            async for piece in pieces:
                *lines, pending = (pending + piece).split(b"\n")
                for line in lines:
                    take(line)
        take(pending)
        if header is None or not isinstance(header.get("rev"), int):
            raise ProtocolError("/files: missing header line")
        if not isinstance(header.get("server_id"), str):
            raise ProtocolError("/files: no server_id in the header line")
        return header["server_id"], header["rev"], entries

    async def missing(self, hashes: Iterable[str]) -> set[str]:
        wanted = list(dict.fromkeys(hashes))
        missing: set[str] = set()
        for i in range(0, len(wanted), MAX_HASHES_PER_QUERY):
            batch = wanted[i : i + MAX_HASHES_PER_QUERY]
            response = await self._request("POST", "/chunks/missing", json={"hashes": batch})
            listed = _object(_json(response.content), "/chunks/missing").get("missing")
            if not isinstance(listed, list):
                raise ProtocolError("/chunks/missing: 'missing' must be a list")
            missing.update(check_hash(h) for h in listed)
        return missing

    async def put_chunks(self, frames: list[Frame]) -> tuple[set[str], set[str]]:
        """Upload a batch of chunk frames; returns (stored, rejected) hashes. A chunk is rejected
        when its bytes do not match its hash: the file changed after it was hashed."""
        size = sum(
            len(frame_header(f.hash, f.encoding, len(f.payload))) + len(f.payload) for f in frames
        )
        body = _FrameBody(frames)
        del frames
        response = await self._request(
            "POST", "/chunks", content=body,
            headers={"Content-Type": MEDIA_TYPE, "Content-Length": str(size)},
        )  # fmt: skip
        data = _object(_json(response.content), "/chunks")
        stored, rejected = data.get("stored"), data.get("rejected")
        if not isinstance(stored, list) or not isinstance(rejected, list):
            raise ProtocolError("/chunks: 'stored' and 'rejected' must be lists")
        return {check_hash(h) for h in stored}, {check_hash(h) for h in rejected}

    async def fetch_chunks(
        self,
        hashes: list[str],
        on_frame: Callable[[Frame], Awaitable[None]],
        *,
        compress: bool,
        wait: float = 0.0,
    ) -> None:
        """Stream the named chunks; *on_frame* gets each as it arrives (the caller verifies).
        With *wait*, the server waits up to that many seconds for chunks still on their way
        to it before it calls them missing."""
        parser = FrameParser()
        body: dict[str, Any] = {"hashes": hashes, "compress": compress}
        if wait:
            body["wait"] = wait
        async with self._stream("POST", "/chunks/fetch", json=body) as pieces:
            async for piece in pieces:
                for frame in parser.feed(piece):
                    await on_frame(frame)
        parser.close()

    async def announce(self, incoming: Incoming) -> None:
        """Tell the other clients that this file's upload starts now."""
        await self._request("POST", "/announce", json=incoming.to_json())

    async def commit_many(self, requests: list[CommitRequest]) -> list[FileEntry | RemoteError]:
        """Commit a batch; each result is the new entry or the error for that one change."""
        body = {"commits": [r.to_json() for r in requests]}
        response = await self._request("POST", "/commits", json=body)
        results = _object(_json(response.content), "/commits").get("results")
        if not isinstance(results, list) or len(results) != len(requests):
            raise ProtocolError("/commits: one result per commit expected")
        return [_commit_result(r) for r in results]

    async def move(self, request: MoveRequest) -> list[FileEntry]:
        """Move a folder on the server (`POST /move`); the versions it made, in order. Raises
        Conflict when the server's folder is not the one expected or the target is taken."""
        response = await self._request("POST", "/move", json=request.to_json())
        entries = _object(_json(response.content), "/move").get("entries")
        if not isinstance(entries, list) or not entries:
            raise ProtocolError("/move: a list of entries expected")
        return [_entry(e) for e in entries]

    async def listen(
        self, cursor: int, on_event: Callable[[ServerSentEvent], Awaitable[None]]
    ) -> None:
        """Follow `/sync` from *cursor* until the stream ends (then raises ServerUnavailable)."""
        parser = SSEParser()
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(cursor)}
        async with self._stream(
            "GET", "/sync", headers=headers, timeout=self._stream_timeout
        ) as pieces:
            async for piece in pieces:
                for event in parser.feed(piece):
                    await on_event(event)
        raise ServerUnavailable("the server closed the event stream")


class _FrameBody:
    """Chunk frames as a request body, each frame let go of once sent, so memory does not grow
    with the batch. Small frames are joined into writes of about WRITE_SIZE (a write costs as
    much as a few KiB of data); a large payload is sent as it is, after its header."""

    def __init__(self, frames: list[Frame]) -> None:
        self._frames = frames
        self._next = 0
        self._large: bytes | None = None

    def __aiter__(self) -> _FrameBody:
        return self

    async def __anext__(self) -> bytes:
        if self._large is not None:
            large, self._large = self._large, None
            return large
        pieces: list[bytes] = []
        size = 0
        while self._next < len(self._frames) and size < WRITE_SIZE:
            frame = self._frames[self._next]
            self._frames[self._next] = _SENT
            self._next += 1
            pieces.append(frame_header(frame.hash, frame.encoding, len(frame.payload)))
            if len(frame.payload) >= WRITE_SIZE:
                self._large = frame.payload
                break
            pieces.append(frame.payload)
            size += len(frame.payload)
        if not pieces:
            raise StopAsyncIteration
        return b"".join(pieces)


_SENT = Frame("0" * 64, MISSING, b"")


def _commit_result(data: object) -> FileEntry | RemoteError:
    if not isinstance(data, dict):
        raise ProtocolError("/commits: a result is a JSON object")
    if "entry" in data:
        return _entry(data["entry"])
    return _error_from(data, 0)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ProtocolError(f"server sent invalid JSON: {raw[:200]!r}") from None


def _object(data: object, where: str) -> dict[str, Any]:
    """*data* if it is a JSON object: a server's answer of any other shape is a ProtocolError
    (the client reconnects), never an AttributeError that ends it."""
    if not isinstance(data, dict):
        raise ProtocolError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def _entry(data: object) -> FileEntry:
    try:
        return FileEntry.from_json(data)
    except InvalidPath as e:
        raise ProtocolError(f"server sent an unsafe path: {e}") from None


def _raise_for_status(response: httpx.Response) -> NoReturn:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if status == 401:
        raise AuthenticationFailed("the server rejected our token (401)")
    if status >= 500:
        raise ServerUnavailable(
            f"server error {status}: {body.get('message') or response.reason_phrase}"
        )
    if "message" not in body:
        body["message"] = response.reason_phrase
    raise _error_from(body, status)


def _error_from(body: dict[str, Any], status: int) -> RemoteError:
    """The error a refusal stands for, from its JSON body (the same in /commit and /commits)."""
    error = body.get("error")
    if error == "conflict":
        current = body.get("current")
        entry = _entry(current) if current else None
        blocking = _entry(body["blocking"]) if body.get("blocking") else None
        reason = str(body.get("reason", "stale"))
        return Conflict(entry.path if entry else "?", entry, reason=reason, blocking=blocking)
    if error == "chunks_missing":
        listed = body.get("missing") or []
        if not isinstance(listed, list):
            raise ProtocolError("chunks_missing: 'missing' must be a list")
        return ChunksMissing([check_hash(h) for h in listed])
    return RejectedByServer(status or 422, str(body.get("message") or error))


@asynccontextmanager
async def connect(config: ClientConfig) -> AsyncIterator[Remote]:
    """A Remote for *config*'s server, verified as the config says (core/tls.py) before the
    token is sent."""
    verify: ssl.SSLContext | bool = True
    if config.server_url.startswith("https:"):
        if config.fingerprint is not None:
            try:  # verified before anything is sent: the token never meets an impostor
                verify = await pinned_context(config.server_url, config.fingerprint)
            except (OSError, trio.TooSlowError) as e:
                raise ServerUnavailable(f"cannot reach {config.server_url}: {e!r}") from e
        else:
            verify = await trio.to_thread.run_sync(client_context, config.ca_cert)
    async with Remote(
        config.server_url,
        config.token,
        config.name,
        stream_idle_timeout=config.stream_idle_timeout,
        verify=verify,
    ) as remote:
        yield remote

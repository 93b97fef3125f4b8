"""HTTP routes: each validates its input, calls the stores, and shapes the answer; nothing else.

The contract is docs/protocol.md.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import trio
from hypercorn.typing import ASGIFramework
from quart import Response, current_app, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .. import __version__ as VERSION
from ..core.compression import pack
from ..core.offload import Offload
from ..errors import Conflict, InvalidPath, ProtocolError, StoreError
from ..protocol.frames import MEDIA_TYPE, MISSING, RAW, frame_header
from ..protocol.models import (
    CHUNKER,
    CLIENT_HEADER,
    DIR,
    MAX_CHUNK_SIZE,
    MAX_COMMITS,
    MAX_FETCH,
    MAX_FETCH_WAIT,
    MAX_HASHES_PER_QUERY,
    MAX_INT,
    CommitRequest,
    FileEntry,
    Incoming,
    MoveRequest,
    check_hash,
    check_name,
)
from ..protocol.paths import check_path
from ..protocol.sse import format_comment, format_event
from . import page as page_files
from .auth import SESSION_COOKIE, SESSION_SECONDS, Authenticator, Stream
from .bodies import MAX_BODY, paced
from .hub import ChangeHub, EventPages
from .intake import ChunkIntake
from .metrics import CLIENT_KEY, Traffic, logged_name
from .prometheus import CONTENT_TYPE as PROMETHEUS_CONTENT_TYPE
from .prometheus import ServerMetrics
from .refusals import Refusal, refusal_for
from .store import BlobStore, Kept, MetaStore
from .tokens import TokenInfo

log = logging.getLogger("trio_sync.server")

LIST_PAGE = 1000
EVENT_PAGE = 500
#: Versions (or deleted paths) one `GET /history` answers with at most.
HISTORY_LIMIT = 10_000
#: What anyone may ask for without a token: the status page's shell, and its login.
PUBLIC = {("GET", "/"), ("GET", "/page.js"), ("GET", "/page.css"), ("POST", "/login"),
          ("POST", "/logout")}  # fmt: skip
STORAGE_CACHE_SECONDS = 10.0
#: Paths one `POST /restore` brings back at most.
MAX_RESTORE = 100_000
#: Streamed frames are gathered into writes of about this many bytes.
WRITE_SIZE = 256 * 1024
#: Chunks read from the store in one hand-off to a thread, at most (and at most WRITE_SIZE).
READ_MANY = 64
#: Chunks up to this size are compressed on the event loop: about 10 µs for 16 KiB, less than
#: handing the call to a thread and back.
PACK_INLINE = 16 * 1024


def _error(status: int, code: str, message: str, **extra: Any) -> Response:
    body = json.dumps({"error": code, "message": message, **extra})
    return Response(body, status=status, mimetype="application/json")


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


def _refused(refusal: Refusal) -> Response:
    response = Response(refusal.body(), status=refusal.status, mimetype="application/json")
    response.headers.update(refusal.headers)
    return response


def _body() -> AsyncGenerator[bytes, None]:
    """The request body, piece by piece as it arrives, within MAX_BODY and its pace."""
    return paced(aiter(request.body), current_app.config["BODY_GRACE"])


async def _json_body() -> Any:
    async with aclosing(_body()) as body:
        raw = b"".join([piece async for piece in body])
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: `[` nested deep
        raise ProtocolError("request body is not valid JSON") from None


def _what(entry: FileEntry) -> str:
    if entry.deleted:
        return "deleted"
    return "folder" if entry.kind == DIR else f"{entry.size} bytes"


def _client_name() -> str:
    """The client's name: its token's, or with the shared token the one its header gives."""
    info: TokenInfo = g.client
    if not info.shared:
        return info.name
    raw = request.headers.get(CLIENT_HEADER)
    if raw is None:
        return "unknown"
    return check_name(raw)


def _path_arg(raw: object) -> str:
    """A path argument: a wire path, or "" for the whole tree."""
    if raw == "":
        return ""
    if not isinstance(raw, str):
        raise ProtocolError("'path' must be a string")
    return check_path(raw)


def _limit_arg() -> int:
    raw = request.args.get("limit", str(HISTORY_LIMIT))
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) <= HISTORY_LIMIT:
        raise ProtocolError(f"limit must be 1 to {HISTORY_LIMIT}")
    return int(raw)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_INT


def _kept(kept: Kept) -> dict[str, Any]:
    record = {**kept.entry.to_json(), "committed_at": kept.committed_at}
    if kept.renamed is not None:
        record["renamed_to" if kept.entry.deleted else "renamed_from"] = kept.renamed
    return record


def _same(a: FileEntry, b: FileEntry) -> bool:
    return (a.kind, a.hash, a.executable) == (b.kind, b.hash, b.executable)


def _static(text: str, mimetype: str) -> Response:
    response = Response(text, mimetype=mimetype)
    response.headers["Content-Security-Policy"] = page_files.CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"
    return response


def _cursor() -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.args.get("cursor")
    if raw is None or raw == "":
        return None
    # isascii: str.isdigit also takes "²" and Arabic-Indic digits.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > MAX_INT:
        raise ProtocolError(f"cursor must be a non-negative integer: {raw!r}")
    return int(raw)


def create_app(
    meta: MetaStore,
    blobs: BlobStore,
    hub: ChangeHub,
    auth: Authenticator,
    *,
    server_id: str,
    keepalive: float = 15.0,
    body_grace: float = 30.0,
    traffic: Traffic | None = None,
    commit_lock: trio.Lock | None = None,
    offload: Offload,
    history_days: float = 30.0,
) -> ASGIFramework:
    """The app; *offload* runs (de)compression of chunks, inside its `running()` block."""
    app = QuartTrio("trio_sync")
    cpu = offload.run_sync
    # Checking that a commit's chunks exist and recording the commit is one step for the
    # garbage collector, which takes the same lock (see server/gc.py).
    lock = commit_lock if commit_lock is not None else trio.Lock()
    pages = EventPages(lambda rev: meta.changes_since(rev, EVENT_PAGE))
    prometheus = ServerMetrics(traffic, hub)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["BODY_TIMEOUT"] = 120
    app.config["BODY_GRACE"] = body_grace
    app.config["RESPONSE_TIMEOUT"] = 300

    @app.before_request
    async def authenticate() -> Response | None:
        address = request.remote_addr or "unknown"
        if (request.method, request.path) in PUBLIC and auth.retry_after(address) is None:
            return None  # the page's shell holds no data; /login checks its token itself
        # The status page reads with a session cookie (SameSite=Strict besides), nothing else.
        session = request.cookies.get(SESSION_COOKIE) if request.method == "GET" else None
        info = await auth.admit(address, request.headers.get("Authorization"), session)
        if isinstance(info, Refusal):
            return _refused(info)
        g.client = info
        name = logged_name(info.name, info.shared, request.headers.get(CLIENT_HEADER))
        request.scope[CLIENT_KEY] = name  # type: ignore[literal-required]
        return None

    @app.errorhandler(InvalidPath)
    @app.errorhandler(ProtocolError)
    @app.errorhandler(StoreError)
    @app.errorhandler(OSError)
    @app.errorhandler(sqlite3.OperationalError)
    @app.errorhandler(HTTPException)
    async def refuse(error: Exception) -> Response:
        refusal = refusal_for(error)
        if refusal is None:
            raise error
        return _refused(refusal)

    @app.get("/info")
    async def info() -> Response:
        return _json(
            {
                "server_id": server_id,
                "rev": hub.latest_rev,
                "clients": sorted(hub.subscribers.values()),
                "chunker": CHUNKER,
                "traffic": traffic.to_json() if traffic else None,
                "you": _client_name(),
            }
        )

    @app.get("/files")
    async def list_files() -> Response:
        latest = hub.latest_rev  # read before listing: later changes reach the client as events

        async def lines() -> AsyncIterator[bytes]:
            yield (json.dumps({"server_id": server_id, "rev": latest}) + "\n").encode()
            after = ""
            while True:
                page = await meta.list_current(after, LIST_PAGE)  # bounded in bytes too
                if not page:
                    return
                for entry in page:
                    yield (json.dumps(entry.to_json()) + "\n").encode()
                after = page[-1].path

        response = Response(lines(), mimetype="application/x-ndjson")
        response.timeout = None
        return response

    @app.post("/chunks/missing")
    async def missing_chunks() -> Response:
        body = await _json_body()
        hashes = body.get("hashes") if isinstance(body, dict) else None
        if not isinstance(hashes, list) or len(hashes) > MAX_HASHES_PER_QUERY:
            raise ProtocolError(f"'hashes' must be a list of at most {MAX_HASHES_PER_QUERY}")
        wanted = list(dict.fromkeys(check_hash(h) for h in hashes))
        return _json({"missing": await blobs.missing(wanted)})

    @app.put("/chunks/<hash>")
    async def put_chunk(hash: str) -> Response:
        check_hash(hash)
        data = await request.get_data(as_text=False)
        assert isinstance(data, bytes)
        if len(data) > MAX_CHUNK_SIZE:
            return _error(413, "too_large", f"a chunk is at most {MAX_CHUNK_SIZE} bytes")
        await blobs.put(hash, data)
        hub.chunks_landed()
        return _json({"stored": hash}, status=201)

    @app.get("/chunks/<hash>")
    async def get_chunk(hash: str) -> Response:
        data = await blobs.get(check_hash(hash))
        if data is None:
            return _error(404, "not_found", f"no chunk {hash}")
        return Response(data, mimetype="application/octet-stream")

    @app.post("/announce")
    async def announce() -> Response:
        """A client starts uploading a file, or has cut more of it: tell the others, who may
        fetch ahead. (Incoming checks the whole form's hash against its chunk list.)"""
        incoming = Incoming.from_json(await _json_body())
        origin = _client_name()
        data = json.dumps({**incoming.to_json(), "origin": origin})
        hub.announce(origin, format_event(data, event="incoming"))
        return _json({"streams": len(hub.subscribers)})

    @app.post("/chunks/fetch")
    async def fetch_chunks() -> Response:
        """The named chunks as a stream of frames, in the order asked for."""
        body = await _json_body()
        hashes = body.get("hashes") if isinstance(body, dict) else None
        if not isinstance(hashes, list) or len(hashes) > MAX_FETCH:
            raise ProtocolError(f"'hashes' must be a list of at most {MAX_FETCH}")
        wanted = [check_hash(h) for h in hashes]
        compress = bool(body.get("compress", False))
        wait = body.get("wait", 0)
        if (
            isinstance(wait, bool)
            or not isinstance(wait, int | float)
            or not 0 <= wait <= MAX_FETCH_WAIT
        ):
            raise ProtocolError(f"'wait' must be 0 to {MAX_FETCH_WAIT} seconds")
        deadline = trio.current_time() + wait

        async def wait_for(hash: str) -> bytes | None:
            """The chunk once it is stored, or None at the deadline or at shutdown."""
            while True:
                landings = hub.landings
                data = await blobs.get(hash)
                if data is not None or trio.current_time() >= deadline or hub.closed:
                    return data
                with trio.move_on_at(deadline):
                    await hub.wait_landed_after(landings)

        async def frames() -> AsyncIterator[bytes]:
            # Small frames go out together: every write costs as much as a few KiB of data.
            pieces: list[bytes] = []
            size = 0
            done = 0
            while done < len(wanted):
                # Small chunks are read together, in one hand-off to a thread.
                found = await blobs.get_some(wanted[done : done + READ_MANY], WRITE_SIZE)
                for hash, data in zip(wanted[done : done + len(found)], found, strict=True):
                    if data is None and trio.current_time() < deadline:
                        # Announced and still being uploaded: send what is ready, wait for
                        # the rest.
                        if pieces:
                            yield b"".join(pieces)
                            pieces.clear()
                            size = 0
                        data = await wait_for(hash)
                    if data is None:
                        pieces.append(frame_header(hash, MISSING, 0))
                    else:
                        encoding, payload = RAW, data
                        if compress and len(data) <= PACK_INLINE:
                            encoding, payload = pack(data)  # quicker than a thread hand-off
                        elif compress:
                            encoding, payload = await cpu(pack, data)
                        pieces += (frame_header(hash, encoding, len(payload)), payload)
                        size += len(payload)
                    if size >= WRITE_SIZE:
                        yield b"".join(pieces)
                        pieces.clear()
                        size = 0
                done += len(found)
            if pieces:
                yield b"".join(pieces)

        response = Response(frames(), mimetype=MEDIA_TYPE)
        response.timeout = None
        return response

    def _conflict(outcome: Conflict) -> dict[str, Any]:
        prometheus.conflicts.labels(outcome.reason).inc()
        current = outcome.current.to_json() if outcome.current else None
        result: dict[str, Any] = {
            "error": "conflict",
            "message": str(outcome),
            "current": current,
            "reason": outcome.reason,
        }
        if outcome.blocking is not None:
            result["blocking"] = outcome.blocking.to_json()
        return result

    async def commit_all(requests: list[CommitRequest]) -> list[dict[str, Any]]:
        origin = _client_name()
        needed = dict.fromkeys(c.hash for r in requests if not r.deleted for c in r.chunks)
        results: list[dict[str, Any] | None] = [None] * len(requests)
        ready: list[int] = []
        async with lock:
            absent = set(await blobs.missing(needed)) if needed else set()
            for i, req in enumerate(requests):
                gone = [c.hash for c in req.chunks if c.hash in absent] if not req.deleted else []
                if gone:
                    results[i] = {
                        "error": "chunks_missing",
                        "message": "upload these chunks first",
                        "missing": list(dict.fromkeys(gone)),
                    }
                else:
                    ready.append(i)
            outcomes = await meta.commit_many([requests[i] for i in ready], origin)
        latest = 0
        for i, outcome in zip(ready, outcomes, strict=True):
            if isinstance(outcome, Conflict):
                results[i] = _conflict(outcome)
            elif isinstance(outcome, StoreError):
                results[i] = {"error": "rejected", "message": str(outcome)}
            else:
                entry, created = outcome
                if created:
                    prometheus.commits.inc()
                    latest = max(latest, entry.rev)
                    log.info("rev %d: %s (%s) from %s", entry.rev, entry.path, _what(entry), origin)
                results[i] = {"entry": entry.to_json()}
        if latest:
            hub.publish(latest)
        return [r for r in results if r is not None]

    @app.post("/commit")
    async def commit() -> Response:
        (result,) = await commit_all([CommitRequest.from_json(await _json_body())])
        error = result.get("error")
        if error == "conflict":
            return _json(result, status=409)
        if error == "chunks_missing" or error == "rejected":
            return _json(result, status=422)
        return _json(result)

    @app.post("/commits")
    async def commits() -> Response:
        body = await _json_body()
        raw = body.get("commits") if isinstance(body, dict) else None
        if not isinstance(raw, list) or not 0 < len(raw) <= MAX_COMMITS:
            raise ProtocolError(f"'commits' must be a list of 1 to {MAX_COMMITS} commits")
        return _json({"results": await commit_all([CommitRequest.from_json(c) for c in raw])})

    @app.post("/move")
    async def move() -> Response:
        request = MoveRequest.from_json(await _json_body())
        origin = _client_name()
        try:
            async with lock:
                entries = await meta.move(request, origin)
        except Conflict as conflict:
            return _json(_conflict(conflict), status=409)
        except StoreError as e:
            return _error(422, "rejected", str(e))
        prometheus.commits.inc(len(entries))
        hub.publish(entries[-1].rev)
        log.info(
            "revs %d-%d: moved %s to %s (%d paths) from %s", entries[0].rev, entries[-1].rev,
            request.source, request.target, len(request.expect), origin,
        )  # fmt: skip
        return _json({"entries": [e.to_json() for e in entries]})

    @app.get("/")
    async def page() -> Response:
        return _static(page_files.HTML, "text/html; charset=utf-8")

    @app.get("/page.js")
    async def page_js() -> Response:
        return _static(page_files.JS, "text/javascript; charset=utf-8")

    @app.get("/page.css")
    async def page_css() -> Response:
        return _static(page_files.CSS, "text/css; charset=utf-8")

    @app.post("/login")
    async def login() -> Response:
        address = request.remote_addr or "unknown"
        body = await _json_body()
        token = body.get("token") if isinstance(body, dict) else None
        session = auth.open_session(token) if isinstance(token, str) and token else None
        if session is None and isinstance(token, str) and token:
            await auth.reload()
            session = auth.open_session(token)
        if session is None:
            auth.failed(address)
            return _error(401, "unauthorized", "that token was not accepted")
        response = _json({"ok": True})
        response.set_cookie(
            SESSION_COOKIE, session, max_age=int(SESSION_SECONDS), path="/", httponly=True,
            samesite="Strict", secure=request.scheme == "https",
        )  # fmt: skip
        return response

    @app.post("/logout")
    async def logout() -> Response:
        auth.close_session(request.cookies.get(SESSION_COOKIE))
        response = _json({"ok": True})
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    storage_cache: list[tuple[float, dict[str, Any]]] = []

    async def storage() -> dict[str, Any]:
        """Files, bytes, chunks and what deduplication saves, from the current tree; cached
        for a few seconds (it reads every entry)."""
        now = trio.current_time()
        if storage_cache and now - storage_cache[0][0] < STORAGE_CACHE_SECONDS:
            return storage_cache[0][1]
        files = total = 0
        chunks: dict[str, int] = {}
        after = ""
        while page := await meta.list_current(after, LIST_PAGE):
            for entry in page:
                if entry.kind != DIR:
                    files += 1
                    total += entry.size
                    chunks.update((c.hash, c.size) for c in entry.chunks)
            after = page[-1].path
        stored = sum(chunks.values())
        figures = {
            "files": files, "bytes": total, "chunks": len(chunks), "chunk_bytes": stored,
            "saved_by_dedupe": total - stored, "history_days": history_days,
        }  # fmt: skip
        storage_cache[:] = [(now, figures)]
        return figures

    @app.get("/status.json")
    async def status_json() -> Response:
        latest = hub.latest_rev
        clients = [
            {"name": s.name, "address": s.address, "since": s.since,
             "behind": max(0, latest - max(s.position, 0))}
            for s in sorted(hub.streams.values(), key=lambda s: (s.name, s.since))
        ]  # fmt: skip
        return _json(
            {"version": VERSION, "rev": latest, "clients": clients, "storage": await storage()}
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(prometheus.render(), content_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/history")
    async def history() -> Response:
        path = _path_arg(request.args.get("path", ""))
        limit = _limit_arg()
        versions = await meta.history(path, limit) if path else []
        current = versions[0].entry if versions else None
        body: dict[str, Any] = {"path": path, "versions": [_kept(k) for k in versions]}
        if current is None or current.kind == DIR:  # a folder: what was deleted below it
            body["deleted_below"] = [_kept(k) for k in await meta.deleted_below(path, limit)]
        return _json(body)

    @app.post("/restore")
    async def restore() -> Response:
        body = await _json_body()
        if not isinstance(body, dict):
            raise ProtocolError("a restore is a JSON object")
        path = _path_arg(body.get("path", ""))
        to = _path_arg(body["to"]) if body.get("to") is not None else path
        rev, before = body.get("rev"), body.get("before")
        if (rev is None) == (before is None):
            raise ProtocolError("give one of 'rev' and 'before'")
        if rev is not None:
            if not path or not _is_int(rev):
                raise ProtocolError("'rev' needs a path and a revision number")
            old = [k.entry for k in await meta.history(path, MAX_RESTORE) if k.entry.rev == rev]
            if not old:
                return _error(404, "no_such_version", f"{path} has no kept version {rev}")
            if old[0].deleted:
                return _error(422, "deleted", f"version {rev} of {path} is a deletion")
        else:
            if not isinstance(before, int | float) or isinstance(before, bool):
                raise ProtocolError("'before' must be a Unix time")
            old = await meta.as_of(path, float(before), MAX_RESTORE)
        requests, unchanged = [], 0
        for entry in old:
            if to == path:
                target = entry.path
            elif path:
                target = to + entry.path[len(path) :]
            else:
                target = f"{to}/{entry.path}" if to else entry.path
            check_path(target)
            now = await meta.current(target)
            if now is not None and not now.deleted and _same(now, entry):
                unchanged += 1
                continue
            requests.append(
                CommitRequest(
                    target, now.rev if now is not None else 0, kind=entry.kind,
                    hash=entry.hash, size=entry.size, chunks=entry.chunks,
                    executable=entry.executable, mtime_ns=entry.mtime_ns,
                )
            )  # fmt: skip
        results: list[dict[str, Any]] = []
        for i in range(0, len(requests), MAX_COMMITS):
            results += await commit_all(requests[i : i + MAX_COMMITS])
        restored = [r["entry"] for r in results if "entry" in r]
        failed = [r for r in results if "entry" not in r]
        log.info(
            "%s restored %d paths at %s (%d failed)", _client_name(), len(restored), to, len(failed)
        )
        return _json({"restored": restored, "unchanged": unchanged, "failed": failed})

    @app.get("/sync")
    async def sync() -> Response:
        name = _client_name()
        address = request.remote_addr or ""  # the stream runs outside the request's context
        cursor = _cursor()
        start = hub.latest_rev if cursor is None else cursor
        info: TokenInfo = g.client
        if auth.full(info, name):
            return _error(429, "too_many_streams", f"{name} has its share of event streams open")

        async def events() -> AsyncIterator[bytes]:
            with auth.stream(info, name) as stream:
                async with aclosing(stream_events(stream)) as pieces:
                    async for piece in pieces:
                        yield piece

        async def stream_events(stream: Stream) -> AsyncGenerator[bytes, None]:
            subscription = hub.subscribe(name, address)
            log.info("%s connected (from rev %d)", name, start)
            try:
                hello = {"server_id": server_id, "rev": hub.latest_rev}
                yield b"retry: 2000\n" + format_event(json.dumps(hello), event="hello")
                position = start
                hub.at(subscription, position)
                live = False
                seen = hub.announce_seq  # announcements are news, never replayed
                while not hub.closed and not stream.revoked:
                    page = await pages.after(position)
                    if page is not None:
                        # One write for the page: a tree of small files makes thousands.
                        data, position = page
                        yield data
                        hub.at(subscription, position)
                        if live and (published := hub.published_at(position)) is not None:
                            prometheus.event_delay.observe(trio.current_time() - published)
                        continue
                    live = True  # caught up: from here on, pages are changes as they happen
                    news, seen = hub.announced_since(seen, name)
                    if news:
                        yield b"".join(news)
                        continue
                    with trio.move_on_after(keepalive) as idle, stream.waiting():
                        await hub.wait_beyond(position, seen)
                    if idle.cancelled_caught:
                        yield format_comment("keep-alive")
                if stream.revoked:
                    log.info("%s: its token was revoked; ending its event stream", name)
            finally:
                hub.unsubscribe(subscription)
                log.info("%s disconnected", name)

        response = Response(events(), mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.timeout = None  # Quart would cut the stream after RESPONSE_TIMEOUT otherwise
        return response

    # Chunk uploads skip Quart (server/intake.py).
    intake = ChunkIntake(blobs, hub, auth, offload, body_grace=body_grace)
    return intake.beside(app)

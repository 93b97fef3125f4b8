"""`POST /chunks`, read straight from its ASGI messages, beside the Quart app.

Chunk uploads are most of what comes into a server. Quart-Trio reads every message of a body
into its own buffer as Hypercorn delivers it, whatever pace the handler reads at, and hands it on
in copies: two more copies of every byte, and no way to slow an upload the disk cannot keep up
with, whose body then waited in memory. Here the body is read one message at a time and each
frame is staged as it completes. While STAGING_BYTES of received chunks wait for the disk, across
all uploads, no upload's body is read further: Hypercorn's queue for the request fills, it stops
reading the socket, and TCP slows the sender down.

Authentication (`Authenticator.admit`) and the answers (`refusals`) are those of every route.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)

from ..core.budget import ByteBudget
from ..core.compression import decoded_size, unpack
from ..core.offload import Offload
from ..errors import ProtocolError, StoreError, single_error
from ..protocol.frames import MISSING, RAW, Frame, FrameParser
from ..protocol.models import CLIENT_HEADER, MAX_CHUNK_SIZE, MAX_DECODED_PER_REQUEST
from .auth import Authenticator
from .bodies import MAX_BODY, paced
from .hub import ChangeHub
from .metrics import CLIENT_KEY, logged_name
from .refusals import Refusal, refusal_for
from .store import BlobStore, ChunkBatch

log = logging.getLogger("trio_sync.server")

ROUTE = ("POST", "/chunks")
#: Received chunk bytes (as sent, and decoded where they were compressed) not yet written,
#: across all uploads. A few requests' worth: the disk's threads always have work queued.
STAGING_BYTES = 16 * 1024 * 1024
#: Frames up to this size are staged together, one hand-off to a thread for all those of one
#: piece of the body: a tree of small files sends hundreds of them per request.
SMALL_FRAME = 16 * 1024
#: How long the rest of a refused body is taken in, at most, while the connection closes.
DRAIN_SECONDS = 10.0


class _Disconnected(Exception):
    """The client went away before its body ended: nothing of it is stored."""


class ChunkIntake:
    """The route's handler, an ASGI app of its own; `beside` puts it in front of the rest."""

    def __init__(
        self,
        blobs: BlobStore,
        hub: ChangeHub,
        auth: Authenticator,
        offload: Offload,
        *,
        body_grace: float,
    ) -> None:
        self._blobs = blobs
        self._hub = hub
        self._auth = auth
        self._cpu = offload.run_sync
        self._grace = body_grace
        self._staging = ByteBudget(STAGING_BYTES)

    def beside(self, app: ASGIFramework) -> ASGIFramework:
        """An app that answers this route itself and hands every other request to *app*."""

        async def routed(
            scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
        ) -> None:
            if scope["type"] == "http" and (scope["method"], scope["path"]) == ROUTE:
                await self(scope, receive, send)
            else:
                await app(scope, receive, send)

        return routed

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        assert scope["type"] == "http"
        body = _Body(receive)
        answer: dict[str, Any] | Refusal
        try:
            answer = await self._handle(scope, body)
        except _Disconnected:
            return  # Hypercorn has closed the stream; there is no one to answer
        except Exception as error:
            refusal = refusal_for(error)
            if refusal is None:
                log.exception("POST /chunks failed")
                refusal = Refusal(500, "internal_error", "the server failed; see its log")
            answer = refusal
        if isinstance(answer, Refusal):
            status, payload, extra = answer.status, answer.body(), answer.headers
        else:
            status, payload, extra = 200, json.dumps(answer).encode(), {}
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            *((name.lower().encode(), value.encode("latin-1")) for name, value in extra.items()),
        ]
        async with trio.open_nursery() as nursery:
            if not body.ended:
                # Answered before the body ended (a refusal): Hypercorn goes on reading it into
                # the request's queue, and once that is full it waits, even to tell us that the
                # connection closed after this answer. Take what comes until it does.
                nursery.start_soon(body.drain)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload, "more_body": False})

    async def _handle(self, scope: HTTPScope, body: _Body) -> dict[str, Any] | Refusal:
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)
        authorization = headers.get(b"authorization")
        info = await self._auth.admit(
            (scope.get("client") or ("unknown",))[0],
            None if authorization is None else authorization.decode("latin-1"),
        )
        if isinstance(info, Refusal):
            return info
        client = headers.get(CLIENT_HEADER.lower().encode())
        who = logged_name(
            info.name, info.shared, None if client is None else client.decode("latin-1")
        )
        scope[CLIENT_KEY] = who  # type: ignore[literal-required]
        length = headers.get(b"content-length", b"").strip()
        if length.isdigit() and int(length) > MAX_BODY:
            return Refusal(413, "too_large", f"a request body is at most {MAX_BODY} bytes")
        async with aclosing(body.pieces()) as pieces:
            return await self._store(pieces)

    async def _store(self, pieces: AsyncIterator[bytes]) -> dict[str, Any]:
        """Each frame verified and staged as it arrives; all made durable together at the end,
        so a request cut off stores none of its chunks and the client sends them again."""
        parser = FrameParser()
        stored: list[str] = []
        rejected: list[str] = []
        decoded = 0
        failure: ProtocolError | None = None
        async with self._blobs.batch() as batch, aclosing(paced(pieces, self._grace)) as body:
            # single_error: a full disk in any task is the answer, not a group of them.
            async with single_error(), trio.open_nursery() as nursery:  # threads: the Offload's
                try:
                    async for piece in body:
                        small: list[Frame] = []
                        small_held = 0
                        for frame in parser.feed(piece):
                            if frame.encoding == MISSING:
                                raise ProtocolError("an upload cannot send a missing chunk")
                            # Counted before anything is decoded: what a request may cost in
                            # memory and CPU is bounded by what it decodes to.
                            size = decoded_size(frame.encoding, frame.payload)
                            decoded += size
                            if decoded > MAX_DECODED_PER_REQUEST:
                                raise ProtocolError(
                                    f"the chunks of one request may decode to at most"
                                    f" {MAX_DECODED_PER_REQUEST} bytes"
                                )
                            held = _held(frame, size)
                            if len(frame.payload) <= SMALL_FRAME:
                                small.append(frame)
                                small_held += held
                            else:
                                await self._staging.acquire(held)
                                nursery.start_soon(
                                    self._stage_one, batch, frame, held, stored, rejected
                                )
                        if small:
                            await self._staging.acquire(small_held)
                            nursery.start_soon(
                                self._stage_small, batch, small, small_held, stored, rejected
                            )
                    parser.close()
                except ProtocolError as e:
                    failure = e  # raised below, outside the nursery's exception group
            if failure is not None:
                raise failure
        if stored:
            self._hub.chunks_landed()  # durable and readable: fetches waiting for them go on
        return {"stored": stored, "rejected": rejected}

    async def _stage_one(
        self,
        batch: ChunkBatch,
        frame: Frame,
        held: int,
        stored: list[str],
        rejected: list[str],
    ) -> None:
        try:
            if frame.encoding == RAW:
                data = frame.payload  # nothing to decode: no thread hand-off
            else:
                data = await self._cpu(unpack, frame.encoding, frame.payload, MAX_CHUNK_SIZE)
            await batch.add(frame.hash, data)
        except (StoreError, ProtocolError):
            rejected.append(frame.hash)  # the client re-reads that file and tries again
        else:
            stored.append(frame.hash)
        finally:
            self._staging.release(held)

    async def _stage_small(
        self,
        batch: ChunkBatch,
        frames: list[Frame],
        held: int,
        stored: list[str],
        rejected: list[str],
    ) -> None:
        def decode() -> tuple[list[tuple[str, bytes]], list[str]]:
            chunks: list[tuple[str, bytes]] = []
            corrupt: list[str] = []
            for frame in frames:
                try:
                    chunks.append(
                        (frame.hash, unpack(frame.encoding, frame.payload, MAX_CHUNK_SIZE))
                    )
                except ProtocolError:
                    corrupt.append(frame.hash)
            return chunks, corrupt

        try:
            if all(frame.encoding == RAW for frame in frames):
                chunks = [(frame.hash, frame.payload) for frame in frames]
                corrupt: list[str] = []
            else:
                chunks, corrupt = await self._cpu(decode)
            refused = await batch.add_many(chunks) if chunks else set()
            rejected.extend(corrupt)
            for hash, _ in chunks:
                (rejected if hash in refused else stored).append(hash)
        finally:
            self._staging.release(held)


def _held(frame: Frame, decoded: int) -> int:
    """What a frame holds in memory until it is written: its bytes, and what they decode to."""
    return len(frame.payload) + (decoded if frame.encoding != RAW else 0)


class _Body:
    """The request body, one ASGI message at a time, read only when asked for."""

    def __init__(self, receive: ASGIReceiveCallable) -> None:
        self._receive = receive
        self.ended = False  # the last message came, or the client went away

    async def _next(self) -> bytes:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.ended = True
            raise _Disconnected
        if message["type"] != "http.request":
            return b""
        if not message.get("more_body", False):
            self.ended = True
        return message.get("body", b"")

    async def pieces(self) -> AsyncGenerator[bytes, None]:
        while not self.ended:
            if piece := await self._next():
                yield piece

    async def drain(self) -> None:
        """Take and drop the rest, for at most DRAIN_SECONDS."""
        with trio.move_on_after(DRAIN_SECONDS), contextlib.suppress(_Disconnected):
            while not self.ended:
                await self._next()

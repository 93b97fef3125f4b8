"""Traffic counters for `GET /info`: requests per route and body bytes in each direction.

An ASGI wrapper around the app, so every route is counted the same way and no handler has to
remember to. Benchmarks and tests read the figures to show what a sync really sent. It also
keeps two HTTP/1.1 promises Hypercorn needs help with: the last send of every response is
shielded, and a response sent before its request's body arrived says `Connection: close`.
And it writes the access log (`trio_sync.access`, only where `--access-log` gives it a file).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)

from ..protocol.models import is_valid_name

_HASH_IN_PATH = re.compile(r"/[0-9a-f]{64}$")
#: One line per request once its response has ended: address, client (`logged_name`),
#: request line, status, body bytes out, seconds. Never the token.
access = logging.getLogger("trio_sync.access")
access.propagate = False
#: Where the app puts the name of the token a request came with, in the ASGI scope.
CLIENT_KEY = "trio_sync.client"


def logged_name(token: str, shared: bool, header: str | None) -> str:
    """Who the access log says made a request: the token's name, or for a shared token the
    name the client gives (`CLIENT_HEADER`), as `token:client`, when it is a valid one."""
    if shared and is_valid_name(header):
        return f"{token}:{header}"
    return token


#: How long the last send of a response may take, shielded, before it is given up.
LAST_SEND_SECONDS = 30.0


@dataclass
class Traffic:
    requests: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": dict(sorted(self.requests.items())),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }


class CountingApp:
    def __init__(self, app: ASGIFramework, traffic: Traffic, *, log_access: bool = False) -> None:
        self._app = app
        self.traffic = traffic
        self._log_access = log_access

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        traffic = self.traffic
        route = _HASH_IN_PATH.sub("/{hash}", scope["path"])
        traffic.requests[f"{scope['method']} {route}"] += 1

        body_pending = _declares_body(scope)
        started, status, sent = time.monotonic(), 0, 0

        async def counted_receive() -> Any:
            nonlocal body_pending
            message = await receive()
            if message["type"] == "http.request":
                traffic.bytes_in += len(message.get("body", b""))
                if not message.get("more_body", False):
                    body_pending = False
            return message

        async def counted_send(message: Any) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            if message["type"] == "http.response.start" and body_pending:
                # Answered before the body came in (a refusal): Hypercorn then closes the
                # connection after the response, without saying so, and a client that reuses
                # it meets a connection closed under its next request.
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"connection" for name, _ in headers):
                    headers.append((b"connection", b"close"))  # unless the refusal said so
                    message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                traffic.bytes_out += len(message.get("body", b""))
                if not message.get("more_body", False):
                    # Hypercorn reports the end of the exchange from inside this last send, and
                    # Quart-Trio cancels the request's nursery on that report; the cancellation
                    # then also stops what Hypercorn does next in the same call: close the
                    # connection (`Connection: close`) or start its keep-alive timer. Unshielded,
                    # every connection stayed open for good (the security review's H1; a
                    # Quart-Trio / Hypercorn interplay, to be reported upstream).
                    with trio.move_on_after(LAST_SEND_SECONDS) as scope:
                        scope.shield = True
                        await send(message)
                    return
            await send(message)

        try:
            await self._app(scope, counted_receive, counted_send)
        finally:
            if self._log_access:
                query = scope["query_string"].decode("latin-1")
                access.info(
                    '%s %s "%s %s%s" %d %d %.3f',
                    (scope.get("client") or ("-",))[0],
                    scope.get(CLIENT_KEY, "-"),
                    scope["method"],
                    scope["path"],
                    f"?{query}" if query else "",
                    status,
                    sent,
                    time.monotonic() - started,
                )


def _declares_body(scope: HTTPScope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False

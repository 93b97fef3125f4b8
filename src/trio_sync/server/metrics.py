"""Traffic counters for `GET /info`: requests per route and body bytes in each direction.

An ASGI wrapper around the app, so every route is counted the same way and no handler has to
remember to. Benchmarks and tests read the figures to show what a sync really sent.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

_HASH_IN_PATH = re.compile(r"/[0-9a-f]{64}$")


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
    def __init__(self, app: ASGIFramework, traffic: Traffic) -> None:
        self._app = app
        self.traffic = traffic

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        traffic = self.traffic
        route = _HASH_IN_PATH.sub("/{hash}", scope["path"])
        traffic.requests[f"{scope['method']} {route}"] += 1

        async def counted_receive() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                traffic.bytes_in += len(message.get("body", b""))
            return message

        async def counted_send(message: Any) -> None:
            if message["type"] == "http.response.body":
                traffic.bytes_out += len(message.get("body", b""))
            await send(message)

        await self._app(scope, counted_receive, counted_send)

"""How the server says no: one JSON error model for every route, Quart's and the chunk
intake's (`server/intake.py`), so a client reads every refusal the same way.

The body is `{"error": code, "message": text, ...}`; docs/protocol.md lists the codes.
"""

from __future__ import annotations

import errno
import json
import logging
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from werkzeug.exceptions import HTTPException

from ..errors import InvalidPath, ProtocolError, StoreError

log = logging.getLogger("trio_sync.server")


class BodyTooSlow(ProtocolError):
    """The request body came slower than `bodies.BODY_MIN_RATE`."""


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        return json.dumps({"error": self.code, "message": self.message, **self.extra}).encode()


def refusal_for(error: BaseException) -> Refusal | None:
    """The answer *error* gets; None for an error that is a bug (a 500)."""
    if isinstance(error, BodyTooSlow):
        # The connection cannot be trusted to carry another request: close it.
        return Refusal(408, "too_slow", str(error), headers={"Connection": "close"})
    if isinstance(error, (InvalidPath, ProtocolError)):
        return Refusal(400, "bad_request", str(error))
    if isinstance(error, StoreError):
        return Refusal(422, "rejected", str(error))
    if isinstance(error, (OSError, sqlite3.OperationalError)):
        # A full disk: nothing of the request was kept (chunks are renamed into place only
        # together, commits are one transaction), and the client tries again later.
        full = (
            error.errno in (errno.ENOSPC, errno.EDQUOT)
            if isinstance(error, OSError)
            else "full" in str(error)
        )
        if not full:
            return None
        log.error("the data dir is full: %s", error)
        return Refusal(507, "insufficient_storage", "the server's disk is full; try again later")
    if isinstance(error, HTTPException):
        return Refusal(error.code or 500, "http_error", error.description or str(error))
    return None

"""Server-Sent Events framing (WHATWG HTML, "server-sent events"), both directions, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ProtocolError

#: A client refuses lines longer than this; an event with a huge chunk list still fits.
MAX_LINE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None


def format_event(data: str, *, event: str | None = None, id: str | None = None) -> bytes:
    """Frame one event. Each line of *data* becomes its own `data:` field, as the spec requires."""
    lines: list[str] = []
    if id is not None:
        if any(ch in id for ch in "\r\n\0"):
            raise ValueError("SSE id must not contain CR, LF or NUL")
        lines.append(f"id: {id}")
    if event is not None:
        if any(ch in event for ch in "\r\n"):
            raise ValueError("SSE event name must not contain CR or LF")
        lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in data.replace("\r\n", "\n").split("\n"))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def format_comment(text: str = "") -> bytes:
    return f": {text}\n\n".encode()


class SSEParser:
    """Incremental parser: `feed(bytes)` returns the events completed by those bytes.

    Keeps `last_event_id` as the spec does (an id persists across later events without one).
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data: list[str] = []
        self._event = ""
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        events: list[ServerSentEvent] = []
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across two reads
        self._pending_cr = False
        self._buffer += chunk
        start = 0
        buf = self._buffer
        while True:
            idx_n = buf.find(b"\n", start)
            idx_r = buf.find(b"\r", start)
            if idx_n < 0 and idx_r < 0:
                break
            if idx_r >= 0 and (idx_n < 0 or idx_r < idx_n):
                end, nxt = idx_r, idx_r + 1
                if nxt < len(buf) and buf[nxt] == 0x0A:
                    nxt += 1
                elif nxt == len(buf):
                    self._pending_cr = True
            else:
                end, nxt = idx_n, idx_n + 1
            event = self._line(bytes(buf[start:end]))
            if event is not None:
                events.append(event)
            start = nxt
        del buf[:start]
        if len(buf) > MAX_LINE_BYTES:
            raise ProtocolError(f"SSE line longer than {MAX_LINE_BYTES} bytes")
        return events

    def _line(self, raw: bytes) -> ServerSentEvent | None:
        line = raw.decode("utf-8", errors="replace")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = ServerSentEvent(
            event=self._event or "message", data="\n".join(self._data), id=self.last_event_id
        )
        self._data = []
        self._event = ""
        return event

"""Chunk frames: the body of `POST /chunks` and of the answer to `POST /chunks/fetch`.

Each frame is one header line, `<hash> <encoding> <length>\\n`, then exactly *length* bytes of
payload. Encodings: `raw` (the chunk's bytes), `zstd` (one zstd frame that decompresses to them),
`missing` (the server does not have the chunk; length 0). Headers are short ASCII so that a frame
stream can be read with curl; payloads are bounded, so a parser never buffers more than one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import ProtocolError
from .models import MAX_CHUNK_SIZE, check_hash

RAW = "raw"
ZSTD = "zstd"
MISSING = "missing"
ENCODINGS = (RAW, ZSTD, MISSING)
#: Longest header line: 64 hex digits, an encoding, a length.
MAX_HEADER = 96
#: Pieces held before they are joined into one: a body sent a byte at a time would otherwise
#: cost an object per byte.
MAX_PIECES = 1024
MEDIA_TYPE = "application/x-trio-sync-chunks"


@dataclass(frozen=True, slots=True)
class Frame:
    hash: str
    encoding: str
    payload: bytes


def frame_header(hash: str, encoding: str, length: int) -> bytes:
    return f"{hash} {encoding} {length}\n".encode("ascii")


class FrameParser:
    """Incremental: feed bytes as they arrive, get whole frames back.

    Pieces are kept as they came and joined once per payload, so each byte is copied once
    (unless they come in more than MAX_PIECES bits, which are then joined as they arrive).
    """

    def __init__(self) -> None:
        self._pieces: deque[memoryview] = deque()
        self._size = 0
        self._header: tuple[str, str, int] | None = None

    def feed(self, data: bytes) -> Iterator[Frame]:
        if data:
            self._pieces.append(memoryview(data))
            self._size += len(data)
            if len(self._pieces) > MAX_PIECES:
                self._pieces = deque([memoryview(b"".join(self._pieces))])
        while True:
            if self._header is None:
                head = self._peek(MAX_HEADER + 1)
                end = head.find(b"\n")
                if end < 0:
                    if len(head) > MAX_HEADER:
                        raise ProtocolError("chunk frame header too long")
                    return
                self._header = _parse_header(head[:end])
                self._take(end + 1)
            hash, encoding, length = self._header
            if self._size < length:
                return
            payload = self._take(length)
            self._header = None
            yield Frame(hash, encoding, payload)

    def close(self) -> None:
        """Call at the end of the stream: a frame cut short is an error."""
        if self._header is not None or self._size:
            raise ProtocolError("chunk stream ended inside a frame")

    def _peek(self, n: int) -> bytes:
        out = bytearray()
        for piece in self._pieces:
            out += piece[: n - len(out)]
            if len(out) >= n:
                break
        return bytes(out)

    def _take(self, n: int) -> bytes:
        parts = []
        while n:
            piece = self._pieces[0]
            if len(piece) <= n:
                parts.append(self._pieces.popleft())
                n -= len(piece)
                self._size -= len(piece)
            else:
                parts.append(piece[:n])
                self._pieces[0] = piece[n:]
                self._size -= n
                n = 0
        return b"".join(parts)


def _parse_header(line: bytes) -> tuple[str, str, int]:
    try:
        hash, encoding, length_text = line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"bad chunk frame header: {line[:MAX_HEADER]!r}") from None
    if encoding not in ENCODINGS:
        raise ProtocolError(f"unknown chunk encoding {encoding!r}")
    if not length_text.isdigit() or len(length_text) > 9:
        raise ProtocolError(f"bad chunk frame length {length_text!r}")
    length = int(length_text)
    if length > MAX_CHUNK_SIZE or (encoding == MISSING and length):
        raise ProtocolError(f"chunk frame of {length} bytes is not allowed")
    return check_hash(hash), encoding, length

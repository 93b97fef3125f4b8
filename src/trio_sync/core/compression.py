"""zstd for chunks on the wire, used only where it pays.

A chunk is compressed only if a sample of it shrinks, so incompressible data (photos, video,
archives) costs a small probe instead of a full compression pass. Blocking; run in a thread.
"""

from __future__ import annotations

import threading

import zstandard

from ..errors import ProtocolError
from ..protocol.frames import RAW, ZSTD

LEVEL = 3
#: Bytes compressed to decide whether the whole chunk is worth it.
SAMPLE = 64 * 1024
#: Send compressed only when it saves at least this fraction.
MIN_SAVING = 0.05
#: Chunks below this size are never worth a frame of their own.
MIN_SIZE = 256

# A zstd context costs more to make than a small chunk costs to compress, and one context must
# not be used by two threads at once: each thread keeps its own.
_contexts = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    try:
        return _contexts.compressor  # type: ignore[no-any-return]
    except AttributeError:
        _contexts.compressor = zstandard.ZstdCompressor(level=LEVEL)
        return _contexts.compressor  # type: ignore[no-any-return]


def _decompressor() -> zstandard.ZstdDecompressor:
    try:
        return _contexts.decompressor  # type: ignore[no-any-return]
    except AttributeError:
        _contexts.decompressor = zstandard.ZstdDecompressor()
        return _contexts.decompressor  # type: ignore[no-any-return]


def pack(data: bytes) -> tuple[str, bytes]:
    """(encoding, payload) for *data*: zstd when that is clearly smaller, else raw."""
    if len(data) < MIN_SIZE:
        return RAW, data
    compressor = _compressor()
    if len(data) > 2 * SAMPLE:
        probe = compressor.compress(data[:SAMPLE])
        if len(probe) > SAMPLE * (1 - MIN_SAVING):
            return RAW, data
    packed = compressor.compress(data)
    if len(packed) > len(data) * (1 - MIN_SAVING):
        return RAW, data
    return ZSTD, packed


def unpack(encoding: str, payload: bytes, size_limit: int) -> bytes:
    """The chunk's bytes; refuses anything that would decompress beyond *size_limit*."""
    if encoding == RAW:
        return payload
    if encoding != ZSTD:
        raise ProtocolError(f"cannot decode a chunk sent as {encoding!r}")
    try:
        params = zstandard.get_frame_parameters(payload)
        if params.content_size > size_limit:  # also catches "size unknown" (a huge sentinel)
            raise ProtocolError("compressed chunk would exceed the size limit")
        return _decompressor().decompress(payload, max_output_size=size_limit)
    except zstandard.ZstdError as e:
        raise ProtocolError(f"corrupt compressed chunk: {e}") from None


def decoded_size(encoding: str, payload: bytes) -> int:
    """How many bytes *payload* says it decodes to, read from its header alone (a zstd frame
    that does not say, or says nonsense, counts as its own length: decoding refuses it)."""
    if encoding != ZSTD:
        return len(payload)
    try:
        size = zstandard.get_frame_parameters(payload).content_size
    except zstandard.ZstdError:
        return len(payload)
    return size if 0 <= size < 2**62 else len(payload)

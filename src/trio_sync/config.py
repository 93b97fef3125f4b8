"""Frozen configuration records, built by the CLI (or by tests) and read everywhere else."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "trio-sync" / "server"


def default_client_name() -> str:
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return (name or "client")[:64]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    #: Seconds between SSE keep-alive comments.
    keepalive: float = 15.0
    #: Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    graceful_timeout: float = 2.0
    #: An idle connection between requests is closed after this many seconds.
    keep_alive_timeout: float = 5.0
    #: Connections open at once; beyond it the server waits before accepting more (each live
    #: client holds one for its event stream, and a few more while it transfers).
    max_connections: int = 4096
    #: A request body may take this long before it must arrive at 16 KiB/s on average.
    body_grace: float = 30.0
    #: TLS: the certificate (chain) and its key, PEM. A server on a non-loopback address without
    #: them makes a self-signed pair in its data dir.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Append one line per request here (address, client, request line, status, bytes, time).
    access_log: Path | None = None
    #: Replaced versions are kept this long (their chunks too), then garbage-collected.
    keep_history_days: float = 30.0
    #: Seconds between garbage collection passes.
    gc_interval: float = 3600.0
    #: A chunk stored or asked about within this many seconds is never collected: a client may
    #: be about to commit it, after an upload that took hours over a slow link (review L8).
    gc_grace: float = 86400.0
    #: Chunk files written and read around the page cache (O_DIRECT) where the filesystem
    #: allows (`core.direct`): cheaper when the cache would take fresh memory, dearer when a
    #: chunk is fetched again right after it was stored.
    direct_store: bool = False


@dataclass(frozen=True, slots=True)
class ClientConfig:
    root: Path
    server_url: str
    token: str
    name: str
    #: Paths handled at once. Workers are cheap tasks; their requests are coalesced into
    #: batches, so more workers mean fewer, larger requests. Threads stay bounded separately.
    workers: int = 256
    #: Compress chunks with zstd on the wire where that pays (it is probed per chunk).
    compress: bool = True
    #: Chunk bytes held in memory at once by all transfers together. Two upload batches of
    #: 8 MiB in flight and the next chunks being read fit; with 32 MiB, client A peaked at
    #: 129-132 MiB on a mixed set of 300 files up to 64 MiB, with 20 MiB at 109 MiB, and the
    #: same speed on it and on a 1 GiB file.
    memory_budget: int = 20 * 1024 * 1024
    #: Reconnect backoff: first delay and cap, in seconds (full jitter on top).
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    #: Watcher: how long a burst of changes may grow at most, in milliseconds.
    debounce_ms: int = 200
    #: A file is uploaded once its writer closed it (or renamed it into place), or once it has
    #: not been modified for this many seconds; one that never rests, every
    #: *settle_max_seconds* anyway.
    settle_seconds: float = 1.0
    settle_max_seconds: float = 30.0
    #: The event stream is considered dead after this long without a byte (keep-alives are 15 s).
    stream_idle_timeout: float = 45.0
    #: A file fetched ahead of its commit (another client announced its upload) is dropped if
    #: the commit has not come this many seconds after the fetching stopped: the upload was given
    #: up, or committed under another name after a conflict.
    ahead_keep_seconds: float = 3600.0
    #: Announced uploads are fetched ahead only while the partial files of all of them stay
    #: within this many bytes and the new one within half the free space: an announcement costs
    #: its sender nothing, and it commits nothing.
    ahead_quota: int = 8 * 1024**3
    #: A download that would leave less free space than this waits until there is more.
    free_space_reserve: int = 256 * 1024**2
    #: The mass-delete guard (client/guard.py): deletions are held back when more than this
    #: share of the synced files (and at least 10), or more than this many files, are gone.
    max_delete_fraction: float = 0.5
    max_delete_files: int = 1000
    #: How an https server is verified: a CA file (else the system's CAs), or a pinned SHA-256
    #: fingerprint of its certificate (`core.tls.parse_fingerprint`).
    ca_cert: Path | None = None
    fingerprint: bytes | None = None

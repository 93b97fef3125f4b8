"""Starts the server inside the caller's `trio.run`: stores, hub, app, Hypercorn's trio worker."""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import tcp_server as hypercorn_tcp_server

from ..config import ServerConfig
from ..core.offload import Offload
from ..core.tls import certificate_fingerprint, is_loopback, make_self_signed
from ..errors import StoreError
from .app import create_app
from .auth import Authenticator
from .gc import run_periodically
from .hub import ChangeHub
from .listen import connection_cap
from .listen import serve as serve_capped
from .metrics import CountingApp, Traffic, access
from .store import DiskBlobStore, SQLiteMetaStore
from .tokens import TokenStore

log = logging.getLogger("trio_sync.server")

#: Hypercorn reads a socket 64 KiB at a time, and each read travels through h11 and the ASGI
#: queue; chunk uploads are megabytes, and reads of up to 1 MiB cut the server's CPU per uploaded
#: byte by about a quarter. It is a module constant, not a setting: a Hypercorn release without
#: it makes this a no-op.
RECV_SIZE = 2**20
#: The name of the token a new server makes for its first client.
FIRST_CLIENT = "first"


def _read_more_per_call() -> None:
    if isinstance(getattr(hypercorn_tcp_server, "MAX_RECV", None), int):
        hypercorn_tcp_server.MAX_RECV = RECV_SIZE


@dataclass(frozen=True, slots=True)
class RunningServer:
    url: str
    server_id: str
    #: The token made for a first client at this start (shown once), if any.
    new_token: str | None = None
    #: Whether a plain-text token file of an older version was taken in as the shared token.
    legacy_token_taken: bool = False
    #: With TLS: the served certificate's fingerprint, and whether it is one we made.
    fingerprint: str | None = None
    self_signed: bool = False


async def run_server(
    config: ServerConfig,
    *,
    stop: trio.Event,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until *stop* is set; then end event streams and give requests a short grace period."""
    _read_more_per_call()
    data_dir = config.data_dir
    lock = await trio.to_thread.run_sync(_lock_data_dir, data_dir)
    # No checkpoint between taking the lock and the try: the lock must not leak.
    try:
        tokens = await trio.to_thread.run_sync(TokenStore.open, data_dir)
        try:
            taken, new_token = await trio.to_thread.run_sync(_first_tokens, tokens, config)
            tls = await trio.to_thread.run_sync(_tls_files, config)
            auth = Authenticator(tokens, config.token)
            io = Offload(4)  # chunk files and their (de)compression
            async with io.running(), _access_log(config.access_log):
                await _serve(
                    config, data_dir, auth, io, stop, task_status,
                    tls=tls,
                    first=partial(
                        RunningServer, new_token=new_token, legacy_token_taken=taken,
                        fingerprint=tls.fingerprint if tls else None,
                        self_signed=tls.self_signed if tls else False,
                    ),
                )  # fmt: skip
        finally:
            await trio.to_thread.run_sync(tokens.close)
    finally:
        os.close(lock)  # releases the flock


@asynccontextmanager
async def _access_log(path: Path | None) -> AsyncIterator[None]:
    """Send `trio_sync.access` to *path* (owner-only) while the server runs."""
    if path is None:
        yield
        return

    def open_log() -> logging.Handler:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        return handler

    handler = await trio.to_thread.run_sync(open_log)
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        yield
    finally:
        access.removeHandler(handler)
        handler.close()


@dataclass(frozen=True, slots=True)
class _Tls:
    cert: Path
    key: Path
    fingerprint: str
    self_signed: bool


def _tls_files(config: ServerConfig) -> _Tls | None:
    """The certificate to serve: the user's, or on a non-loopback address without one a
    self-signed one kept in the data dir (made on first start). None: plain HTTP on loopback."""
    if config.tls_cert is not None and config.tls_key is not None:
        cert, key, made = config.tls_cert, config.tls_key, False
    elif is_loopback(config.host):
        return None
    else:
        cert, key, made = (
            config.data_dir / "tls" / "cert.pem",
            config.data_dir / "tls" / "key.pem",
            True,
        )
        if not (cert.exists() and key.exists()):
            make_self_signed(cert, key, config.host)
            log.info("made a self-signed certificate in %s", cert.parent)
    return _Tls(cert, key, certificate_fingerprint(cert), made)


def _first_tokens(tokens: TokenStore, config: ServerConfig) -> tuple[bool, str | None]:
    """Take in an older version's token file; make a token for a first client if there is no
    token at all. Returns (a token file was taken in, the new token or None)."""
    taken = tokens.take_in_legacy(config.data_dir)
    if config.token or tokens.list():
        return taken, None
    return taken, tokens.add(FIRST_CLIENT)


def _lock_data_dir(data_dir: Path) -> int:
    """Hold the data folder for this process: a second server would empty its temp folder under
    the first one's writes and keep its own view of the database."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if data_dir.stat().st_mode & 0o077:
        log.warning(
            "%s can be read by other users of this machine; `chmod 700 %s` keeps your files"
            " and their history to you", data_dir, data_dir,
        )  # fmt: skip
    lock = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise StoreError(f"another trio-sync server is using {data_dir}") from None
    return lock


async def _serve(
    config: ServerConfig,
    data_dir: Path,
    auth: Authenticator,
    io: Offload,
    stop: trio.Event,
    task_status: trio.TaskStatus[RunningServer],
    *,
    tls: _Tls | None,
    first: Callable[[str, str], RunningServer],
) -> None:
    meta = await SQLiteMetaStore.open(data_dir / "index.db")
    try:
        blobs = await trio.to_thread.run_sync(
            partial(DiskBlobStore.open, data_dir, offload=io, direct=config.direct_store)
        )
        server_id = await meta.server_id()
        hub = ChangeHub(await meta.latest_rev())
        traffic = Traffic()
        commit_lock = trio.Lock()
        app = create_app(
            meta, blobs, hub, auth, server_id=server_id, keepalive=config.keepalive,
            body_grace=config.body_grace, history_days=config.keep_history_days,
            traffic=traffic, commit_lock=commit_lock, offload=io,
        )  # fmt: skip

        hc = HypercornConfig()
        host = f"[{config.host}]" if ":" in config.host else config.host
        hc.bind = [f"{host}:{config.port}"]
        hc.graceful_timeout = config.graceful_timeout
        hc.keep_alive_timeout = config.keep_alive_timeout
        if tls is not None:
            hc.certfile, hc.keyfile = os.fspath(tls.cert), os.fspath(tls.key)
        hc.accesslog = None
        hc.errorlog = logging.getLogger("hypercorn.error")

        gc_scope, tokens_scope = trio.CancelScope(), trio.CancelScope()

        async def shutdown_trigger() -> None:
            await stop.wait()
            log.info("shutting down")
            gc_scope.cancel()
            tokens_scope.cancel()
            hub.close()

        async def watch_tokens(task_status: trio.TaskStatus[None]) -> None:
            with tokens_scope:
                try:
                    await auth.watch(task_status=task_status)
                finally:
                    with trio.CancelScope(shield=True):
                        await auth.save_seen()

        async def collect_garbage() -> None:
            with gc_scope:
                await run_periodically(
                    meta,
                    blobs,
                    commit_lock,
                    every=config.gc_interval,
                    keep_history=config.keep_history_days * 86400,
                    grace=config.gc_grace,
                )

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(
                    serve_capped,
                    CountingApp(app, traffic, log_access=config.access_log is not None),
                    hc,
                    max_connections=connection_cap(config.max_connections),
                    shutdown_trigger=shutdown_trigger,
                )
            )
            nursery.start_soon(collect_garbage)
            await nursery.start(watch_tokens)
            task_status.started(first(binds[0], server_id))
    finally:
        with trio.CancelScope(shield=True):
            await meta.aclose()

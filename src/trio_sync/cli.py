"""Command line: arguments, logging, signals → cancellation, errors → exit codes. No sync logic."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio

from .client.engine import Engine
from .config import ClientConfig, ServerConfig, default_client_name, default_data_dir
from .errors import (
    AuthenticationFailed,
    FolderInUse,
    ProtocolError,
    RemoteError,
    StoreError,
    TrioSyncError,
)
from .memory import limit_allocator_arenas
from .protocol.models import check_name
from .server.serve import RunningServer, run_server

log = logging.getLogger("trio_sync")

EXIT_OK = 0
EXIT_OUT_OF_SYNC = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_UNREACHABLE = 4


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trio-sync", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    server = sub.add_parser("server", help="keep the shared copy and serve clients")
    server.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"where files and history live (default: {default_data_dir()})",
    )
    server.add_argument("--host", default="127.0.0.1", help="address to listen on")
    server.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free)")
    server.add_argument("--token", default=None, help="bearer token (or TRIO_SYNC_TOKEN)")
    server.add_argument(
        "--keep-history-days",
        type=_non_negative,
        default=30.0,
        help="keep replaced and deleted versions this long before their space is reclaimed"
        " (default: 30)",
    )

    client = sub.add_parser("client", help="keep a folder identical to the shared copy")
    client.add_argument("dir", type=Path, help="the folder to sync (created if missing)")
    client.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    client.add_argument("--token", default=None, help="bearer token (or TRIO_SYNC_TOKEN)")
    client.add_argument("--once", action="store_true", help="reconcile once, then exit")
    client.add_argument(
        "--no-compress",
        dest="compress",
        action="store_false",
        help="send chunks uncompressed (by default zstd is used where it shrinks a chunk)",
    )
    client.add_argument(
        "--name",
        default=None,
        help="this client's name in conflict copies and logs (default: the host name)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    limit_allocator_arenas()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        for noisy in ("httpx", "httpcore", "hpack"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    token = args.token or os.environ.get("TRIO_SYNC_TOKEN") or None
    if args.command == "server":
        server_config = ServerConfig(
            data_dir=(args.data_dir or default_data_dir()).expanduser().resolve(),
            host=args.host,
            port=args.port,
            token=token,
            keep_history_days=args.keep_history_days,
        )
        return trio.run(server_main, server_config)
    if not token:
        print("trio-sync: a token is needed: --token or TRIO_SYNC_TOKEN", file=sys.stderr)
        return EXIT_USAGE
    name = args.name or default_client_name()
    try:
        check_name(name)
    except ProtocolError as e:
        print(f"trio-sync: --name: {e}", file=sys.stderr)
        return EXIT_USAGE
    config = ClientConfig(
        root=args.dir.expanduser().resolve(),
        server_url=args.server,
        token=token,
        name=name,
        compress=args.compress,
    )
    return trio.run(client_main, config, args.once)


async def _until_signal(cancel_scope: trio.CancelScope, stop: trio.Event | None = None) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, stopping", signal.Signals(signum).name)
            if stop is not None:
                stop.set()  # graceful: the server ends streams and drains requests itself
            else:
                cancel_scope.cancel()
            return


async def server_main(config: ServerConfig) -> int:
    """Run a server until SIGINT or SIGTERM; the exit code."""
    stop = trio.Event()
    code = EXIT_OK
    async with trio.open_nursery() as outer:
        outer.start_soon(_until_signal, outer.cancel_scope, stop)
        try:
            async with trio.open_nursery() as inner:
                running: RunningServer = await inner.start(partial(run_server, config, stop=stop))
                log.info("data dir: %s", config.data_dir)
                log.info("listening on %s (server id %s)", running.url, running.server_id)
                if running.token_created:
                    log.info("created a token in %s (mode 0600)", config.data_dir / "token")
                print(
                    f"Connect a client with:\n  trio-sync client DIR --server {running.url}"
                    f" --token {running.token}",
                    flush=True,
                )
        except* (OSError, StoreError) as group:  # the nursery wraps what failed in a group
            for e in group.exceptions:
                log.error("cannot start the server: %s", e)
            code = EXIT_OUT_OF_SYNC
        finally:
            outer.cancel_scope.cancel()
    return code


async def client_main(config: ClientConfig, once: bool) -> int:
    """Run a client (one reconcile with *once*, else until SIGINT or SIGTERM); the exit code."""
    engine = Engine(config)
    code = EXIT_OK
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_until_signal, nursery.cancel_scope)
        try:
            if once:
                problems = await engine.sync_once()
                for problem in problems:
                    log.error("not in sync: %s", problem)
                code = EXIT_OUT_OF_SYNC if problems else EXIT_OK
                if not problems:
                    log.info("%s and %s agree", config.root, config.server_url)
            else:
                await engine.run()
        except AuthenticationFailed as e:
            log.error("%s; check --token / TRIO_SYNC_TOKEN", e)
            code = EXIT_AUTH
        except FolderInUse as e:
            log.error("%s", e)
            code = EXIT_USAGE
        except RemoteError as e:
            log.error("cannot sync with %s: %s", config.server_url, e)
            code = EXIT_UNREACHABLE
        except TrioSyncError as e:
            log.error("%s", e)
            code = EXIT_OUT_OF_SYNC
        nursery.cancel_scope.cancel()
    return code

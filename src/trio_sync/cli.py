"""Command line: arguments, logging, signals → cancellation, errors → exit codes. No sync logic."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio
from rich.console import Console

from . import __version__
from .client import status
from .client.conflicts import resolve as resolve_conflict
from .client.engine import Engine
from .client.guard import confirm
from .client.progress import format_size
from .client.progress import show as show_progress
from .client.settings import Saved, synced_folder_of
from .client.settings import load as load_settings
from .client.settings import save as save_settings
from .config import ClientConfig, ServerConfig, default_client_name, default_data_dir
from .core.tls import is_loopback, parse_fingerprint
from .errors import (
    AuthenticationFailed,
    FolderInUse,
    ProtocolError,
    RemoteError,
    ServerNotTrusted,
    ServerUnavailable,
    StoreError,
    TrioSyncError,
)
from .history import Where, destination, parse_when, restore, show_history
from .logwriter import LogWriter
from .memory import limit_allocator_arenas
from .protocol.models import check_name
from .protocol.paths import STATE_DIR_NAME
from .server.serve import RunningServer, run_server
from .server.tokens import SHARED, TokenStore

log = logging.getLogger("trio_sync")

EXIT_OK = 0
EXIT_OUT_OF_SYNC = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_UNREACHABLE = 4
EXIT_NOT_TRUSTED = 5


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


def _percent(text: str) -> float:
    value = _non_negative(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"must be 100 or less: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-sync",
        description="Keep folders on several machines identical through one server that keeps"
        " their history.",
        epilog="Start with `trio-sync server`, then `trio-sync client DIR --server URL"
        " --token-file FILE` on each machine. `trio-sync COMMAND --help` says more.",
    )
    parser.add_argument("--version", action="version", version=f"trio-sync {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    server = sub.add_parser("server", help="keep the shared copy and serve clients")
    server.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"where files and history live (default: {default_data_dir()})",
    )
    server.add_argument("--host", default="127.0.0.1", help="address to listen on")
    server.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free)")
    server.add_argument(
        "--token", default=None, help="one token for every client (or TRIO_SYNC_TOKEN)"
    )
    server.add_argument("--tls-cert", type=Path, default=None, help="TLS certificate (PEM)")
    server.add_argument("--tls-key", type=Path, default=None, help="its private key (PEM)")
    server.add_argument(
        "--keep-history-days",
        type=_non_negative,
        default=30.0,
        help="keep replaced and deleted versions this long before their space is reclaimed"
        " (default: 30)",
    )
    server.add_argument(
        "--access-log",
        type=Path,
        default=None,
        help="append a line per request to FILE (who, what, answer; never a token)",
    )
    server.add_argument(
        "--max-connections",
        type=_positive_int,
        default=4096,
        help="connections open at once; beyond it new ones wait (default: 4096)",
    )
    server.add_argument(
        "--direct-store",
        action="store_true",
        help="write and read stored chunks around the page cache (O_DIRECT): less CPU on a VM"
        " whose host takes back free memory, when uploads outgrow free memory; see the README",
    )

    tokens = sub.add_parser("token", help="add, list or revoke client tokens")
    tokens.add_argument(
        "--data-dir", type=Path, default=None, help="the server's data dir (default: as server)"
    )
    actions = tokens.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="make a token for a new client and print it once")
    add.add_argument("name", help="the client's name (in commits, conflict copies and logs)")
    actions.add_parser("list", help="every token: name, created, last seen and from where")
    revoke = actions.add_parser("revoke", help="revoke a token; its client stops within a second")
    revoke.add_argument("name")

    client = sub.add_parser("client", help="keep a folder identical to the shared copy")
    client.add_argument("dir", type=Path, help="the folder to sync (created if missing)")
    client.add_argument(
        "--server",
        default=None,
        help="server URL, e.g. http://127.0.0.1:8080 (remembered in DIR: later runs may omit it,"
        " the token and the server's verification)",
    )
    client.add_argument(
        "--token",
        default=None,
        help="bearer token (prefer --token-file or TRIO_SYNC_TOKEN: other users see arguments)",
    )
    client.add_argument("--token-file", type=Path, default=None, help="read the token from FILE")
    client.add_argument(
        "--ca-cert", type=Path, default=None, help="verify an https server against this CA (PEM)"
    )
    client.add_argument(
        "--fingerprint",
        default=None,
        help="trust the https server whose certificate has this SHA-256 fingerprint (as the"
        " server printed it: SHA256:AB:CD:...)",
    )
    client.add_argument(
        "--allow-insecure-http",
        action="store_true",
        help="allow http:// to another machine (the token and every file cross in clear)",
    )
    client.add_argument("--once", action="store_true", help="reconcile once, then exit")
    client.add_argument(
        "-q", "--quiet", action="store_true", help="errors only: no progress, no log of each file"
    )
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
    client.add_argument(
        "--max-delete-percent",
        type=_percent,
        default=50.0,
        help="hold back deletions when more than this share of the synced files is gone (and"
        " at least 10); confirm with confirm-deletes (default: 50)",
    )
    client.add_argument(
        "--max-delete-files",
        type=_positive_int,
        default=1000,
        help="hold back deletions when more than this many synced files are gone (default: 1000)",
    )

    history = sub.add_parser(
        "history", help="every kept version of a file, or what was deleted in a folder"
    )
    history.add_argument("path", type=Path, help="a file or folder inside a synced folder")
    history.add_argument("--json", action="store_true", help="the server's answer as JSON")

    restore = sub.add_parser(
        "restore", help="bring back a kept version (or a folder as it was) as a new change"
    )
    restore.add_argument("path", type=Path, help="a file or folder inside a synced folder")
    when = restore.add_mutually_exclusive_group(required=True)
    when.add_argument("--rev", type=_positive_int, help="the version to bring back (see history)")
    when.add_argument(
        "--before",
        help="the state at TIME: 2026-12-01T10:00 (local unless it has an offset) or an age"
        " such as 90m, 2h, 3d; on a folder, every file below it",
    )
    restore.add_argument("--to", type=Path, default=None, help="restore there instead")
    restore.add_argument("--json", action="store_true", help="the server's answer as JSON")

    status_ = sub.add_parser(
        "status", help="is a folder in sync? what waits, what failed, what is held back"
    )
    status_.add_argument("dir", type=Path, nargs="?", default=Path(), help="(default: here)")
    status_.add_argument("--json", action="store_true", help="as JSON")

    conflicts_ = sub.add_parser("conflicts", help="the conflict copies in a synced folder")
    conflicts_.add_argument("dir", type=Path, nargs="?", default=Path(), help="(default: here)")
    conflicts_.add_argument("--json", action="store_true", help="as JSON")
    conflicts_.add_argument(
        "--resolve", metavar="PATH", type=Path, default=None, help="settle this conflict copy"
    )
    conflicts_.add_argument(
        "--keep",
        choices=("mine", "theirs", "both"),
        help="with --resolve: mine puts the copy in place of the original, theirs deletes the"
        " copy, both gives the copy a plain name beside the original",
    )

    confirm = sub.add_parser(
        "confirm-deletes", help="let a client send the deletions its mass-delete guard holds"
    )
    confirm.add_argument("dir", type=Path, help="the synced folder")
    return parser


#: Held back from the moment the process starts until `_until_signal` handles them.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def hold_stop_signals() -> None:
    """Keep SIGINT and SIGTERM pending, not fatal, until the handler is in place: a stop in the
    first milliseconds would otherwise end the process before it could clean up."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def main(argv: Sequence[str] | None = None) -> int:
    hold_stop_signals()
    args = _parser().parse_args(argv)
    limit_allocator_arenas()
    quiet = args.command == "client" and args.quiet
    # A client on a terminal shows progress bars; its log lines are printed above them.
    console = Console(stderr=True) if args.command == "client" and sys.stderr.isatty() else None
    writer = LogWriter(sys.stderr)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.ERROR if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        handlers=[_ConsoleHandler(console) if console else writer],
    )
    if not args.verbose:
        for noisy in ("httpx", "httpcore", "hpack"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "token":
        return _token_command(args)
    if args.command == "confirm-deletes":
        return _confirm_deletes(args.dir.expanduser().resolve())
    if args.command in ("history", "restore"):
        return _history_command(args)
    if args.command in ("status", "conflicts"):
        return _status_command(args)
    token = args.token or os.environ.get("TRIO_SYNC_TOKEN") or None
    if args.command == "client" and args.token_file is not None:
        try:
            token = args.token_file.expanduser().read_text(encoding="utf-8").strip() or None
        except OSError as e:
            print(f"trio-sync: --token-file: {e}", file=sys.stderr)
            return EXIT_USAGE
    if args.command == "server":
        if (args.tls_cert is None) != (args.tls_key is None):
            print("trio-sync: --tls-cert and --tls-key go together", file=sys.stderr)
            return EXIT_USAGE
        server_config = ServerConfig(
            data_dir=(args.data_dir or default_data_dir()).expanduser().resolve(),
            host=args.host,
            port=args.port,
            token=token,
            keep_history_days=args.keep_history_days,
            max_connections=args.max_connections,
            access_log=args.access_log.expanduser().resolve() if args.access_log else None,
            tls_cert=args.tls_cert.expanduser().resolve() if args.tls_cert else None,
            tls_key=args.tls_key.expanduser().resolve() if args.tls_key else None,
            direct_store=args.direct_store,
        )
        return trio.run(partial(server_main, server_config, log_writer=writer))
    root = args.dir.expanduser().resolve()
    remember = args.server is not None
    if not remember:
        loaded = load_settings(root / STATE_DIR_NAME)
        if loaded is None:
            print(
                f"trio-sync: no --server given, and none saved in {root / STATE_DIR_NAME}:"
                " the first run needs --server URL and a token",
                file=sys.stderr,
            )
            return EXIT_USAGE
        saved, saved_token = loaded
        args.server = saved.server_url
        args.fingerprint = args.fingerprint or saved.fingerprint
        args.ca_cert = args.ca_cert or (Path(saved.ca_cert) if saved.ca_cert else None)
        args.allow_insecure_http = args.allow_insecure_http or saved.allow_insecure_http
        args.name = args.name or saved.name
        token = token or saved_token
    if not token:
        print(
            "trio-sync: a token is needed: --token-file FILE (or --token, TRIO_SYNC_TOKEN)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    name = args.name or default_client_name()
    try:
        check_name(name)
    except ProtocolError as e:
        print(f"trio-sync: --name: {e}", file=sys.stderr)
        return EXIT_USAGE
    problem = _server_url_problem(args)
    if problem:
        print(f"trio-sync: {problem}", file=sys.stderr)
        return EXIT_USAGE
    pin = parse_fingerprint(args.fingerprint) if args.fingerprint else None
    ca_cert = args.ca_cert.expanduser().resolve() if args.ca_cert else None
    if remember:
        saved = Saved(
            args.server, name, args.fingerprint, str(ca_cert) if ca_cert else None,
            args.allow_insecure_http,
        )  # fmt: skip
        try:
            save_settings(root / STATE_DIR_NAME, saved, token)
        except OSError as e:
            print(f"trio-sync: cannot save the settings in {root}: {e}", file=sys.stderr)
            return EXIT_USAGE
    config = ClientConfig(
        root=root,
        server_url=args.server,
        ca_cert=ca_cert,
        fingerprint=pin,
        token=token,
        name=name,
        compress=args.compress,
        max_delete_fraction=args.max_delete_percent / 100,
        max_delete_files=args.max_delete_files,
    )
    return trio.run(
        partial(
            client_main,
            config,
            args.once,
            progress=not quiet,
            console=console,
            log_writer=None if console else writer,
        )
    )


def _server_url_problem(args: argparse.Namespace) -> str | None:
    """Why the client must not use --server as given (checked before any connection)."""
    url = urlsplit(args.server)
    if url.scheme not in ("http", "https") or not url.hostname:
        return f"--server must be an http:// or https:// URL: {args.server!r}"
    if url.scheme == "http" and not is_loopback(url.hostname) and not args.allow_insecure_http:
        return (
            f"refusing http:// to {url.hostname}: the token and every file would cross the"
            " network in clear. Use the https:// URL the server printed (with its"
            " --fingerprint), or --allow-insecure-http if this network is yours alone"
        )
    if args.fingerprint is not None:
        if url.scheme != "https":
            return "--fingerprint needs an https:// server URL"
        try:
            parse_fingerprint(args.fingerprint)
        except ValueError as e:
            return f"--fingerprint: {e}"
    return None


def _history_command(args: argparse.Namespace) -> int:
    try:
        where = Where(args.path)
        if args.command == "history":
            return trio.run(show_history, where, args.json)
        before = parse_when(args.before) if args.before is not None else None
        to = destination(where, args.to) if args.to is not None else None
        return trio.run(
            partial(restore, where, rev=args.rev, before=before, to=to, as_json=args.json)
        )
    except ValueError as e:
        print(f"trio-sync: {e}", file=sys.stderr)
        return EXIT_USAGE
    except AuthenticationFailed as e:
        print(f"trio-sync: the server rejected the token: {e}", file=sys.stderr)
        return EXIT_AUTH
    except ServerNotTrusted as e:
        print(f"trio-sync: {e}", file=sys.stderr)
        return EXIT_NOT_TRUSTED
    except ServerUnavailable as e:
        print(f"trio-sync: cannot reach the server: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except TrioSyncError as e:
        print(f"trio-sync: {e}", file=sys.stderr)
        return EXIT_OUT_OF_SYNC


class _ConsoleHandler(logging.Handler):
    """Log lines through rich's console, so that they go above the progress bars."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self._console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:
            self.handleError(record)


def _status_command(args: argparse.Namespace) -> int:
    folder = synced_folder_of(args.dir.expanduser().absolute())
    if folder is None:
        print(f"trio-sync: {args.dir} is not inside a synced folder", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "conflicts" and args.resolve is not None:
        if args.keep is None:
            print("trio-sync: --resolve needs --keep mine|theirs|both", file=sys.stderr)
            return EXIT_USAGE
        try:
            given = args.resolve.expanduser()
            if not given.is_absolute() and not given.exists():
                given = folder / given  # a path relative to DIR
            copy = given.absolute().relative_to(folder).as_posix()
            print(resolve_conflict(folder, copy, args.keep))
        except (ValueError, OSError) as e:
            print(f"trio-sync: {e}", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK
    if args.command == "conflicts":
        found = status.conflicts(folder)
        if args.json:
            print(json.dumps(found, indent=1))
        for c in [] if args.json else found:
            print(c["path"])
            print(f"    a copy of {c['original']}, set aside {c['when']} by {c['client']}")
        if not found and not args.json:
            print(f"no conflict copies in {folder}")
        return EXIT_OK if not found else EXIT_OUT_OF_SYNC
    report = status.ask(folder) or status.on_disk(folder)
    report["conflicts"] = len(status.conflicts(folder))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(_describe(folder, report))
    return EXIT_OK if report.get("in_sync") else EXIT_OUT_OF_SYNC


def _describe(folder: Path, r: dict[str, Any]) -> str:
    lines = [f"{folder}"]
    if not r.get("running"):
        lines.append(
            f"  no client is running here (server: {r.get('server')}); start one with"
            f" `trio-sync client {folder}`"
        )
    elif r.get("connected"):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["connected_since"]))
        lines.append(f"  connected to {r.get('server')} as {r.get('name')} since {since}")
    else:
        lines.append(f"  running, but not connected to {r.get('server')}: {r.get('last_error')}")
    if r.get("in_sync"):
        lines.append("  in sync")
    elif r.get("running"):
        up, down = r.get("waiting_up") or {}, r.get("waiting_down") or {}
        lines.append(
            f"  waiting: {up.get('files', 0):,} files ({format_size(up.get('bytes', 0))}) to go"
            f" up, {down.get('files', 0):,} ({format_size(down.get('bytes', 0))}) to come down;"
            f" {r.get('waiting', 0):,} paths to look at, {r.get('moving_count', 0):,} being"
            " worked on"
        )
        transfers = r.get("transfers") or []
        for t in transfers:
            lines.append(
                f"    {'↑' if t['direction'] == 'up' else '↓'} {t['path']}:"
                f" {format_size(t['done'])} of {format_size(t['total'])}"
                f" ({100 * t['done'] // max(t['total'], 1)}%), {format_size(t['rate'])}/s"
            )
        moving = {t["path"] for t in transfers}
        for path in r.get("moving") or []:
            if path not in moving:
                lines.append(f"    working on {path}")
    held = r.get("held_deletes")
    if held:
        lines.append(
            f"  DELETIONS HELD BACK: {held.get('reason')}. If you meant them:"
            f" `trio-sync confirm-deletes {folder}`; if not, put the files back."
        )
    for path, why in sorted((r.get("failed") or {}).items()):
        lines.append(f"  failed: {path}: {why}")
    for path, why in sorted((r.get("skipped") or {}).items()):
        lines.append(f"  skipped: {path}: {why}")
    ignored = r.get("ignored") or {}
    if ignored.get("count"):
        examples = ", ".join(ignored.get("examples") or [])
        lines.append(f"  ignored by .trio-syncignore: {ignored['count']:,} (such as {examples})")
    if r.get("conflicts"):
        lines.append(f"  {r['conflicts']} conflict copies: `trio-sync conflicts {folder}`")
    if r.get("last_error") and r.get("connected"):
        lines.append(f"  last error: {r['last_error']}")
    return "\n".join(lines)


def _confirm_deletes(folder: Path) -> int:
    state_dir = folder / STATE_DIR_NAME
    if not state_dir.is_dir():
        print(
            f"trio-sync: {folder} is not a synced folder (no {STATE_DIR_NAME} in it)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        held = confirm(state_dir)
    except OSError as e:
        print(f"trio-sync: cannot confirm in {state_dir}: {e}", file=sys.stderr)
        return EXIT_USAGE
    if held is None:
        print(
            f"Confirmed. No deletions are held in {folder} now; this confirms the next hold"
            " within an hour."
        )
    else:
        print(
            f"Confirmed: {held.get('reason')}. The running client sends the deletions within"
            " a second (or the next one to start, within an hour)."
        )
    return EXIT_OK


def _token_command(args: argparse.Namespace) -> int:
    data_dir = (args.data_dir or default_data_dir()).expanduser().resolve()
    try:
        store = TokenStore.open(data_dir)
    except (OSError, sqlite3.Error) as e:
        print(f"trio-sync: cannot open the tokens in {data_dir}: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.action == "add":
            token = store.add(args.name)
            print(f"Token for {args.name} (shown only this once):\n  {token}")
            print("Save it in a file only that client's user can read; pass it with --token-file.")
        elif args.action == "revoke":
            if not store.revoke(args.name):
                print(f"trio-sync: no token named {args.name!r}", file=sys.stderr)
                return EXIT_USAGE
            print(f"revoked {args.name}: a running server turns it away within a second")
        else:
            print(f"{'NAME':24} {'CREATED':20} {'LAST SEEN':20} FROM")
            for info in store.list():
                name = f"{info.name} (shared)" if info.shared else info.name
                print(
                    f"{name:24} {_when(info.created):20} {_when(info.last_seen):20}"
                    f" {info.last_from or '-'}"
                )
    except (ProtocolError, StoreError) as e:
        print(f"trio-sync: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        store.close()
    return EXIT_OK


def _reachable(url: str) -> str:
    """*url* with an address other machines can use in place of "listen on every address"."""
    parts = urlsplit(url)
    if parts.hostname in ("0.0.0.0", "::"):
        return f"{parts.scheme}://{socket.gethostname()}:{parts.port}"
    return url


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


async def _until_signal(
    cancel_scope: trio.CancelScope,
    stop: trio.Event | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Started with `nursery.start` before any work: a signal that came before the handler was
    in place would end the process on the spot, with its temp files left behind."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one held back arrives now
        task_status.started()
        async for signum in signals:
            log.info("received %s, stopping", signal.Signals(signum).name)
            if stop is not None:
                stop.set()  # graceful: the server ends streams and drains requests itself
            else:
                cancel_scope.cancel()
            return


async def server_main(config: ServerConfig, *, log_writer: LogWriter | None = None) -> int:
    """Run a server until SIGINT or SIGTERM; the exit code. *log_writer*, if given, writes
    the log while it runs."""
    stop = trio.Event()
    code = EXIT_OK
    async with trio.open_nursery() as outer:
        if log_writer is not None:
            await outer.start(log_writer.run)
        await outer.start(_until_signal, outer.cancel_scope, stop)
        try:
            async with trio.open_nursery() as inner:
                running: RunningServer = await inner.start(partial(run_server, config, stop=stop))
                log.info("data dir: %s", config.data_dir)
                log.info("listening on %s (server id %s)", running.url, running.server_id)
                if running.legacy_token_taken:
                    log.info(
                        "the token file of the earlier version is now the token %r, stored"
                        " hashed; its clients keep working",
                        SHARED,
                    )
                url = _reachable(running.url)
                pin = f" --fingerprint {running.fingerprint}" if running.self_signed else ""
                if running.fingerprint is not None:
                    log.info("TLS certificate fingerprint: %s", running.fingerprint)
                if running.new_token is not None:
                    print(
                        f"A token for your first client (shown only this once):\n"
                        f"  {running.new_token}\n"
                        f"Save it in a file only you can read, then connect with:\n"
                        f"  trio-sync client DIR --server {url}{pin} --token-file FILE\n"
                        f"Each further client gets its own: trio-sync token add NAME"
                        f" --data-dir {config.data_dir}",
                        flush=True,
                    )
                else:
                    print(
                        f"Connect a client with:\n  trio-sync client DIR --server {url}{pin}"
                        f" --token-file FILE\n(a token for it: trio-sync token add NAME"
                        f" --data-dir {config.data_dir})",
                        flush=True,
                    )
        except* (OSError, StoreError) as group:  # the nursery wraps what failed in a group
            for e in group.exceptions:
                log.error("cannot start the server: %s", e)
            code = EXIT_OUT_OF_SYNC
        finally:
            outer.cancel_scope.cancel()
    return code


async def client_main(
    config: ClientConfig,
    once: bool,
    *,
    progress: bool = True,
    console: Console | None = None,
    log_writer: LogWriter | None = None,
) -> int:
    """Run a client (one reconcile with *once*, else until SIGINT or SIGTERM); the exit code.
    With *progress*, big transfers are shown: as bars on *console*, else in the log.
    *log_writer*, if given, writes the log while it runs."""
    engine = Engine(config)
    code = EXIT_OK
    async with trio.open_nursery() as nursery:
        if log_writer is not None:
            await nursery.start(log_writer.run)
        await nursery.start(_until_signal, nursery.cancel_scope)
        if progress:
            nursery.start_soon(show_progress, engine.progress, console)
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
        except ServerNotTrusted as e:
            log.error("%s; nothing was sent to it (check --server, --fingerprint, --ca-cert)", e)
            code = EXIT_NOT_TRUSTED
        except AuthenticationFailed as e:
            log.error("%s; check --token-file / TRIO_SYNC_TOKEN", e)
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

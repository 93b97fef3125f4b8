"""The `trio-sync` command as users run it: real subprocesses, real signals, exit codes."""

from __future__ import annotations

import mmap
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from trio_sync.core.direct import DIRECT_MIN
from trio_sync.core.tls import certificate_fingerprint

from .conftest import eventually, resident_pages, takes_o_direct, tree

pytestmark = pytest.mark.slow

COMMAND = [sys.executable, "-m", "trio_sync"]
Spawn = Callable[..., Awaitable["Proc"]]


@dataclass
class Proc:
    process: trio.Process
    output: bytearray

    async def terminate(self, timeout: float = 10.0) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(timeout):
            return await self.process.wait()


async def _pump(stream: trio.abc.ReceiveStream, sink: bytearray) -> None:
    async for piece in stream:
        sink += piece


@pytest.fixture
async def spawn(nursery: trio.Nursery) -> AsyncIterator[Spawn]:
    """Start `trio-sync ARGS...`; every process is terminated (then killed) at teardown."""
    procs: list[Proc] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> Proc:
        process = await trio.lowlevel.open_process(
            [*COMMAND, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        proc = Proc(process, bytearray())
        assert process.stdout is not None
        nursery.start_soon(_pump, process.stdout, proc.output)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.process.returncode is None:
            proc.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await proc.process.wait()
            if proc.process.returncode is None:
                proc.process.kill()
                await proc.process.wait()


async def run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout):
        return await trio.run_process(
            [*COMMAND, *args], capture_stdout=True, capture_stderr=True, check=False
        )


async def start_server(spawn: Spawn, data_dir: Path, *extra: str) -> tuple[Proc, str, str]:
    """A server process, its URL, and the token it printed for a first client (or the one
    given with --token)."""
    proc: Proc = await spawn("server", "--data-dir", str(data_dir), "--port", "0", *extra)
    pattern = re.compile(rb"--server (http://\S+) --token-file")
    await eventually(lambda: pattern.search(proc.output) is not None, timeout=20)
    match = pattern.search(proc.output)
    assert match is not None
    printed = re.search(rb"shown only this once\):\n  (\S+)\n", proc.output)
    if printed:
        token = printed[1].decode()
    else:  # given, or made at an earlier start
        token = extra[extra.index("--token") + 1] if "--token" in extra else ""
    return proc, match[1].decode(), token


async def test_server_prints_a_first_token_once_and_keeps_only_its_hash(
    spawn: Spawn, tmp_path: Path
) -> None:
    proc, url, token = await start_server(spawn, tmp_path / "data")
    assert str(tmp_path / "data") in proc.output.decode()
    stored = b"".join(p.read_bytes() for p in (tmp_path / "data").iterdir() if p.is_file())
    assert token.encode() not in stored

    (tmp_path / "dir").mkdir()
    (tmp_path / "dir/hello.txt").write_text("hello")
    result = await run("client", str(tmp_path / "dir"), "--server", url, "--token", token, "--once")
    assert result.returncode == 0, result.stderr.decode()
    assert "uploaded hello.txt" in result.stderr.decode()
    assert await proc.terminate() == 0


async def test_once_exit_codes(spawn: Spawn, tmp_path: Path) -> None:
    _, url, token = await start_server(spawn, tmp_path / "data", "--token", "right")
    a = tmp_path / "a"

    wrong = await run("client", str(a), "--server", url, "--token", "wrong", "--once")
    assert wrong.returncode == 3
    assert b"rejected our token" in wrong.stderr

    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
        unreachable = await run("client", str(a), "--server", dead, "--token", token, "--once")
    assert unreachable.returncode == 4
    assert b"cannot sync" in unreachable.stderr

    missing = await run("client", str(a), "--server", url, "--once")
    assert missing.returncode == 2

    a.mkdir(exist_ok=True)
    (a / "fine.txt").write_text("fine")
    (a / "bad\x01name").write_text("a name with a control character")
    unsyncable = await run("client", str(a), "--server", url, "--token", token, "--once")
    assert unsyncable.returncode == 1
    assert b"cannot be synced" in unsyncable.stderr
    (a / "bad\x01name").unlink()
    synced = await run("client", str(a), "--server", url, "--token", token, "--once")
    assert synced.returncode == 0


async def add_token(data_dir: Path, name: str, file: Path) -> None:
    """`trio-sync token add NAME`, its token saved to *file* as a user would."""
    added = await run("token", "--data-dir", str(data_dir), "add", name)
    assert added.returncode == 0, added.stderr.decode()
    match = re.search(rb"shown only this once\):\n  (\S+)\n", added.stdout)
    assert match is not None
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, match[1] + b"\n")
    os.close(fd)


async def test_two_live_clients_as_processes(spawn: Spawn, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _, url, token = await start_server(spawn, data)
    a, b = tmp_path / "a", tmp_path / "b"
    await add_token(data, "b", tmp_path / "b.token")
    env = {"TRIO_SYNC_TOKEN": token}
    client_a: Proc = await spawn("client", str(a), "--server", url, "--name", "a", env=env)
    client_b: Proc = await spawn(
        "client", str(b), "--server", url, "--name", "b", "--token-file", str(tmp_path / "b.token")
    )
    await eventually(lambda: b"in sync" in client_a.output and b"in sync" in client_b.output, 20)

    (a / "sub").mkdir()
    (a / "sub/note.txt").write_text("from process a")
    await eventually(lambda: (b / "sub/note.txt").exists(), 20)
    assert (b / "sub/note.txt").read_text() == "from process a"

    assert await client_a.terminate() == 0
    assert await client_b.terminate() == 0
    for root in (a, b):
        assert list((root / ".trio-sync").glob("**/*.part")) == []
        assert not (root / ".trio-sync/tmp").exists()
    assert tree(a) == tree(b)


async def test_sigterm_ends_streams_and_drops_half_uploads(spawn: Spawn, tmp_path: Path) -> None:
    proc, url, token = await start_server(spawn, tmp_path / "data")
    headers = {"Authorization": f"Bearer {token}"}
    half_sent = trio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"x" * 65536
        half_sent.set()
        await trio.sleep(30)
        yield b"never"

    stream_ended = trio.Event()

    async def follow_stream() -> None:
        async with (
            httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client,
            client.stream("GET", "/sync") as response,
        ):
            with suppress(httpx.TransportError):
                async for _ in response.aiter_raw():
                    pass
        stream_ended.set()

    async def upload() -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
            with suppress(httpx.TransportError):
                await client.put("/chunks/" + "a" * 64, content=slow_body())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow_stream)
        nursery.start_soon(upload)
        await half_sent.wait()
        await trio.sleep(0.2)
        started = trio.current_time()
        code = await proc.terminate(timeout=10)
        assert code == 0
        assert trio.current_time() - started < 8
        with trio.fail_after(5):
            await stream_ended.wait()
        nursery.cancel_scope.cancel()
    assert list((tmp_path / "data/tmp").iterdir()) == []
    assert not any((tmp_path / "data/chunks").rglob("a" * 64))


async def test_server_refuses_a_store_chunked_another_way(spawn: Spawn, tmp_path: Path) -> None:
    proc, url, token = await start_server(spawn, tmp_path / "data")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir/notes.txt").write_text("notes")
    result = await run("client", str(tmp_path / "dir"), "--server", url, "--token", token, "--once")
    assert result.returncode == 0, result.stderr.decode()
    assert await proc.terminate() == 0
    again, _, _ = await start_server(spawn, tmp_path / "data")  # the same chunker: fine
    assert await again.terminate() == 0

    # As a store from before the chunker was recorded looks: files, and no `chunker` key.
    with sqlite3.connect(tmp_path / "data/index.db") as db:
        db.execute("DELETE FROM meta WHERE key = 'chunker'")
    db.close()
    refused = await run("server", "--data-dir", str(tmp_path / "data"), "--port", "0")
    assert refused.returncode == 1
    assert b"cannot start the server" in refused.stderr
    assert b"chunked as 'fastcdc-2016/256K-1M-4M/blake3'" in refused.stderr
    assert b"Traceback" not in refused.stderr


@pytest.mark.parametrize("cached", [False, True], ids=["direct", "cached"])
async def test_a_server_told_to_keep_chunks_out_of_the_page_cache(
    spawn: Spawn, tmp_path: Path, cached: bool
) -> None:
    if not cached and not takes_o_direct(tmp_path):
        pytest.skip("this filesystem does not take O_DIRECT")
    extra = [] if cached else ["--direct-store"]
    proc, url, token = await start_server(spawn, tmp_path / "data", *extra)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir/big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    result = await run("client", str(tmp_path / "dir"), "--server", url, "--token", token, "--once")
    assert result.returncode == 0, result.stderr.decode()
    assert await proc.terminate() == 0
    chunks = [p for p in (tmp_path / "data/chunks").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in chunks) == 3 * 1024 * 1024 + 5
    assert max(p.stat().st_size for p in chunks) >= DIRECT_MIN
    # The kernel may reclaim cached pages at any time (this VM's kdamond does), so the direct
    # store is held to at most the pages it may leave, and the cached one, the control that
    # mincore sees pages at all, to most of its pages.
    pages = resident = 0
    for chunk in chunks:
        size = chunk.stat().st_size
        whole = -(-size // mmap.PAGESIZE)
        here = resident_pages(chunk)
        pages += whole
        resident += here
        # A file's last chunk may be small: files under DIRECT_MIN go through the cache whole.
        if not cached:
            assert here <= (whole if size < DIRECT_MIN else 1)
    if cached:
        assert resident >= pages // 2


async def test_server_on_a_port_in_use_says_so(tmp_path: Path) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = str(sock.getsockname()[1])
        result = await run("server", "--data-dir", str(tmp_path / "data"), "--port", port)
    assert result.returncode == 1
    assert b"cannot start the server" in result.stderr
    assert b"Traceback" not in result.stderr


async def test_a_second_server_on_the_same_data_folder_is_refused(
    spawn: Spawn, tmp_path: Path
) -> None:
    first, url, token = await start_server(spawn, tmp_path / "data")
    second = await run("server", "--data-dir", str(tmp_path / "data"), "--port", "0")
    assert second.returncode == 1
    assert b"another trio-sync server is using" in second.stderr
    assert b"Traceback" not in second.stderr
    async with httpx.AsyncClient() as http:  # the first one serves on, untouched
        response = await http.get(f"{url}/info", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
    assert await first.terminate() == 0
    again, _, _ = await start_server(spawn, tmp_path / "data")  # the lock went with it
    assert await again.terminate() == 0


async def test_tokens_are_added_listed_and_revoked_while_the_server_runs(
    spawn: Spawn, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    server, url, _ = await start_server(spawn, data)
    await add_token(data, "laptop", tmp_path / "laptop.token")
    duplicate = await run("token", "--data-dir", str(data), "add", "laptop")
    assert duplicate.returncode == 2
    assert b"exists already" in duplicate.stderr

    laptop: Proc = await spawn(
        "client", str(tmp_path / "dir"), "--server", url, "--token-file",
        str(tmp_path / "laptop.token"),
    )  # fmt: skip
    await eventually(lambda: b"in sync" in laptop.output, 20)
    seen = re.compile(rb"^laptop .* 127\.0\.0\.1$", re.M)  # when it was last seen, from where
    with trio.fail_after(15):
        while not seen.search(  # noqa: ASYNC110 - the store is another process's file
            (listing := await run("token", "--data-dir", str(data), "list")).stdout
        ):
            await trio.sleep(0.2)
    assert listing.returncode == 0
    assert re.search(rb"^first ", listing.stdout, re.M)

    revoked = await run("token", "--data-dir", str(data), "revoke", "laptop")
    assert revoked.returncode == 0
    with trio.fail_after(15):
        assert await laptop.process.wait() == 3  # the server rejected the token
    assert b"rejected our token" in laptop.output
    unknown = await run("token", "--data-dir", str(data), "revoke", "laptop")
    assert unknown.returncode == 2
    assert await server.terminate() == 0


async def test_an_older_servers_token_keeps_working_after_the_upgrade(
    spawn: Spawn, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "token").write_text("a-token-from-before-names\n")  # as the earlier version left it
    server, url, _ = await start_server(spawn, data, "--token", "unused-marker")
    await server.terminate()
    server, url, _ = await start_server(spawn, data, "--token", "unused-marker")
    assert not (data / "token").exists()
    (tmp_path / "dir").mkdir()
    env_token = "a-token-from-before-names"
    result = await run(
        "client", str(tmp_path / "dir"), "--server", url, "--token", env_token, "--once"
    )
    assert result.returncode == 0, result.stderr.decode()
    assert await server.terminate() == 0


async def test_the_cli_refuses_clear_http_to_another_machine(tmp_path: Path) -> None:
    # 0.0.0.0 is not loopback by name, but a connection to it would stay on this machine.
    refused = await run(
        "client", str(tmp_path / "d"), "--server", "http://0.0.0.0:9", "--token", "t"
    )
    assert refused.returncode == 2
    assert b"refusing http://" in refused.stderr
    assert not (tmp_path / "d").exists()  # refused before anything else happened


async def test_a_server_on_every_address_makes_a_certificate_and_prints_its_fingerprint(
    spawn: Spawn, tmp_path: Path
) -> None:
    server = await spawn("server", "--data-dir", str(tmp_path / "data"), "--host", "0.0.0.0",
                         "--port", "0")  # fmt: skip
    pattern = re.compile(rb"--server https://\S+:(\d+) --fingerprint (SHA256:\S+) --token-file")
    await eventually(lambda: pattern.search(server.output) is not None, timeout=20)
    match = pattern.search(server.output)
    assert match is not None
    assert match[2].decode() == certificate_fingerprint(tmp_path / "data/tls/cert.pem")
    token = re.search(rb"shown only this once\):\n  (\S+)\n", server.output)
    assert token is not None
    url = f"https://127.0.0.1:{match[1].decode()}"
    common = ["--server", url, "--token", token[1].decode(), "--once"]
    ok = await run("client", str(tmp_path / "a"), *common, "--fingerprint", match[2].decode())
    assert ok.returncode == 0, ok.stderr.decode()
    wrong = await run(
        "client", str(tmp_path / "b"), *common, "--fingerprint", "SHA256:" + "00" * 32
    )
    assert wrong.returncode == 5
    assert b"nothing was sent" in wrong.stderr
    assert await server.terminate() == 0


async def test_a_client_stopped_as_it_starts_leaves_no_temp_files(
    spawn: Spawn, tmp_path: Path
) -> None:
    """The soak found one: SIGTERM just after the client made its temp folder, before its
    signal handler was in place, ended it on the spot. The handler now comes first."""
    _, url, token = await start_server(spawn, tmp_path / "data")
    for attempt in range(5):
        folder = tmp_path / f"dir{attempt}"
        client: Proc = await spawn("client", str(folder), "--server", url, "--token", token)
        with trio.fail_after(20):
            while not (folder / ".trio-sync/tmp").exists():  # noqa: ASYNC110 - another process
                await trio.sleep(0.001)
        assert await client.terminate() == 0
        assert not (folder / ".trio-sync/tmp").exists()


async def test_a_stop_that_comes_before_the_handler_waits_for_it(
    spawn: Spawn, tmp_path: Path
) -> None:
    """A SIGTERM in the first moments (before the handler is in place) is held, then handled:
    a clean exit, not death by signal."""
    _, url, token = await start_server(spawn, tmp_path / "data")
    folder = tmp_path / "early"
    code = (
        "import os, signal, sys\n"
        "from trio_sync import cli\n"
        "cli.hold_stop_signals()\n"
        "os.kill(os.getpid(), signal.SIGTERM)  # pending from the start\n"
        f"args = ['client', {str(folder)!r}, '--server', {url!r}, '--token', {token!r}]\n"
        "sys.exit(cli.main(args))\n"
    )
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False
        )
    assert done.returncode == 0, done.stderr.decode()
    assert b"received SIGTERM" in done.stderr
    assert not (folder / ".trio-sync/tmp").exists()


async def test_a_client_on_a_terminal_shows_big_transfers_and_a_quiet_one_only_errors(
    spawn: Spawn, nursery: trio.Nursery, tmp_path: Path
) -> None:
    _, url, token = await start_server(spawn, tmp_path / "data")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "big.bin").write_bytes(os.urandom(64 * 1024 * 1024))
    # Client A's output is a terminal (a pseudo-terminal we read), as when run by hand.
    master, slave = os.openpty()
    env = {**os.environ, "TRIO_SYNC_TOKEN": token, "TERM": "xterm-256color", "COLUMNS": "120"}
    process = await trio.lowlevel.open_process(
        [*COMMAND, "client", str(a), "--server", url, "--name", "a"],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env,
    )  # fmt: skip
    os.close(slave)
    screen = bytearray()

    async def read_terminal() -> None:
        with suppress(OSError, trio.BrokenResourceError):  # EIO once the client is gone
            async with trio.lowlevel.FdStream(master) as terminal:
                async for piece in terminal:
                    screen.extend(piece)

    nursery.start_soon(read_terminal)
    try:
        await eventually(lambda: b"in sync with" in screen, 60)
        quiet = await spawn("client", str(b), "--server", url, "--name", "b", "--quiet", env=env)
        await eventually(lambda: (b / "big.bin").exists(), 60)
        assert await quiet.terminate() == 0
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await process.wait()
    assert process.returncode == 0
    shown = screen.decode(errors="replace")
    assert "↑ big.bin" in shown  # a bar for the big upload, with bytes, rate and time left
    assert re.search(r"\d+\.\d/64\.0 MiB", shown)
    assert re.search(r"in sync with \S+ \(1 up \(64\.0 MiB\) in [\d.]+ s\)", shown)
    assert (b / "big.bin").read_bytes() == (a / "big.bin").read_bytes()
    assert b" INFO " not in quiet.output, quiet.output.decode()  # errors only

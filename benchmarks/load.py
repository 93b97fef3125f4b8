"""Load: many live clients (event streams) on one server while changes arrive.

Run by `nox -s bench` after bench.py; writes the "Load" section of docs/benchmarks.md (the
block between its markers, in the part a run of bench.py keeps). `--clients N` and
`--changes N` change the size; `--quick` is a smoke test.

Three processes: the server (`trio-sync server`), the listeners (this file with `--listen`:
one task and one connection per client, each with its own token, reading its `/sync` stream
and noting when each revision arrives), and this process, which commits changes at a steady
pace and asks `GET /info` every 25 ms throughout. Clocks are CLOCK_MONOTONIC, shared by all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio
from report import cpu_seconds, percentile, rss_mib, write_section

from trio_sync.server.tokens import TokenStore

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- load: written by benchmarks/load.py -->", "<!-- /load -->"
_ID = re.compile(rb"^id: (\d+)$", re.MULTILINE)


# -- the listeners' process --------------------------------------------------------------


async def listen(url: str, tokens: list[str], ready_file: Path) -> dict[int, list[float]]:
    """One raw HTTP/1.1 connection per token on `/sync`; returns rev -> arrival times."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    arrived: dict[int, list[float]] = {}
    connected = 0
    all_connected = trio.Event()

    async def one(token: str) -> None:
        nonlocal connected
        stream = await trio.open_tcp_stream(host, int(port))
        request = (
            f"GET /sync HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        )
        await stream.send_all(request.encode())
        pending = b""
        first = True
        while data := await stream.receive_some(65536):
            now = time.monotonic()
            if first and b"event: hello" in data:
                first = False
                connected += 1
                if connected == len(tokens):
                    all_connected.set()
            pending += data
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            for match in _ID.finditer(pending, 0, cut):
                arrived.setdefault(int(match[1]), []).append(now)
            pending = pending[cut + 2 :]

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            for token in tokens:
                nursery.start_soon(one, token)
            await all_connected.wait()
            ready_file.write_text("ready")  # noqa: ASYNC240 - once, tiny
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    scope.cancel()
                    break
    return arrived


def listener_main(url: str, tokens_file: Path, ready_file: Path, out: Path) -> None:
    tokens = tokens_file.read_text().split()
    arrived = trio.run(listen, url, tokens, ready_file)
    out.write_text(json.dumps(arrived))


# -- the orchestrating process -----------------------------------------------------------


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def drive(
    url: str, token: str, changes: int, pace: float
) -> tuple[dict[int, float], list[float]]:
    """Commit *changes* folders, one every *pace* seconds, while probing `GET /info`.
    Returns rev -> when its commit was answered, and the probe latencies."""
    committed: dict[int, float] = {}
    probes: list[float] = []
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as writer, \
            httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as prober:  # fmt: skip

        async def probe() -> None:
            while True:
                started = time.monotonic()
                (await prober.get("/info")).raise_for_status()
                probes.append(time.monotonic() - started)
                await trio.sleep(max(0.0, 0.025 - (time.monotonic() - started)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe)
            await trio.sleep(1)  # the probe's figures include a quiet second first
            for i in range(changes):
                started = time.monotonic()
                body = {"path": f"load/{i:05d}", "base_rev": 0, "kind": "dir"}
                answer = await writer.post("/commit", json=body)
                answer.raise_for_status()
                committed[answer.json()["entry"]["rev"]] = time.monotonic()
                await trio.sleep(max(0.0, pace - (time.monotonic() - started)))
            await trio.sleep(2)  # the last events reach everyone
            nursery.cancel_scope.cancel()
    return committed, probes


def wait_for(check: Path | subprocess.Popen[bytes], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (check.exists() if isinstance(check, Path) else check.poll() is not None):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def run(clients: int, changes: int, pace: float) -> dict[str, float | int]:
    with tempfile.TemporaryDirectory(prefix="trio-sync-load-") as tmp:
        home = Path(tmp)
        data = home / "data"
        data.mkdir(mode=0o700)
        store = TokenStore.open(data)
        writer_token = store.add("writer")
        tokens = [store.add(f"c{i:04d}") for i in range(clients)]
        store.close()
        (home / "tokens").write_text("\n".join(tokens))
        log = open(home / "server.log", "wb")  # noqa: SIM115 - closed below
        server = subprocess.Popen(
            [sys.executable, "-m", "trio_sync", "server", "--data-dir", str(data), "--port", "0"],
            stdout=log, stderr=log,
        )  # fmt: skip
        listeners: subprocess.Popen[bytes] | None = None
        try:
            deadline = time.monotonic() + 30
            while not (m := re.search(r"--server (http://\S+)", (home / "server.log").read_text())):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError((home / "server.log").read_text())
                time.sleep(0.05)
            url = m[1]
            httpx.get(f"{url}/info", headers={"Authorization": f"Bearer {writer_token}"})
            time.sleep(0.5)
            idle_fds, idle_rss = fds(server.pid), rss_mib(server.pid)
            listeners = subprocess.Popen(
                [sys.executable, __file__, "--listen", url, str(home / "tokens"),
                 str(home / "ready"), str(home / "arrived.json")],
            )  # fmt: skip
            wait_for(home / "ready", f"{clients} streams to connect")
            time.sleep(1)
            live_fds, live_rss = fds(server.pid), rss_mib(server.pid)
            cpu_before = cpu_seconds(server.pid)
            committed, probes = trio.run(drive, url, writer_token, changes, pace)
            cpu = cpu_seconds(server.pid) - cpu_before
            busy_fds = fds(server.pid)
            listeners.send_signal(signal.SIGTERM)
            wait_for(listeners, "the listeners to stop", timeout=60)
            arrived = {
                int(k): v for k, v in json.loads((home / "arrived.json").read_text()).items()
            }
        finally:
            for proc in (listeners, server):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            log.close()
    to_last = [max(arrived[rev]) - at for rev, at in committed.items() if rev in arrived]
    complete = sum(1 for rev in committed if len(arrived.get(rev, ())) == clients)
    return {
        "clients": clients,
        "changes": changes,
        "pace_ms": pace * 1000,
        "delivered_to_all": complete,
        "idle_fds": idle_fds,
        "live_fds": live_fds,
        "busy_fds": busy_fds,
        "idle_rss": idle_rss,
        "live_rss": live_rss,
        "kib_per_client": (live_rss - idle_rss) * 1024 / clients,
        "last_p50_ms": statistics.median(to_last) * 1000,
        "last_p99_ms": percentile(to_last, 99) * 1000,
        "last_max_ms": max(to_last) * 1000,
        "info_p50_ms": statistics.median(probes) * 1000,
        "info_p99_ms": percentile(probes, 99) * 1000,
        "info_max_ms": max(probes) * 1000,
        "probes": len(probes),
        "server_cpu_s": cpu,
    }


def write_report(out: Path, r: dict[str, float | int]) -> None:
    n = r["clients"]
    rows = [
        ("changes that reached every client", f"{r['delivered_to_all']} of {r['changes']}"),
        (
            "commit → last client's event, p50 / p99 / max",
            f"{r['last_p50_ms']:.1f} / {r['last_p99_ms']:.1f} / {r['last_max_ms']:.1f} ms",
        ),
        (
            f"`GET /info` while changes arrive, p50 / p99 / max ({r['probes']} probes)",
            f"{r['info_p50_ms']:.1f} / {r['info_p99_ms']:.1f} / {r['info_max_ms']:.1f} ms",
        ),
        (
            "server descriptors: before the clients / with them / while changes arrive",
            f"{r['idle_fds']} / {r['live_fds']} / {r['busy_fds']}",
        ),
        (
            "server memory (RSS): before the clients / with them",
            f"{r['idle_rss']:.0f} / {r['live_rss']:.0f} MiB",
        ),
        ("server memory per live client", f"{r['kib_per_client']:.0f} KiB"),
        ("server CPU while the changes arrived", f"{r['server_cpu_s']:.1f} s"),
    ]
    lines = [
        f"## Load: {n} live clients on one server",
        "",
        f"`benchmarks/load.py`, run {time.strftime('%Y-%m-%d')} on this machine"
        f" ({os.cpu_count()} cores). A `trio-sync server` on loopback; one process holds {n}"
        " event streams (`GET /sync`), one connection and one token each; this process commits"
        f" {r['changes']} changes (folders, so that the figures are the server's and not a"
        f" client's upload), one every {r['pace_ms']:.0f} ms, and asks `GET /info` every 25 ms"
        " throughout. Times are CLOCK_MONOTONIC across the processes: from the commit's answer"
        f" to the moment the last of the {n} streams has read that change's event.",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
    ]
    write_section(out, START, END, lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--listen":
        listener_main(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="20 clients, 50 changes")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--changes", type=int, default=500)
    parser.add_argument("--pace", type=float, default=0.05, help="seconds between changes")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    clients, changes = (20, 50) if args.quick else (args.clients, args.changes)
    result = run(clients, changes, args.pace)
    print(json.dumps(result, indent=1))
    if not args.quick:
        write_report(args.out, result)


if __name__ == "__main__":
    main()

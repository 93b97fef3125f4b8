"""The server alone: what taking in and handing out 1 GiB of chunks costs it, in plain HTTP and
over TLS.

Run by `nox -s bench`; writes the "Server alone" section of docs/benchmarks.md (the block
between its markers). One `trio-sync server` process on 127.0.0.1 (over TLS with a certificate
made for the run) and this process as its only client, through the client's own `Remote`:
1 GiB of distinct 512 KiB chunks uploaded 16 to a request with two requests in flight, then
fetched back 16 to a request. No files, no hashing or chunking of files, no second client: what
is left is the server's HTTP stack, its chunk store and the page cache. `--quick`: 64 MiB.
"""

from __future__ import annotations

import argparse
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
from blake3 import blake3
from report import peak_rss_mib, stop_processes, user_system, write_section

from trio_sync.client.remote import Remote
from trio_sync.core.hashing import hash_bytes
from trio_sync.core.tls import make_self_signed
from trio_sync.protocol.frames import RAW, Frame

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- serverio: written by benchmarks/serverio.py -->", "<!-- /serverio -->"
CHUNK = 512 * 1024
PER_REQUEST = 16
IN_FLIGHT = 2
RUNS = 3


def chunk(i: int) -> bytes:
    return blake3(i.to_bytes(8, "big")).digest(length=CHUNK)


async def exchange(
    url: str, pid: int, count: int, verify: ssl.SSLContext | bool
) -> dict[str, float]:
    hashes = [hash_bytes(chunk(i)) for i in range(count)]
    requests = [list(range(i, min(i + PER_REQUEST, count))) for i in range(0, count, PER_REQUEST)]
    result: dict[str, float] = {}
    async with Remote(url, "bench", "serverio", verify=verify) as remote:

        async def upload() -> None:
            while requests:
                part = requests.pop()
                frames = [Frame(hashes[i], RAW, chunk(i)) for i in part]
                _, rejected = await remote.put_chunks(frames)
                assert not rejected

        before, started = user_system(pid), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(IN_FLIGHT):
                nursery.start_soon(upload)
        after = user_system(pid)
        result["up_seconds"] = time.perf_counter() - started
        result["up_user"], result["up_system"] = (after[0] - before[0], after[1] - before[1])

        received = 0

        async def count_bytes(frame: Frame) -> None:
            nonlocal received
            received += len(frame.payload)

        before, started, mine = user_system(pid), time.perf_counter(), time.process_time()
        for i in range(0, count, PER_REQUEST):
            await remote.fetch_chunks(hashes[i : i + PER_REQUEST], count_bytes, compress=False)
        after = user_system(pid)
        assert received == count * CHUNK
        result["down_seconds"] = time.perf_counter() - started
        result["down_user"], result["down_system"] = (after[0] - before[0], after[1] - before[1])
        result["client_down"] = time.process_time() - mine
    return result


def run_once(tls: bool, count: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="trio-sync-serverio-") as tmp:
        work = Path(tmp)
        argv = [sys.executable, "-m", "trio_sync", "server", "--data-dir", str(work / "data"),
                "--host", "127.0.0.1", "--port", "0", "--token", "bench"]  # fmt: skip
        verify: ssl.SSLContext | bool = True
        if tls:
            make_self_signed(work / "cert.pem", work / "key.pem", "127.0.0.1")
            argv += ["--tls-cert", str(work / "cert.pem"), "--tls-key", str(work / "key.pem")]
            verify = ssl.create_default_context(cafile=str(work / "cert.pem"))
        log = work / "server.log"
        with open(log, "wb") as out:
            server = subprocess.Popen(argv, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 30
            while not (match := re.search(rb"--server (https?://\S+)", log.read_bytes())):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the server did not start: {log.read_text()}")
                time.sleep(0.05)
            result = trio.run(exchange, match[1].decode(), server.pid, count, verify)
            result["peak"] = peak_rss_mib(server.pid)
        finally:
            stop_processes([server])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="64 MiB, one run each")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    size = 64 * 2**20 if args.quick else 2**30
    runs = 1 if args.quick else RUNS
    measured: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(runs):  # interleaved, so that both see the machine alike
        for tls in (False, True):
            result = run_once(tls, size // CHUNK)
            print(f"{'TLS' if tls else 'plain'}: {result}", flush=True)
            measured[tls].append(result)
    per_gib = 2**30 / size

    def cell(results: list[dict[str, float]], *keys: str) -> str:
        values = [sum(r[k] for k in keys) * per_gib for r in results]
        return f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"

    lines = [
        "## Server alone: taking in and handing out 1 GiB of chunks",
        "",
        f"`benchmarks/serverio.py{' --quick' if args.quick else ''}`, run"
        f" {time.strftime('%Y-%m-%d')}: one server on 127.0.0.1 and one client process using"
        f" the client's `Remote`; {size // 2**20} MiB of distinct 512 KiB chunks uploaded"
        f" {PER_REQUEST} to a request, {IN_FLIGHT} requests in flight, then fetched back"
        f" {PER_REQUEST} to a request. Every figure is per GiB: CPU (user and system, from"
        " `/proc`) and wall time;"
        f" median of {runs} interleaved runs, with the range. Over TLS the client verifies a"
        " certificate made for the run.",
        "",
        "| | upload: server user | system | wall | fetch: server user | system | client CPU"
        " | server peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for tls in (False, True):
        results = measured[tls]
        lines.append(
            f"| {'TLS' if tls else 'plain HTTP'} | {cell(results, 'up_user')}"
            f" | {cell(results, 'up_system')} | {cell(results, 'up_seconds')}"
            f" | {cell(results, 'down_user')} | {cell(results, 'down_system')}"
            f" | {cell(results, 'client_down')}"
            f" | {max(r['peak'] for r in results):.0f} MiB |"
        )
    write_section(args.out, START, END, lines)


if __name__ == "__main__":
    main()

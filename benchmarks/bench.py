"""`nox -s bench`: end-to-end sync time and peak memory, with rsync measured in the same run.

For each workload a fresh server and two fresh live clients (A, B) run as real `trio-sync`
processes on loopback. The data is generated deterministically (BLAKE3 in XOF mode) in a staging
folder on the same filesystem, then renamed into A in one step: the clock starts at that rename
and stops when B holds identical content. rsync (daemon on 127.0.0.1, `rsync -a --stats`, one
hop) copies the same staging folder into an empty folder. Peak RSS is each process's VmHWM.

Writes docs/benchmarks.md. `--quick` runs small sizes as a smoke test.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from blake3 import blake3

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
GiB = 1024 * MiB


def fill(path: Path, size: int, seed: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    xof = blake3(seed.encode())
    with open(path, "wb") as f:
        for offset in range(0, size, 4 * MiB):
            f.write(xof.digest(length=min(4 * MiB, size - offset), seek=offset))


@dataclass
class Workload:
    name: str
    make: Callable[[Path], None]


def small_files(root: Path, count: int) -> None:
    for i in range(count):
        fill(root / f"dir{i % (count // 100)}/f{i}.bin", 4096, f"s{i}")


def workloads(quick: bool) -> list[Workload]:
    big = 64 * MiB if quick else GiB
    count = 200 if quick else 2000
    return [
        Workload(f"one file of {big // MiB} MiB", lambda d: fill(d / "big.bin", big, "big")),
        Workload(
            f"{count} files of 4 KiB in {count // 100} folders", lambda d: small_files(d, count)
        ),
    ]


def synced_files(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".trio-sync"]
        yield from (Path(folder) / name for name in files)


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for path in synced_files(root):
        h = blake3()
        with open(path, "rb") as f:
            while block := f.read(4 * MiB):
                h.update(block)
        out[str(path.relative_to(root))] = h.hexdigest()
    return out


def tree_sizes(root: Path) -> dict[str, int]:
    out = {}
    for path in synced_files(root):
        with suppress(FileNotFoundError):
            out[str(path.relative_to(root))] = path.stat().st_size
    return out


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        out = open(log, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "trio_sync", *args], stdout=out, stderr=out)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def run_ours(work: Path, workload: Workload) -> dict[str, float]:
    staging, a, b = work / "staging", work / "a", work / "b"
    workload.make(staging)
    expected = tree_sizes(staging)
    procs = Procs()
    try:
        server = procs.start(
            "server", "--data-dir", str(work / "server"), "--port", "0", "--token", "bench",
            log=work / "server.log",
        )  # fmt: skip
        pattern = re.compile(rb"--server (http://\S+)")
        wait_for(
            lambda: pattern.search((work / "server.log").read_bytes()) is not None, 30, "server"
        )
        match = pattern.search((work / "server.log").read_bytes())
        assert match
        url = match[1].decode()
        common = ["--server", url, "--token", "bench"]
        client_a = procs.start("client", str(a), *common, "--name", "A", log=work / "a.log")
        client_b = procs.start("client", str(b), *common, "--name", "B", log=work / "b.log")
        for log in (work / "a.log", work / "b.log"):
            wait_for(partial(_contains, log, b"in sync"), 30, "clients")
        start = time.perf_counter()
        os.rename(staging, a / "data")
        wait_for(
            lambda: tree_sizes(b) == {f"data/{k}": v for k, v in expected.items()},
            3600,
            "sync",
        )
        elapsed = time.perf_counter() - start
        rss = {
            "server": peak_rss_mib(server.pid),
            "a": peak_rss_mib(client_a.pid),
            "b": peak_rss_mib(client_b.pid),
        }
    finally:
        procs.stop()
    if tree_digest(a) != tree_digest(b):
        raise AssertionError("A and B differ after sync")
    return {"seconds": elapsed, **rss}


def _contains(path: Path, needle: bytes) -> bool:
    return needle in path.read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_rsync(work: Path, workload: Workload) -> float | None:
    if shutil.which("rsync") is None:
        return None
    staging, dest = work / "rsync-src", work / "rsync-dst"
    workload.make(staging)
    dest.mkdir()
    port = free_port()
    conf = work / "rsyncd.conf"
    conf.write_text(
        f"use chroot = no\npid file = {work / 'rsyncd.pid'}\n[bench]\npath = {dest}\n"
        "read only = no\nuid = root\ngid = root\n"
    )
    daemon = subprocess.Popen(
        ["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={port}",
         "--address=127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"rsync://127.0.0.1:{port}/bench/"
        wait_for(lambda: _listening(port), 10, "rsync daemon")
        start = time.perf_counter()
        subprocess.run(["rsync", "-a", "--stats", f"{staging}/", url], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        return time.perf_counter() - start
    finally:
        daemon.terminate()
        daemon.wait()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    rows: list[Row] = []
    for workload in workloads(args.quick):
        with tempfile.TemporaryDirectory(prefix="trio-sync-bench-") as tmp:
            ours = run_ours(Path(tmp), workload)
        with tempfile.TemporaryDirectory(prefix="trio-sync-bench-") as tmp:
            peer = run_rsync(Path(tmp), workload)
        rows.append((workload.name, ours, peer))
        ratio = f"{ours['seconds'] / peer:.2f}x" if peer else "n/a"
        print(
            f"{workload.name}: {ours['seconds']:.2f} s, rsync {peer or float('nan'):.2f} s"
            f" ({ratio}); peak RSS server {ours['server']:.0f} MiB, A {ours['a']:.0f} MiB,"
            f" B {ours['b']:.0f} MiB",
            flush=True,
        )
    write_report(args.out, rows, quick=args.quick)


Row = tuple[str, dict[str, float], float | None]


def write_report(out: Path, rows: list[Row], *, quick: bool) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Written by `nox -s bench` (`benchmarks/bench.py`)"
        + (" with `--quick`" if quick else "")
        + ".",
        "",
        "## How they were taken",
        "",
        "- For each workload: a fresh `trio-sync server` and two fresh live `trio-sync client`"
        " processes (A and B) on 127.0.0.1, each on an empty folder.",
        "- The data is generated deterministically (BLAKE3 XOF) in a staging folder on the same"
        " filesystem and renamed into A in one step. Time runs from that rename until B holds the"
        " same tree (sizes polled every 20 ms; contents compared by hash afterwards, untimed).",
        "- Our trip is two hops (A → server → B), with fsync on the server and on B.",
        "- Peer: rsync measured in the same run on the same data, one hop: `rsync -a --stats"
        " staging/ rsync://127.0.0.1:PORT/bench/` into an empty folder served by an rsync daemon"
        " on loopback. rsync does not fsync. Install it with `apt-get install rsync`; without it"
        " the peer columns say n/a.",
        "- Peak RSS is each process's `VmHWM` from `/proc/PID/status` just before it is stopped.",
        f"- Machine: {os.cpu_count()} cores, Python {platform.python_version()},"
        f" {platform.system()} {platform.release()}; run on {time.strftime('%Y-%m-%d')}.",
        "",
        "## Results",
        "",
        "| workload | trio-sync A→B | rsync (1 hop) | ratio | peak RSS server | A | B |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ours, peer in rows:
        ratio = f"{ours['seconds'] / peer:.2f}x" if peer else "n/a"
        peer_s = f"{peer:.2f} s" if peer else "n/a"
        lines.append(
            f"| {name} | {ours['seconds']:.2f} s | {peer_s} | {ratio} | {ours['server']:.0f} MiB"
            f" | {ours['a']:.0f} MiB | {ours['b']:.0f} MiB |"
        )
    lines += [
        "",
        "## Reading the figures",
        "",
        "- Memory: peak RSS must not grow with file size. Files move in chunks of at most 4 MiB,",
        "  each held once at a time per transfer worker; compare the big-file and small-file rows.",
        "- Speed: this is the first, unbatched transfer path. A small file costs four HTTP",
        "  requests (which chunks are missing, upload, commit; download on the other side) plus",
        "  fsyncs on the server and on B. Quart + Hypercorn spend about 1.7 ms of server CPU on",
        "  even a trivial request (measured with a keep-alive stdlib client), and each client",
        "  spends a few more in httpx, so thousands of small files cost tens of seconds. A large",
        "  file moves one 4 MiB chunk at a time (read, hash, PUT, verify, fsync; then GET,",
        "  verify, write on B), so it does not use both cores. Batching many files per request,",
        "  several chunks in flight per file and delta transfer are the work of issue 4; these",
        "  figures are the baseline it is measured against.",
    ]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

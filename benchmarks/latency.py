"""Latency: how long a change made in folder A takes to be in folder B, for each kind of change.

Run by `nox -s bench`; writes the "Latency" section of docs/benchmarks.md (between its markers,
in the part a run of bench.py keeps). A `trio-sync server` and two live clients, all real
processes on loopback. Each sample makes one change in A; the clock starts when the writer's
`close()` (or `rename()`, `unlink()`) returns and stops when B holds exactly the result, polled
every millisecond. Samples are spaced a few hundred milliseconds apart. `--samples N` and
`--append-samples N` set the counts; `--quick` is a smoke test.

Syncthing is measured the same way in the same run where it is installed (benchmarks/syncthing.py:
two local instances, `fsWatcherDelayS=1`). Then, for each tool, the CPU its processes use in a
minute of idling with 10,000 synced files: a fast path must not come from busy polling.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import syncthing
from report import cpu_seconds, percentile, stop_processes, write_section

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- latency: written by benchmarks/latency.py -->", "<!-- /latency -->"
TOKEN = "latency-benchmark-token-0123456789"
SPACING = 0.3
POLL = 0.001
IDLE_FILES = 10_000
IDLE_SECONDS = 60


def wait_until(check: Callable[[], bool], timeout: float = 60.0) -> float:
    """Poll *check* every millisecond; the time (perf_counter) it first held."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            if check():
                return time.perf_counter()
        except OSError:
            pass
        if time.perf_counter() > deadline:
            raise TimeoutError("the change did not arrive")
        time.sleep(POLL)


def same(path: Path, content: bytes) -> Callable[[], bool]:
    def check() -> bool:
        return path.stat().st_size == len(content) and path.read_bytes() == content

    return check


def ends_with(path: Path, size: int, tail: bytes) -> Callable[[], bool]:
    def check() -> bool:
        if path.stat().st_size != size:
            return False
        with open(path, "rb") as f:
            f.seek(size - len(tail))
            return f.read() == tail

    return check


def gone(path: Path) -> Callable[[], bool]:
    return lambda: not path.exists()


class Peers:
    """A server and two live clients on empty folders A and B."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.a, self.b = home / "a", home / "b"
        self.procs: list[subprocess.Popen[bytes]] = []

    def _start(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        out = open(self.home / log, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "trio_sync", *args], stdout=out, stderr=out)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self._start("server", "--data-dir", str(self.home / "data"), "--port", "0",
                    "--token", TOKEN, log="server.log")  # fmt: skip
        deadline = time.monotonic() + 30
        while not (
            m := re.search(r"--server (http://\S+)", (self.home / "server.log").read_text())
        ):
            if time.monotonic() > deadline:
                raise RuntimeError((self.home / "server.log").read_text())
            time.sleep(0.05)
        token = self.home / "token"
        token.write_text(TOKEN)
        for name, folder in (("a", self.a), ("b", self.b)):
            # 100 deletions in 40 s are more than half of A's files within the guard's minute:
            # it would hold them (rightly), and time the guard instead of the trip.
            self._start("client", str(folder), "--server", m[1], "--token-file", str(token),
                        "--name", name, "--max-delete-percent", "100",
                        log=f"{name}.log")  # fmt: skip
        wait_until(lambda: "in sync" in (self.home / "b.log").read_text(), timeout=60)
        wait_until(lambda: "in sync" in (self.home / "a.log").read_text(), timeout=60)

    @property
    def pids(self) -> dict[str, int]:
        return dict(
            zip(
                ("trio-sync server", "trio-sync A", "trio-sync B"),
                (p.pid for p in self.procs),
                strict=True,
            )
        )

    def in_sync(self) -> bool:
        return True  # B holding every file is all there is to wait for

    def stop(self) -> None:
        stop_processes(self.procs)


def sample(change: Callable[[], Callable[[], bool]]) -> float:
    """Make one change; seconds until B shows it."""
    arrived = change()
    started = time.perf_counter()
    return wait_until(arrived) - started


def measure(a: Path, b: Path, samples: int, append_samples: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {}

    def run(
        kind: str, count: int, change: Callable[[int], Callable[[], Callable[[], bool]]]
    ) -> None:
        times = []
        for i in range(count):
            times.append(sample(change(i)))
            time.sleep(SPACING)
        results[kind] = times
        print(f"{kind}: p50 {statistics.median(times) * 1000:.0f} ms", flush=True)

    def create(i: int) -> Callable[[], Callable[[], bool]]:
        def go() -> Callable[[], bool]:
            content = os.urandom(1024)
            (a / f"new-{i}.txt").write_bytes(content)
            return same(b / f"new-{i}.txt", content)

        return go

    run("create a 1 KiB file", samples, create)

    (a / "overwrite.bin").write_bytes(os.urandom(65536))
    wait_until(lambda: (b / "overwrite.bin").exists())
    time.sleep(2)

    def overwrite(i: int) -> Callable[[], Callable[[], bool]]:
        def go() -> Callable[[], bool]:
            content = os.urandom(65536)
            with open(a / "overwrite.bin", "r+b") as f:
                f.write(content)
            return same(b / "overwrite.bin", content)

        return go

    run("overwrite a 64 KiB file in place", samples, overwrite)

    def editor(i: int) -> Callable[[], Callable[[], bool]]:
        def go() -> Callable[[], bool]:
            content = os.urandom(4096)
            tmp = a / f".doc.txt.{i}.swp"
            tmp.write_bytes(content)
            os.rename(tmp, a / "doc.txt")
            return same(b / "doc.txt", content)

        return go

    run("editor save (temp file renamed over it)", samples, editor)

    (a / "moving-0.txt").write_bytes(os.urandom(4096))
    wait_until(lambda: (b / "moving-0.txt").exists())
    time.sleep(2)

    def rename(i: int) -> Callable[[], Callable[[], bool]]:
        def go() -> Callable[[], bool]:
            os.rename(a / f"moving-{i}.txt", a / f"moving-{i + 1}.txt")
            new, old = b / f"moving-{i + 1}.txt", b / f"moving-{i}.txt"
            return lambda: new.exists() and not old.exists()

        return go

    run("rename", samples, rename)

    def delete(i: int) -> Callable[[], Callable[[], bool]]:
        def go() -> Callable[[], bool]:
            (a / f"new-{i}.txt").unlink()
            return gone(b / f"new-{i}.txt")

        return go

    run("delete", samples, delete)

    big = a / "big.bin"
    with open(big, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    wait_until(lambda: (b / "big.bin").exists() and (b / "big.bin").stat().st_size == 100 << 20)
    time.sleep(3)

    def append(i: int) -> Callable[[], Callable[[], bool]]:
        def go() -> Callable[[], bool]:
            tail = os.urandom(1 << 20)
            with open(big, "ab") as f:
                f.write(tail)
            return ends_with(b / "big.bin", (101 + i) << 20, tail)

        return go

    run("append 1 MiB to a 100 MiB file", append_samples, append)
    return results


def idle_cpu(
    a: Path, b: Path, pids: dict[str, int], in_sync: Callable[[], bool], files: int, seconds: float
) -> dict[str, float]:
    """CPU seconds each process uses in *seconds* of idling once *files* 1 KiB files are synced."""
    for i in range(files):
        folder = a / "idle" / f"d{i % 100}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i}").write_bytes(os.urandom(1024))

    def all_there() -> bool:
        return sum(len(os.listdir(d)) for d in (b / "idle").iterdir()) == files and in_sync()

    wait_until(all_there, timeout=600)
    time.sleep(10)  # let the last writes of the sync itself end
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    print("idle: " + ", ".join(f"{n} {s:.2f} s" for n, s in used.items()), flush=True)
    return used


def _cells(times: list[float] | None) -> str:
    if not times:
        return "- | - | - | -"
    ms = [t * 1000 for t in times]
    return (
        f"{statistics.median(ms):.0f} ms | {percentile(ms, 90):.0f} ms"
        f" | {percentile(ms, 99):.0f} ms | {max(ms):.0f} ms"
    )


def write_report(
    out: Path,
    ours: dict[str, list[float]],
    theirs: dict[str, list[float]] | None,
    idle: dict[str, float],
    peer: str,
) -> None:
    lines = [
        "## Latency: from a change in A to the same file in B",
        "",
        f"`benchmarks/latency.py`, run {time.strftime('%Y-%m-%d')} on this machine"
        f" ({os.cpu_count()} cores): a `trio-sync server` and two live clients on loopback, real"
        f" processes; beside them {peer}. The clock starts when the writer's `close()`"
        " (`rename()`, `unlink()`) returns in A and stops when B holds exactly the result,"
        f" polled every millisecond; samples {SPACING * 1000:.0f} ms apart.",
        "",
        "| change | samples | trio-sync p50 | p90 | p99 | max | Syncthing p50 | p90 | p99 | max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, times in ours.items():
        lines.append(
            f"| {kind} | {len(times)} | {_cells(times)} | {_cells((theirs or {}).get(kind))} |"
        )
    lines += [
        "",
        f"CPU while idle: user plus system seconds of each process in {IDLE_SECONDS} s with"
        f" nothing changing, after {IDLE_FILES:,} files of 1 KiB were synced (from `/proc`).",
        "",
        "| process | CPU seconds |",
        "|---|---|",
        *(f"| {name} | {used:.2f} |" for name, used in idle.items()),
    ]
    write_section(out, START, END, lines)


def run_tool(
    name: str, work: Path, samples: int, appends: int, idle_files: int, idle_seconds: float
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Start *name*'s pair on fresh folders in *work*, measure it, stop it."""
    a, b = work / "a", work / "b"
    a.mkdir()
    b.mkdir()
    peers = Peers(work) if name == "trio-sync" else syncthing.Pair(work, a, b)
    try:
        peers.start()
        results = measure(a, b, samples, appends)
        idle = idle_cpu(a, b, peers.pids, peers.in_sync, idle_files, idle_seconds)
    finally:
        peers.stop()
    return results, idle


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="5 samples each, a smoke test")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--append-samples", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    samples, appends = (5, 3) if args.quick else (args.samples, args.append_samples)
    idle_files, idle_seconds = (200, 2) if args.quick else (IDLE_FILES, IDLE_SECONDS)
    tools = ["trio-sync"]
    if syncthing.installed():
        tools.append("Syncthing")
        peer = f"Syncthing {syncthing.version()} (two local instances, `fsWatcherDelayS=1`)"
    else:
        peer = "no Syncthing: it is not installed here (`apt-get install syncthing`)"
        print(f"skipping Syncthing: {peer}", flush=True)
    results: dict[str, dict[str, list[float]]] = {}
    idle: dict[str, float] = {}
    for tool in tools:
        print(f"-- {tool}", flush=True)
        with tempfile.TemporaryDirectory(prefix="trio-sync-latency-") as tmp:
            results[tool], used = run_tool(
                tool, Path(tmp), samples, appends, idle_files, idle_seconds
            )
            idle |= used
    if not args.quick:
        write_report(args.out, results["trio-sync"], results.get("Syncthing"), idle, peer)


if __name__ == "__main__":
    main()

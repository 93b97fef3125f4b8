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
import json
import math
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import syncthing
from blake3 import blake3
from links import Links
from links import available as links_available
from report import cpu_seconds, peak_rss_mib, stop_processes, write_section

ROOT = Path(__file__).resolve().parent.parent
#: Where each run of ours leaves its processes' logs (the last run of each workload), so that a
#: figure out of line can be looked into after the run's temporary folder is gone.
LOGS = ROOT / ".bench-logs"
# Where the hand-written analysis starts in docs/benchmarks.md; a new run keeps it.
NOTES_MARKER = "## Notes on these figures"
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
    #: What the CPU table divides by: a unit, and how many of it the workload is.
    per: tuple[str, float] = ("", 0.0)


def small_files(root: Path, count: int) -> None:
    for i in range(count):
        fill(root / f"dir{i % 100}/f{i}.bin", 4096, f"s{i}")


def mixed_files(root: Path, count: int, largest: int) -> None:
    """Sizes log-uniform between 4 KiB and *largest*, from a fixed seed."""
    rng = random.Random(4)
    for i in range(count):
        size = int(math.exp(rng.uniform(math.log(4096), math.log(largest))))
        fill(root / f"set{i % 20}/m{i}.bin", size, f"m{i}")


def workloads(quick: bool) -> list[Workload]:
    big = 64 * MiB if quick else GiB
    count = 500 if quick else 10_000
    mixed = 100 if quick else 1000
    largest = 8 * MiB if quick else 64 * MiB
    return [
        Workload(
            f"one file of {big // MiB} MiB",
            lambda d: fill(d / "big.bin", big, "big"),
            ("s per GiB", big / GiB),
        ),
        Workload(
            f"{count} files of 4 KiB in 100 folders",
            lambda d: small_files(d, count),
            ("ms per file", count / 1000),
        ),
        Workload(
            f"{mixed} files, 4 KiB to {largest // MiB} MiB (log-uniform)",
            lambda d: mixed_files(d, mixed, largest),
        ),
    ]


@dataclass
class Edit:
    name: str
    apply: Callable[[Path], None]


def edit_tree(root: Path, quick: bool) -> None:
    fill(root / "big.bin", (64 if quick else 1024) * MiB, "edit-big")
    fill(root / "hundred.bin", (10 if quick else 100) * MiB, "edit-100")
    for i in range(1000):
        fill(root / f"folder/f{i}.txt", 4096, f"e{i}")


def overwrite_middle(root: Path) -> None:
    path = root / "big.bin"
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(blake3(b"overwrite").digest(length=MiB))


def insert_at_start(root: Path) -> None:
    path = root / "hundred.bin"
    tmp = path.with_name("hundred.bin.new")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(b"!")
        shutil.copyfileobj(src, dst, 4 * MiB)
    os.rename(tmp, path)


def append(root: Path) -> None:
    with open(root / "hundred.bin", "ab") as f:
        f.write(blake3(b"append").digest(length=MiB))


def rename_folder(root: Path) -> None:
    os.rename(root / "folder", root / "folder renamed")


EDITS = [
    Edit("overwrite 1 MiB in the middle of the big file", overwrite_middle),
    Edit("insert 1 byte at the start of the 100 MiB file", insert_at_start),
    Edit("append 1 MiB to the 100 MiB file", append),
    Edit("rename a folder of 1,000 files", rename_folder),
]


def synced_files(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in (".trio-sync", syncthing.MARKER)]
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


class Procs:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, log: Path, prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """`trio-sync ARGS`, after *prefix* (`ip netns exec NS`, which execs: same pid)."""
        out = open(log, "wb")  # noqa: SIM115 - closed with the process
        argv = [*prefix, sys.executable, "-m", "trio_sync", *args]
        proc = subprocess.Popen(argv, stdout=out, stderr=out)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        stop_processes(self.procs)
        self.procs.clear()


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll every 20 ms, or, when a check is slow (a big tree), so that polling takes at most
    a quarter of the time: the processes measured share the machine's cores with it."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        if check():
            return
        spent = time.monotonic() - started
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(max(0.02, 3 * spent))


def tree_stats(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for path in synced_files(root):
        with suppress(FileNotFoundError):
            st = path.stat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


Result = dict[str, float]


class Ours:
    """A server and two live clients, A and B, as real processes: on loopback, or each client
    in its own namespace with its own link to the server's (*links*, over TLS as any server
    reached from another machine is)."""

    def __init__(self, work: Path, links: Links | None = None, *, label: str = "") -> None:
        self.work, self.a, self.b = work, work / "a", work / "b"
        self.links = links
        self.label = label
        self.procs = Procs()
        try:
            log = work / "server.log"
            if links is None:
                self.server = self.procs.start(
                    "server", "--data-dir", str(work / "server"), "--port", "0", "--token",
                    "bench", log=log,
                )  # fmt: skip
                pattern = re.compile(rb"--server (http://\S+)")
            else:
                self.server = self.procs.start(
                    "server", "--data-dir", str(work / "server"), "--host", "0.0.0.0", "--port",
                    "0", "--token", "bench", log=log, prefix=links.command(links.SERVER, []),
                )  # fmt: skip
                pattern = re.compile(rb"--server https://\S+:(\d+) --fingerprint (SHA256:\S+)")
            wait_for(lambda: pattern.search(log.read_bytes()) is not None, 30, "server")
            match = pattern.search(log.read_bytes())
            assert match
            clients = []
            for name, root in (("A", self.a), ("B", self.b)):
                if links is None:
                    self.url = match[1].decode()
                    where = ["--server", self.url]
                    prefix: list[str] = []
                else:
                    address = links.server_address(name.lower())
                    where = ["--server", f"https://{address}:{match[1].decode()}",
                             "--fingerprint", match[2].decode()]  # fmt: skip
                    prefix = links.command(links.namespace(name.lower()), [])
                args = ["client", str(root), *where, "--token", "bench", "--name", name]
                out = work / f"{name.lower()}.log"
                clients.append(self.procs.start(*args, log=out, prefix=prefix))
            self.client_a, self.client_b = clients
            for client_log in (work / "a.log", work / "b.log"):
                wait_for(partial(_contains, client_log, b"in sync"), 30, "clients")
        except BaseException:
            self.procs.stop()
            raise

    def wire_bytes(self) -> tuple[int, int]:
        """(bytes received by the server, bytes it sent): HTTP bodies, as it counts them.
        Only on loopback (the namespaces' addresses are not reachable from here)."""
        if self.links is not None:
            return 0, 0
        request = urllib.request.Request(
            self.url + "/info", headers={"Authorization": "Bearer bench"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            traffic = json.load(response)["traffic"]
        return int(traffic["bytes_in"]), int(traffic["bytes_out"])

    @property
    def pids(self) -> dict[str, int]:
        return {"a": self.client_a.pid, "server": self.server.pid, "b": self.client_b.pid}

    def sync(self, change: Callable[[], None]) -> Result:
        """Apply *change* in A; seconds until B matches A, the bytes each way meanwhile, and
        each process's CPU seconds."""
        in_before, out_before = self.wire_bytes()
        result = timed(change, self.a, self.b, self.pids, lambda: True)
        in_after, out_after = self.wire_bytes()
        up, down = in_after - in_before, out_after - out_before
        return result | {"up": up, "down": down, "bytes": up + down}

    def peak_rss(self) -> dict[str, float]:
        return {
            "server": peak_rss_mib(self.server.pid),
            "a": peak_rss_mib(self.client_a.pid),
            "b": peak_rss_mib(self.client_b.pid),
        }

    def close(self) -> None:
        self.procs.stop()
        self.keep_logs()
        if tree_digest(self.a) != tree_digest(self.b):
            raise AssertionError("A and B differ after sync")

    def keep_logs(self) -> None:
        where = "loopback" if self.links is None else self.links.rate
        kept = LOGS / re.sub(r"[^\w.-]+", "-", f"{where} {self.label}").strip("-")
        shutil.rmtree(kept, ignore_errors=True)
        kept.mkdir(parents=True)
        for log in self.work.glob("*.log"):
            shutil.copy(log, kept / log.name)


def timed(
    change: Callable[[], None],
    a: Path,
    b: Path,
    pids: dict[str, int],
    settled: Callable[[], bool],
) -> Result:
    """Apply *change* in *a*; seconds until *b* matches it and *settled* holds, and the CPU
    seconds each of *pids* used meanwhile (`cpu_` + its name)."""
    os.sync()  # no run pays for writing back what an earlier step left in the page cache
    cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    # The clock starts once the change is made, as rsync's does (its edits are applied before
    # its copy starts): making an edit (copying 100 MiB for the insert) is not syncing it.
    change()
    start = time.perf_counter()
    expected = tree_stats(a)
    wait_for(lambda: tree_stats(b) == expected and settled(), 3600, "sync")
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed} | {
        f"cpu_{name}": cpu_seconds(pid) - cpu[name] for name, pid in pids.items()
    }


class Syncthing:
    """Two local Syncthing instances (benchmarks/syncthing.py) on empty folders: measured the
    same way as ours, done when B holds A's files and both say the folder is idle."""

    def __init__(self, work: Path) -> None:
        self.a, self.b = work / "st-a", work / "st-b"
        self.pair = syncthing.Pair(work, self.a, self.b)
        self.pair.start()

    def sync(self, change: Callable[[], None]) -> Result:
        pids = {"st_a": self.pair.pids["Syncthing A"], "st_b": self.pair.pids["Syncthing B"]}
        return timed(change, self.a, self.b, pids, self.pair.in_sync)

    def close(self) -> None:
        self.pair.stop()
        if tree_digest(self.a) != tree_digest(self.b):
            raise AssertionError("Syncthing's A and B differ after sync")


class Rsync:
    """An rsync daemon serving an empty folder; `send` copies into it, one hop: on loopback, or
    from client A's namespace to the server's over A's link (*links*)."""

    def __init__(self, work: Path, links: Links | None = None) -> None:
        self.dest = work / "rsync-dst"
        self.dest.mkdir()
        port = free_port()
        conf = work / "rsyncd.conf"
        conf.write_text(
            f"use chroot = no\npid file = {work / 'rsyncd.pid'}\n[bench]\npath = {self.dest}\n"
            "read only = no\nuid = root\ngid = root\n"
        )
        address = "127.0.0.1" if links is None else links.server_address("a")
        self.daemon = subprocess.Popen(
            [*(links.command(links.SERVER, []) if links else []), "rsync", "--daemon",
             "--no-detach", f"--config={conf}", f"--port={port}", f"--address={address}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.prefix = links.command(links.namespace("a"), []) if links else []
        self.url = f"rsync://{address}:{port}/bench/"
        wait_for(lambda: self._listening(port), 10, "rsync daemon")

    def _listening(self, port: int) -> bool:
        if not self.prefix:
            return _listening(port)
        probe = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1)"
        host = self.url.split("//")[1].split(":")[0]
        done = subprocess.run(
            [*self.prefix, sys.executable, "-c", probe, host, str(port)], capture_output=True
        )
        return done.returncode == 0

    def send(self, source: Path, *flags: str) -> tuple[float, int]:
        os.sync()  # no run pays for writing back what an earlier step left in the page cache
        start = time.perf_counter()
        done = subprocess.run(
            [*self.prefix, "rsync", "-a", "--delete", "--stats", *flags, f"{source}/", self.url],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        elapsed = time.perf_counter() - start
        total = 0
        for label in ("Total bytes sent", "Total bytes received"):
            match = re.search(rf"{label}: ([\d,]+)", done.stdout)
            assert match, done.stdout
            total += int(match[1].replace(",", ""))
        return elapsed, total

    def close(self) -> None:
        self.daemon.terminate()
        self.daemon.wait()


def _contains(path: Path, needle: bytes) -> bool:
    return needle in path.read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def measure_workload(
    workload: Workload, links: Links | None = None
) -> tuple[Result, Result | None]:
    """Ours (with Syncthing's figures merged in as `st_*`, on loopback) and rsync's."""
    with tempfile.TemporaryDirectory(prefix="trio-sync-bench-") as tmp:
        work = Path(tmp)
        staging = work / "staging"
        workload.make(staging)
        theirs: Result = {}
        if syncthing.installed() and links is None:
            workload.make(work / "st-staging")
            st = Syncthing(work)
            try:
                theirs = st.sync(lambda: os.rename(work / "st-staging", st.a / "data"))
            finally:
                st.close()
            shutil.rmtree(st.a)
            shutil.rmtree(st.b)
        peer: Result | None = None
        if shutil.which("rsync"):
            rsync = Rsync(work, links)
            try:
                seconds, wire = rsync.send(staging)
                peer = {"seconds": seconds, "bytes": wire}
                # Context, not the target's peer: the same copy made as durable as ours.
                shutil.rmtree(rsync.dest)
                rsync.dest.mkdir()
                peer["fsync_seconds"], _ = rsync.send(staging, "--fsync")
            finally:
                rsync.close()
            shutil.rmtree(rsync.dest)
        ours = Ours(work, links, label=workload.name)
        try:
            result = ours.sync(lambda: os.rename(staging, ours.a / "data"))
            result.update(ours.peak_rss())
            total = sum(size for size, _ in tree_stats(ours.a).values())
        finally:
            ours.close()
        result.update({f"st_{k}" if k == "seconds" else k: v for k, v in theirs.items()})
        if links is None:
            result["cpu_dd"] = write_once_cpu(work, total)
        return result, peer


def write_once_cpu(folder: Path, size: int) -> float:
    """CPU seconds (user and system) `dd` takes to write *size* bytes into one new file and fsync
    it: what putting the workload's bytes through the page cache once costs this machine, the
    floor under the CPU of any process that writes them (B; the server too). Measured after the
    runs, so that it takes no memory from them."""
    target = folder / "dd.bin"
    blocks = max(1, -(-size // MiB))
    process = subprocess.Popen(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={blocks}", "conv=fsync",
         "status=none"]
    )  # fmt: skip
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    target.unlink()
    if process.returncode != 0:
        raise RuntimeError(f"dd failed ({process.returncode})")
    return usage.ru_utime + usage.ru_stime


def measure_edits(quick: bool, links: Links | None = None) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="trio-sync-bench-") as tmp:
        work = Path(tmp)
        rsync_source = work / "rsync-src"
        rsync = None
        if shutil.which("rsync"):
            edit_tree(rsync_source, quick)
            rsync = Rsync(work, links)
            rsync.send(rsync_source)  # the synced starting point, not timed
        st = Syncthing(work) if syncthing.installed() and links is None else None
        ours = Ours(work, links, label="edits")
        try:
            edit_tree(work / "staging", quick)
            ours.sync(lambda: os.rename(work / "staging", ours.a / "data"))
            if st is not None:
                edit_tree(work / "st-staging", quick)
                st.sync(lambda: os.rename(work / "st-staging", st.a / "data"))
            for edit in EDITS:
                peer = None
                if rsync is not None:
                    edit.apply(rsync_source)
                    seconds, wire = rsync.send(rsync_source)
                    peer = {"seconds": seconds, "bytes": wire}
                result = ours.sync(partial(edit.apply, ours.a / "data"))
                if st is not None:
                    theirs = st.sync(partial(edit.apply, st.a / "data"))
                    result.update(
                        {f"st_{k}" if k == "seconds" else k: v for k, v in theirs.items()}
                    )
                rows.append((edit.name, result, peer))
                print(f"{edit.name}: {result}; rsync {peer}", flush=True)
            rss = ours.peak_rss()
        finally:
            ours.close()
            if st is not None:
                st.close()
            if rsync is not None:
                rsync.close()
    for _, result, _ in rows:
        result.update(rss)
    return rows


LINKS_START = "<!-- links: written by benchmarks/bench.py --links -->"
LINKS_END = "<!-- /links -->"
#: Each target of issue 15 for real links: the link, the workloads, the most ours / rsync may be.
LINK_TARGETS = [("1gbit", "workloads", {"one file": 1.10, "files, 4 KiB to": 1.10,
                                         "files of 4 KiB": 2.0}),
                ("100mbit", "edits", {"": 1.0})]  # fmt: skip


def measure_links(out: Path, quick: bool) -> None:
    """Ours against rsync over emulated links (benchmarks/links.py); its own section."""
    ok, why = links_available()
    lines = [
        "## Real links: one emulated link per client",
        "",
        f"`benchmarks/bench.py --links{' --quick' if quick else ''}`, run"
        f" {time.strftime('%Y-%m-%d')} ({os.cpu_count()}"
        " cores). The server in a network namespace of its own, each client in another, joined"
        " to the server's by a veth pair shaped with `tc tbf` on both ends (the rate each way,"
        " a 1 MB burst); clients reach the server over TLS with its fingerprint pinned, as from"
        " any other machine. rsync crosses one such link: its daemon in the server's namespace,"
        " the copy started in A's. Timed as on loopback (from the rename or edit in A until B"
        " matches). Bytes on the wire are not counted here (see the loopback tables).",
        "",
    ]
    if not ok:
        print(f"skipping the links: {why}", flush=True)
        write_section(out, LINKS_START, LINKS_END, [*lines, f"Not run: {why}."])
        return
    lines += [
        "| link | workload | trio-sync A→B | rsync (1 hop) | ours / rsync | target | CPU A"
        " | server | B |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rate, which, targets in LINK_TARGETS:
        with Links(rate, ["a", "b"]) as links:
            if which == "workloads":
                measured = []
                for workload in workloads(quick):
                    ours, peer = measure_workload(workload, links)
                    measured.append((workload.name, ours, peer))
            else:
                measured = measure_edits(quick, links)
        for name, ours, peer in measured:
            print(f"{rate} {name}: {ours}; rsync {peer}", flush=True)
            limit = next((t for key, t in targets.items() if key in name), None)
            ratio = ours["seconds"] / peer["seconds"] if peer else None
            verdict = "" if limit is None or ratio is None else (
                f"≤ {limit:.2f}x: {'met' if ratio <= limit else 'not met'}"
            )  # fmt: skip
            rsync_time = f"{peer['seconds']:.2f} s" if peer else "n/a"
            lines.append(
                f"| {rate} | {name} | {ours['seconds']:.2f} s | {rsync_time}"
                f" | {f'{ratio:.2f}x' if ratio else 'n/a'} | {verdict}"
                f" | {ours['cpu_a']:.2f} s | {ours['cpu_server']:.2f} s | {ours['cpu_b']:.2f} s |"
            )
    write_section(out, LINKS_START, LINKS_END, lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument(
        "--links", action="store_true", help="only the emulated links (root: ip netns, tc)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if args.links:
        measure_links(args.out, args.quick)
        return
    rows: list[Row] = []
    per: dict[str, tuple[str, float]] = {}
    for workload in workloads(args.quick):
        ours, peer = measure_workload(workload)
        rows.append((workload.name, ours, peer))
        per[workload.name] = workload.per
        print(f"{workload.name}: {ours}; rsync {peer}", flush=True)
    edits = measure_edits(args.quick)
    write_report(args.out, rows, edits, per, quick=args.quick)


Row = tuple[str, Result, Result | None]


def _mib(n: float) -> str:
    return f"{n / MiB:.2f} MiB"


def _ratio(ours: float, peer: float | None) -> str:
    return f"{ours / peer:.2f}x" if peer else "n/a"


def _table(rows: list[Row]) -> list[str]:
    lines = [
        "| workload | trio-sync A→B | rsync (1 hop) | time ratio | rsync --fsync | Syncthing"
        " | ours / Syncthing | A→server | server→B | rsync (1 hop) | upload hop / rsync"
        " | peak RSS server | A | B |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ours, peer in rows:
        peer_seconds = peer["seconds"] if peer else None
        peer_bytes = peer["bytes"] if peer else None
        fsync_seconds = peer.get("fsync_seconds") if peer else None
        st_seconds = ours.get("st_seconds")
        lines.append(
            f"| {name} | {ours['seconds']:.2f} s"
            f" | {f'{peer_seconds:.2f} s' if peer_seconds else 'n/a'}"
            f" | {_ratio(ours['seconds'], peer_seconds)}"
            f" | {f'{fsync_seconds:.2f} s' if fsync_seconds else '-'}"
            f" | {f'{st_seconds:.2f} s' if st_seconds else 'n/a'}"
            f" | {_ratio(ours['seconds'], st_seconds)}"
            f" | {_mib(ours['up'])} | {_mib(ours['down'])}"
            f" | {_mib(peer_bytes) if peer_bytes else 'n/a'}"
            f" | {_ratio(ours['up'], peer_bytes)}"
            f" | {ours['server']:.0f} MiB | {ours['a']:.0f} MiB | {ours['b']:.0f} MiB |"
        )
    return lines


def _cpu_table(rows: list[Row], per: dict[str, tuple[str, float]]) -> list[str]:
    names = ("cpu_a", "cpu_server", "cpu_b", "cpu_st_a", "cpu_st_b", "cpu_dd")
    lines = [
        "| workload | A | server | B | Syncthing A | Syncthing B | dd: its bytes written once |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ours, _ in rows:
        unit, count = per.get(name, ("", 0.0))
        cells = []
        for key in names:
            if key not in ours:
                cells.append("n/a")
                continue
            text = f"{ours[key]:.2f} s"
            if unit == "s per GiB":
                text += f" ({ours[key] / count:.2f} s per GiB)"
            elif unit == "ms per file":
                text += f" ({ours[key] / count:.2f} ms per file)"
            cells.append(text)
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


def write_report(
    out: Path,
    rows: list[Row],
    edits: list[Row],
    per: dict[str, tuple[str, float]],
    *,
    quick: bool,
) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Written by `nox -s bench` (`benchmarks/bench.py`)"
        + (" with `--quick`" if quick else "")
        + "; the real links by `bench.py --links`, the server alone, load and latency sections"
        " at the end by `benchmarks/serverio.py`, `benchmarks/load.py` and"
        " `benchmarks/latency.py`, in the same session.",
        "",
        "## How they were taken",
        "",
        "- A fresh `trio-sync server` and two live `trio-sync client` processes (A and B) on"
        " 127.0.0.1, on empty folders.",
        "- Data is generated deterministically (BLAKE3 XOF, seeded sizes) in a staging folder on"
        " the same filesystem and renamed into A in one step. Time runs from that rename (or from"
        " the moment the edit is made, as rsync's runs from its start once the same edit was"
        " made to its source) until every file in B has A's size and mtime (polled every 20"
        " ms, less often on big trees so that polling takes at most a quarter of one core);"
        " contents are compared by hash afterwards, untimed. Every timed run starts after"
        " `sync(2)`, so that none pays for writing back data an earlier step left in the page"
        " cache.",
        "- Our trip is two hops (A → server → B), durable on both: the server makes each upload"
        " request durable with syncfs(2), B the small files it receives together; B fsyncs each"
        " larger file and its folder.",
        "- Bytes on the wire (ours): HTTP body bytes both ways as counted by the server"
        " (`GET /info` traffic: uploads, downloads, listings, events; HTTP headers not counted)."
        " rsync: `Total bytes sent` + `Total bytes received` from `--stats`.",
        "- Peer: rsync in the same run on the same data, one hop: `rsync -a --delete --stats"
        " src/ rsync://127.0.0.1:PORT/bench/` to an rsync daemon on loopback (no fsync). For the"
        " edits, rsync first copies the same starting tree (untimed), then each edit is applied"
        " to its source and sent again. Install it with `apt-get install rsync`; without it the"
        " peer columns say n/a.",
        "- Syncthing, where installed (`apt-get install syncthing`): two local instances on"
        " loopback (benchmarks/syncthing.py: discovery, relays, NAT and upgrades off,"
        " `fsWatcherDelayS=1`), measured the same way on their own folders; done when B holds"
        " A's files and both instances' REST status says the folder is idle with nothing needed."
        " One hop, like rsync; its own durability rules.",
        "- `rsync --fsync` is context, not the targets' peer: the same one-hop copy into an empty"
        " folder again, with every written file fsynced as ours are (workloads only).",
        "- Peak RSS is each process's `VmHWM` from `/proc/PID/status`; for the edits it covers"
        " the whole session (initial sync of the tree and all four edits).",
        "- The logs of our processes in each workload's last run are left in `.bench-logs/`.",
        f"- Machine: {os.cpu_count()} cores, Python {platform.python_version()},"
        f" {platform.system()} {platform.release()}; run on {time.strftime('%Y-%m-%d')}.",
        "",
        "## Workloads",
        "",
        *_table(rows),
        "",
        "## Edits on a synced tree",
        "",
        "The tree: the big file, a 100 MiB file and a folder of 1,000 files of 4 KiB.",
        "",
        *_table(edits),
        "",
        "## CPU per process",
        "",
        "User plus system CPU seconds each process used from the change until B matched A"
        " (`/proc/PID/stat`), with the per-GiB or per-file figure where the workload has one."
        " The last column is a floor, not a peer: the CPU `dd` took, after the runs, to write"
        " the workload's bytes into one new file through the page cache (`conv=fsync`), which"
        " B must do too and the server does for its chunks. On a virtual machine that hands"
        " back free memory to its host, that cost depends on how long the memory was free.",
        "",
        *_cpu_table(rows + edits, per),
        "",
    ]
    text = "\n".join(lines) + "\n"
    if out.exists() and NOTES_MARKER in (old := out.read_text()):
        text += old[old.index(NOTES_MARKER) :]
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

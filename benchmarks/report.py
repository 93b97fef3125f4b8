"""What the benchmark scripts share: percentiles, CPU time and peak memory from /proc, stopping
processes, and replacing one marked section of docs/benchmarks.md while keeping the rest."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def write_section(out: Path, start: str, end: str, lines: list[str]) -> None:
    """Put *lines* between the markers *start* and *end* in *out* (appended if absent)."""
    section = "\n".join([start, *lines, end])
    text = out.read_text() if out.exists() else ""
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    out.write_text(text)


def user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process *pid* itself so far, from `/proc`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _status_mib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib(pid: int) -> float:
    """The peak resident memory of process *pid* so far (`VmHWM`), in MiB."""
    return _status_mib(pid, "VmHWM")


def rss_mib(pid: int) -> float:
    """The resident memory of process *pid* now (`VmRSS`), in MiB."""
    return _status_mib(pid, "VmRSS")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process *pid* and its living descendants so far, from
    `/proc` (Syncthing runs as a monitor process and a child that does the work)."""
    total = sum(user_system(pid))
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue  # the thread ended meanwhile
        for child in children:
            with contextlib.suppress(OSError):  # the child ended meanwhile
                total += cpu_seconds(int(child))
    return total


def stop_processes(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each (a clean stop), then wait; kill one that takes more than 15 s."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

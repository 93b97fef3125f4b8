"""Two local Syncthing instances sharing one folder, A and B: the peer the benchmarks measure
trio-sync against where Syncthing is installed (`apt-get install syncthing`).

Set up as a user chasing speed would: discovery, relays, NAT traversal, usage reports and
upgrades off, each instance listening on loopback only and knowing the other's address, the
folder watched with `fsWatcherDelayS=1` (its fastest setting), no low-priority scheduling (ours
runs at normal priority too). Only the standard library, like the rest of benchmarks/.
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

FOLDER = "bench"
API_KEY = "trio-sync-benchmark-key"
MARKER = ".stfolder"


def installed() -> bool:
    return shutil.which("syncthing") is not None


def version() -> str:
    done = subprocess.run(["syncthing", "--version"], capture_output=True, text=True, check=True)
    return done.stdout.split()[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Instance:
    def __init__(self, home: Path, folder: Path) -> None:
        self.home, self.folder = home, folder
        self.gui, self.listen = _free_port(), _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        done = subprocess.run(
            ["syncthing", "generate", f"--home={home}", "--no-default-folder"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        self.tree = ET.parse(home / "config.xml")
        device = self.tree.getroot().find("device")
        assert device is not None, done.stdout
        self.device_id = device.attrib["id"]

    def configure(self, other: Instance) -> None:
        root = self.tree.getroot()
        options = root.find("options")
        assert options is not None
        settings = {
            "listenAddress": f"tcp://127.0.0.1:{self.listen}",
            "globalAnnounceEnabled": "false",
            "localAnnounceEnabled": "false",
            "relaysEnabled": "false",
            "natEnabled": "false",
            "urAccepted": "-1",
            "autoUpgradeIntervalH": "0",
            "crashReportingEnabled": "false",
            "startBrowser": "false",
            "setLowPriority": "false",
        }
        for name, value in settings.items():
            element = options.find(name)
            assert element is not None, name
            element.text = value
        own = root.find("device")
        assert own is not None
        peer = copy.deepcopy(own)
        peer.attrib.update(id=other.device_id, name="peer")
        address = peer.find("address")
        assert address is not None
        address.text = f"tcp://127.0.0.1:{other.listen}"
        root.insert(list(root).index(own) + 1, peer)
        default = root.find("defaults/folder")
        assert default is not None
        folder = copy.deepcopy(default)
        folder.attrib.update(
            id=FOLDER, label=FOLDER, path=str(self.folder), fsWatcherDelayS="1",
            rescanIntervalS="3600",
        )  # fmt: skip
        for element in folder.findall("device"):
            folder.remove(element)
        for device_id in (self.device_id, other.device_id):
            folder.insert(0, ET.Element("device", id=device_id, introducedBy=""))
        root.insert(0, folder)
        self.tree.write(self.home / "config.xml")
        (self.folder / MARKER).mkdir(parents=True, exist_ok=True)

    def start(self, log: Path) -> None:
        out = open(log, "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            ["syncthing", "serve", f"--home={self.home}", "--no-browser", "--no-restart",
             "--no-upgrade", f"--gui-address=http://127.0.0.1:{self.gui}",
             f"--gui-apikey={API_KEY}"],
            stdout=out, stderr=out,
        )  # fmt: skip

    def rest(self, path: str) -> dict[str, object]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.gui}{path}", headers={"X-API-Key": API_KEY}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            data: dict[str, object] = json.load(answer)
            return data

    def connected(self, other: Instance) -> bool:
        connections = self.rest("/rest/system/connections")["connections"]
        assert isinstance(connections, dict)
        return bool(connections.get(other.device_id, {}).get("connected"))

    def idle(self) -> bool:
        """Scanned, nothing needed from the peer: the folder is in sync as far as it knows."""
        status = self.rest(f"/rest/db/status?folder={FOLDER}")
        return status.get("state") == "idle" and status.get("needTotalItems") == 0

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Pair:
    """Syncthing on folders *a* and *b*, with its homes and logs in *work*."""

    def __init__(self, work: Path, a: Path, b: Path) -> None:
        self.work = work
        self.a = Instance(work / "st-home-a", a)
        self.b = Instance(work / "st-home-b", b)
        self.a.configure(self.b)
        self.b.configure(self.a)

    @property
    def pids(self) -> dict[str, int]:
        return {
            f"Syncthing {name}": inst.proc.pid
            for name, inst in (("A", self.a), ("B", self.b))
            if inst.proc is not None
        }

    def start(self, timeout: float = 60) -> None:
        self.a.start(self.work / "st-a.log")
        self.b.start(self.work / "st-b.log")
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.a.connected(self.b) and self.a.idle() and self.b.idle():
                    return
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"Syncthing did not connect; see {self.work}/st-*.log")
            time.sleep(0.1)

    def in_sync(self) -> bool:
        return self.a.idle() and self.b.idle()

    def stop(self) -> None:
        self.a.stop()
        self.b.stop()

"""Emulated network links for the benchmark (needs root: `ip netns`, `tc`).

The server runs in a network namespace of its own and each client in another, joined to the
server's by a veth pair: one link per client, as a laptop and a desktop each have their own line
to a server. Both ends of every pair are shaped with `tc tbf` to the same rate, so each link
carries that rate each way. rsync, the peer, crosses one such link. Only the standard library.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from types import TracebackType

PREFIX = "tsb"


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def available() -> tuple[bool, str]:
    """Whether namespaces and shaping can be made here, and if not why."""
    probe = f"{PREFIX}-probe"
    try:
        _run("ip", "netns", "add", probe)
        try:
            _run("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root",
                 "tbf", "rate", "1gbit", "burst", "1mb", "latency", "50ms")  # fmt: skip
        finally:
            _run("ip", "netns", "del", probe)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.decode().strip() if isinstance(e, subprocess.CalledProcessError) else e
        return False, f"cannot make network namespaces with tc shaping here ({detail})"
    return True, ""


class Links:
    """`with Links("1gbit", ["a", "b"]) as links:` the namespaces exist inside the block."""

    SERVER = f"{PREFIX}-server"

    def __init__(self, rate: str, clients: Sequence[str]) -> None:
        self.rate = rate
        self.clients = list(clients)

    def namespace(self, client: str) -> str:
        return f"{PREFIX}-{client}"

    def server_address(self, client: str) -> str:
        """The server's address as *client* reaches it, over its own link."""
        return f"10.77.{self.clients.index(client) + 1}.1"

    def client_address(self, client: str) -> str:
        return f"10.77.{self.clients.index(client) + 1}.2"

    def command(self, namespace: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", namespace, *argv]

    def __enter__(self) -> Links:
        self._remove()  # left by a run that was killed
        try:
            _run("ip", "netns", "add", self.SERVER)
            _run("ip", "netns", "exec", self.SERVER, "ip", "link", "set", "lo", "up")
            for i, client in enumerate(self.clients, start=1):
                ns, near, far = self.namespace(client), f"{PREFIX}{i}s", f"{PREFIX}{i}c"
                _run("ip", "netns", "add", ns)
                _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
                _run("ip", "link", "add", near, "netns", self.SERVER, "type", "veth", "peer",
                     "name", far, "netns", ns)  # fmt: skip
                for where, dev, address in (
                    (self.SERVER, near, self.server_address(client)),
                    (ns, far, self.client_address(client)),
                ):
                    _run("ip", "netns", "exec", where, "ip", "addr", "add", f"{address}/24",
                         "dev", dev)  # fmt: skip
                    _run("ip", "netns", "exec", where, "ip", "link", "set", dev, "up")
                    # A burst of 1 MB: at 1 Gbit/s a timer tick (4 ms) sends 500 KB.
                    _run("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root",
                         "tbf", "rate", self.rate, "burst", "1mb", "latency", "50ms")  # fmt: skip
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._remove()

    def _remove(self) -> None:
        # Deleting a namespace deletes the veth ends in it, and their peers.
        for ns in [self.SERVER, *(self.namespace(c) for c in self.clients)]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

"""The systemd user units in contrib/systemd pass `systemd-analyze verify`, pointed at this
installation's `trio-sync`, and start the commands the README documents."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
INSTALLED = "%h/.local/bin/trio-sync"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    trio_sync = Path(sys.executable).parent / "trio-sync"
    assert trio_sync.exists()
    checked = []
    for unit, name in (
        ("trio-sync-server.service", "trio-sync-server.service"),
        ("trio-sync-client@.service", "trio-sync-client@home-me-Sync.service"),
    ):
        text = (UNITS / unit).read_text()
        assert INSTALLED in text
        copy = tmp_path / name
        copy.write_text(text.replace(INSTALLED, str(trio_sync)))
        checked.append(str(copy))
    done = subprocess.run(
        ["systemd-analyze", "verify", *checked], capture_output=True, text=True, timeout=60
    )
    # Warnings of the host's own units are not ours; ours must not be named in any.
    ours = [line for line in done.stderr.splitlines() if "trio-sync" in line]
    assert done.returncode == 0, done.stderr
    assert not ours, done.stderr


def test_the_units_run_the_documented_commands() -> None:
    server = (UNITS / "trio-sync-server.service").read_text()
    client = (UNITS / "trio-sync-client@.service").read_text()
    assert f"ExecStart={INSTALLED} server --data-dir" in server
    assert f"ExecStart={INSTALLED} client %I" in client
    assert "RestartPreventExitStatus=2 3 5" in client  # a revoked token does not loop

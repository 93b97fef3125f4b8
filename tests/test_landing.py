"""Placing a download never replaces a file the user saved after the decision, and conflict copies
are named from the original file's name."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from trio_sync.client.conflicts import conflict_name, move_aside, normalize_name, original_name
from trio_sync.client.landing import check_unchanged, place, swap_in
from trio_sync.client.scanner import LocalFile, stat_key
from trio_sync.core.renames import exchange, rename_noreplace
from trio_sync.errors import LocalChanged

WHEN = datetime(2026, 12, 2, 7, 26, 29, tzinfo=UTC)


def _seen(root: Path, path: str) -> LocalFile:
    """The file at *path* as a decision would have seen it (its hash plays no part here)."""
    return LocalFile(path, stat_key(os.lstat(root / path)), "h", ())


def _download(tmp_path: Path, content: bytes) -> Path:
    work = tmp_path / "state" / "0.part"
    work.parent.mkdir(exist_ok=True)
    work.write_bytes(content)
    return work


def _save(target: Path, content: bytes) -> None:
    """How editors save: a new file renamed over the name."""
    new = target.with_name(".~save")
    new.write_bytes(content)
    os.replace(new, target)


def test_renames_refuse_to_replace_and_exchange_swaps(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    with pytest.raises(FileExistsError):
        rename_noreplace(a, b)
    assert (a.read_bytes(), b.read_bytes()) == (b"A", b"B")
    exchange(a, b)
    assert (a.read_bytes(), b.read_bytes()) == (b"B", b"A")
    with pytest.raises(FileNotFoundError):
        exchange(a, tmp_path / "absent")


def _append(target: Path, content: bytes) -> None:
    with open(target, "ab") as f:
        f.write(content)


@pytest.mark.parametrize(
    ("before", "meanwhile", "after"),
    [
        (b"synced", lambda t: _save(t, b"the user's save"), b"the user's save"),
        (b"synced", lambda t: _append(t, b" and appended"), b"synced and appended"),
        (None, lambda t: t.write_bytes(b"created by the user"), b"created by the user"),
        (b"synced", Path.unlink, None),  # deleted: not brought back
    ],
    ids=["saved-by-rename", "written-in-place", "created", "deleted"],
)
def test_what_the_user_does_between_the_check_and_the_swap_stays(
    tmp_path: Path,
    before: bytes | None,
    meanwhile: Callable[[Path], object],
    after: bytes | None,
) -> None:
    root = tmp_path / "folder"
    root.mkdir()
    target = root / "doc.txt"
    if before is not None:
        target.write_bytes(before)
    expected = _seen(root, "doc.txt") if before is not None else None
    work = _download(tmp_path, b"from the server")
    check_unchanged(target, expected, "doc.txt")  # place's check passes ...
    meanwhile(target)  # ... and the user acts before its swap
    with pytest.raises(LocalChanged):
        swap_in(work, target, expected, "doc.txt", stat_key(os.lstat(work)), str)
    assert (target.read_bytes() if target.exists() else None) == after
    assert work.read_bytes() == b"from the server"  # left for the caller to remove
    assert sorted(p.name for p in root.iterdir()) == (["doc.txt"] if after else [])


def test_placing_replaces_the_checked_file_and_records_our_own_stat(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    root.mkdir()
    (root / "doc.txt").write_bytes(b"synced")
    expected = _seen(root, "doc.txt")
    work = _download(tmp_path, b"from the server")
    ours = stat_key(os.lstat(work))
    assert place(root, work, "doc.txt", expected, sync=False, client="me") == ours
    assert (root / "doc.txt").read_bytes() == b"from the server"
    assert not work.exists()
    assert sorted(p.name for p in root.iterdir()) == ["doc.txt"]


# -- conflict names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("report.docx", "report.sync-conflict-20261202-072629-me.docx"),
        ("d/f0", "d/f0.sync-conflict-20261202-072629-me"),
        (".bashrc", ".bashrc.sync-conflict-20261202-072629-me"),
        # A conflict on a conflict copy: named from the original, not a chain of tags.
        (
            "f0.sync-conflict-20261202-072435-c1.sync-conflict-20261202-072440-c2"
            ".sync-conflict-20261202-072429-c0",
            "f0.sync-conflict-20261202-072629-me",
        ),
        # An older tag is not taken for the extension.
        ("d1/f1.sync-conflict-20261202-072629-c2", "d1/f1.sync-conflict-20261202-072629-me"),
        (
            "f3.sync-conflict-20261202-072526-c3.sync-conflict-20261202-072557-c1.txt",
            "f3.sync-conflict-20261202-072629-me.txt",
        ),
    ],
)
def test_conflict_copies_are_named_from_the_original_name(path: str, expected: str) -> None:
    assert conflict_name(path, "me", WHEN) == expected


def test_a_dotted_client_name_does_not_read_as_an_extension() -> None:
    copy = conflict_name("notes.txt", "laptop.local", WHEN)
    assert copy == "notes.sync-conflict-20261202-072629-laptop-local.txt"
    assert original_name(copy) == "notes.txt"
    assert conflict_name(copy, "desk", WHEN) == "notes.sync-conflict-20261202-072629-desk.txt"


def test_moving_aside_never_replaces_an_existing_copy(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"mine")
    taken = tmp_path / conflict_name("a.txt", "me", datetime.now(UTC))
    taken.write_bytes(b"an older copy")
    copy = move_aside(tmp_path / "a.txt", "a.txt", "me")
    assert (tmp_path / copy).read_bytes() == b"mine"
    assert taken.read_bytes() == b"an older copy"


def test_an_nfc_rename_onto_a_taken_name_keeps_both(tmp_path: Path) -> None:
    (tmp_path / "cafe\u0301").write_bytes(b"decomposed")
    (tmp_path / "caf\u00e9").write_bytes(b"composed")
    new = normalize_name(tmp_path, "cafe\u0301", "me")
    assert new.startswith("caf\u00e9.sync-conflict-")
    assert (tmp_path / new).read_bytes() == b"decomposed"
    assert (tmp_path / "caf\u00e9").read_bytes() == b"composed"


def test_a_conflict_name_fits_the_filesystem_however_long_the_original() -> None:
    """Review L7: a name of more than about 218 bytes made a conflict copy name over 255 bytes,
    and the conflict was retried for ever."""
    for name in ["é" * 120 + ".txt", "x" * 255, "a." + "e" * 250, "ü" * 127]:
        copy = conflict_name(f"dir/{name}", "laptop", WHEN).split("/")[1]
        assert len(copy.encode("utf-8")) <= 255
        assert "sync-conflict-20261202-072629-laptop" in copy
        assert copy[:1] == name[:1]

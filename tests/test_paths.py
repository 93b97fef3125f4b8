import pytest

from trio_sync.errors import InvalidPath
from trio_sync.protocol.paths import check_path


@pytest.mark.parametrize(
    "path",
    ["a.txt", "dir/sub/file", "é.txt", "with space/x", ".hidden", "a/.trio-sync", "back\\slash"],
)
def test_accepts_plain_relative_paths(path: str) -> None:
    assert check_path(path) == path


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("../x", "'..'"),
        ("a/../../x", "'..'"),
        ("a/./b", "'.'"),
        ("a//b", "empty"),
        ("a/", "empty"),
        ("a\x00b", "control"),
        ("a\nb", "control"),
        ("a\x7fb", "control"),
        ("e\u0301.txt", "NFC"),
        (".trio-sync/state.db", "reserved"),
        (".trio-sync", "reserved"),
        # The state folder on a case-insensitive filesystem, or vfat (review M3).
        (".TRIO-SYNC/state.db", "reserved"),
        (".Trio-Sync/lock", "reserved"),
        (".trio-\u017fync/x", "reserved"),
        (".trio-sync./x", "reserved"),
        (".trio-sync /x", "reserved"),
        # C1 controls, separators and bidirectional controls (review L4).
        ("a\x9bb", "control"),
        ("a\x85b", "control"),
        ("a\u2028b", "control"),
        ("evil\u202etxt.exe", "bidirectional"),
        ("a\u2066b", "bidirectional"),
        ("x" * 256, "longer than 255"),
        ("a/" * 2100 + "b", "longer than 4096"),
    ],
)
def test_rejects_unsafe_paths_with_a_reason(path: str, why: str) -> None:
    with pytest.raises(InvalidPath, match=why):
        check_path(path)


def test_rejects_non_strings() -> None:
    with pytest.raises(InvalidPath):
        check_path(None)  # type: ignore[arg-type]

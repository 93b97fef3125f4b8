"""Names for conflict copies, and putting a file aside under one without replacing anything.

A conflict copy is named from the original file's name: `dir/report.docx` becomes
`dir/report.sync-conflict-20261124-153012-laptop.docx`. A conflict on a copy does not stack a
second tag on the first (`report.sync-conflict-A-x.sync-conflict-B-y.docx`), nor mistake an older
tag for the extension: every tag is taken out first. The server's history keeps the lineage.
"""

from __future__ import annotations

import os
import re
import unicodedata
from datetime import UTC, datetime
from pathlib import Path

from ..core.renames import RenameUnsupported, rename_noreplace
from ..protocol.paths import MAX_COMPONENT_BYTES

#: A tag this module wrote. The client's part never holds a "." (see `_tag`), so a tag ends at
#: the next "." (the extension) or at the end of the name.
CONFLICT_TAG = re.compile(r"\.sync-conflict-\d{8}-\d{6}-[^./]+")


def original_name(name: str) -> str:
    """*name* without any conflict tag: `f.sync-conflict-…-a.sync-conflict-…-b.txt` → `f.txt`."""
    stripped = CONFLICT_TAG.sub("", name)
    return stripped or name


def _tag(client: str, when: datetime) -> str:
    # A "." in a host name would read as the start of an extension; "-" keeps the name legible.
    return f"sync-conflict-{when.strftime('%Y%m%d-%H%M%S')}-{client.replace('.', '-')}"


def conflict_name(path: str, client: str, when: datetime) -> str:
    """`dir/report.docx` → `dir/report.sync-conflict-20261124-153012-laptop.docx`. The stem is
    shortened (at a character boundary) where the name would not fit in MAX_COMPONENT_BYTES."""
    folder, _, name = path.rpartition("/")
    stem, dot, ext = original_name(name).rpartition(".")
    if not stem:  # no extension, or a dotfile such as ".bashrc"
        stem, dot, ext = original_name(name), "", ""
    tail = f".{_tag(client, when)}{dot}{ext}"
    room = MAX_COMPONENT_BYTES - len(tail.encode("utf-8"))
    if room < 1:  # an extension too long to keep: the tag alone, after the stem's start
        tail, room = f".{_tag(client, when)}", MAX_COMPONENT_BYTES - len(_tag(client, when)) - 1
    new = _cut(stem, room) + tail
    return f"{folder}/{new}" if folder else new


def _cut(text: str, limit: int) -> str:
    """*text* cut to at most *limit* UTF-8 bytes, never inside a character."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def free_conflict_name(folder: Path, path: str, client: str) -> str:
    """A conflict name for *path* (a wire path) whose last component nothing in *folder*, the
    local folder that holds *path*, has now. Blocking."""
    when = datetime.now(UTC)
    candidate = conflict_name(path, client, when)
    n = 1
    while os.path.lexists(folder / candidate.rpartition("/")[2]):
        n += 1
        candidate = conflict_name(path, f"{client}-{n}", when)
    return candidate


def move_aside(source: Path, path: str, client: str, *, folder: Path | None = None) -> str:
    """Rename *source*, the local file or folder of wire path *path*, to a free conflict name
    in *folder* (by default the one it is in), never over another file (a name taken in the
    meantime is skipped). Returns the new wire path. Blocking."""
    folder = source.parent if folder is None else folder
    while True:
        candidate = free_conflict_name(folder, path, client)
        target = folder / candidate.rpartition("/")[2]
        try:
            rename_noreplace(source, target)
        except FileExistsError:
            continue  # taken since we looked: find another
        except RenameUnsupported:
            os.rename(source, target)
        return candidate


def normalize_name(root: Path, rel: str, client: str) -> str:
    """Rename local *rel* to its NFC form; if that name is taken, to a conflict name of it."""
    target = unicodedata.normalize("NFC", rel)
    try:
        rename_noreplace(root / rel, root / target)
    except FileExistsError:
        return _renamed_aside(root, rel, target, client)
    except RenameUnsupported:
        if os.path.lexists(root / target):
            return _renamed_aside(root, rel, target, client)
        os.rename(root / rel, root / target)
    return target


def _renamed_aside(root: Path, rel: str, target: str, client: str) -> str:
    """*rel* renamed to a conflict name of *target*, in *rel*'s folder."""
    folder, _, _ = rel.rpartition("/")
    if unicodedata.normalize("NFC", folder) != folder:
        raise OSError(f"{rel!r}: its folder needs its NFC name first")
    return move_aside(root / rel, target, client)


def resolve(root: Path, copy: str, keep: str) -> str:
    """Settle conflict copy *copy* (a wire path) in synced folder *root*: *keep* "mine" puts the
    copy's content in place of the original (one rename over it), "theirs" deletes the copy,
    "both" gives the copy a plain name beside the original (`report (from laptop).txt`). The
    running client sends the result like any local change. Returns what was done. Blocking."""
    folder, _, name = copy.rpartition("/")
    match = CONFLICT_TAG.search(name)
    if match is None:
        raise ValueError(f"{copy} is not a conflict copy")
    source = root / copy
    if not os.path.lexists(source):
        raise ValueError(f"{copy} does not exist")
    original = original_name(name)
    where = f"{folder}/" if folder else ""
    if keep == "theirs":
        if source.is_dir() and not source.is_symlink():
            raise ValueError(f"{copy} is a folder: look inside and delete it yourself")
        source.unlink()
        return f"deleted {copy}; {where}{original} stays as it is"
    if keep == "mine":
        os.replace(source, root / folder / original)
        return f"{where}{original} now holds what {copy} held"
    if keep == "both":
        client = match[0].removeprefix(".sync-conflict-").split("-", 2)[2]
        stem, dot, ext = original.rpartition(".")
        base = (
            f"{stem} (from {client}){dot}{ext}" if dot and stem else f"{original} (from {client})"
        )
        n, candidate = 1, base
        while True:
            try:
                rename_noreplace(source, root / folder / candidate)
            except FileExistsError:
                n += 1
                candidate = base.replace(f"(from {client})", f"(from {client} {n})")
                continue
            except RenameUnsupported:
                os.rename(source, root / folder / candidate)
            return f"kept both: {where}{candidate} beside {where}{original}"
    raise ValueError(f"--keep must be mine, theirs or both, not {keep!r}")

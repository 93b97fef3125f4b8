"""The three-way decision for one path: base (last synced), local (on disk), remote (server).

Pure: no I/O, no clock. Every sync decision of the client, at start-up and live, comes from
`decide`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True, slots=True)
class Content:
    """What makes two versions the same for sync purposes. A folder's content is just that."""

    hash: str
    executable: bool = False
    is_dir: bool = False


@dataclass(frozen=True, slots=True)
class Side:
    """A version as seen by `decide`: a revision (0 for local) and its content."""

    rev: int
    content: Content


class Action(Enum):
    NOTHING = "nothing"
    #: Both sides already agree; remember the remote version as the new base.
    ADOPT = "adopt"
    #: Both sides deleted the path; forget the base.
    FORGET = "forget"
    UPLOAD = "upload"
    DELETE_REMOTE = "delete-remote"
    DOWNLOAD = "download"
    DELETE_LOCAL = "delete-local"
    #: Both sides changed the content differently: keep local bytes as a conflict copy, then
    #: take the server's version at the path.
    CONFLICT = "conflict"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    #: For UPLOAD / DELETE_REMOTE: the revision the change is based on (0: "path absent").
    base_rev: int = 0
    reason: str = ""


def decide(base: Side | None, local: Content | None, remote: Side | None) -> Decision:
    """Decide what to do with one path. `None` means "absent" (never existed, or deleted)."""
    local_changed = (base.content if base else None) != local
    remote_changed = (base.rev if base else 0) != (remote.rev if remote else 0)
    remote_rev = remote.rev if remote else 0

    if not local_changed and not remote_changed:
        return Decision(Action.NOTHING)
    if local_changed and not remote_changed:
        if local is None:
            return Decision(Action.DELETE_REMOTE, base_rev=remote_rev, reason="deleted locally")
        why = "new local file" if base is None else "changed locally"
        return Decision(Action.UPLOAD, base_rev=remote_rev, reason=why)
    if remote_changed and not local_changed:
        if remote is None:
            return Decision(Action.DELETE_LOCAL, reason="deleted on the server")
        why = "new on the server" if base is None else "changed on the server"
        return Decision(Action.DOWNLOAD, reason=why)

    # Both sides moved on since the base.
    if local is None and remote is None:
        return Decision(Action.FORGET, reason="deleted on both sides")
    if remote is not None and local == remote.content:
        return Decision(Action.ADOPT, reason="same content on both sides")
    if local is None:
        return Decision(Action.DOWNLOAD, reason="changed on the server, deleted locally: edit wins")
    if remote is None:
        return Decision(
            Action.UPLOAD, base_rev=0, reason="changed locally, deleted on the server: edit wins"
        )
    if local.is_dir != remote.content.is_dir:
        return Decision(Action.CONFLICT, reason="a file and a folder with the same name")
    return Decision(Action.CONFLICT, reason="changed on both sides")

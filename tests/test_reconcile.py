"""The three-way decision, case by case. These rules are the heart of "nothing is lost"."""

import pytest

from trio_sync.core.reconcile import Action, Content, Side, decide

A = Content("a" * 64, False)
B = Content("b" * 64, False)
C = Content("c" * 64, False)
A_EXEC = Content("a" * 64, True)


def side(rev: int, content: Content) -> Side:
    return Side(rev, content)


@pytest.mark.parametrize(
    ("base", "local", "remote", "action", "base_rev"),
    [
        # Nothing changed anywhere.
        (None, None, None, Action.NOTHING, 0),
        (side(3, A), A, side(3, A), Action.NOTHING, 0),
        # Only the local side changed.
        (None, A, None, Action.UPLOAD, 0),
        (side(3, A), B, side(3, A), Action.UPLOAD, 3),
        (side(3, A), A_EXEC, side(3, A), Action.UPLOAD, 3),  # the executable bit is content
        (side(3, A), None, side(3, A), Action.DELETE_REMOTE, 3),
        # Only the server changed.
        (None, None, side(5, A), Action.DOWNLOAD, 0),
        (side(3, A), A, side(5, B), Action.DOWNLOAD, 0),
        (side(3, A), A, None, Action.DELETE_LOCAL, 0),
        # Both changed.
        (side(3, A), None, None, Action.FORGET, 0),
        (side(3, A), B, side(5, B), Action.ADOPT, 0),  # same result on both sides
        (None, A, side(5, A), Action.ADOPT, 0),  # first sync of identical folders
        (side(3, A), None, side(5, B), Action.DOWNLOAD, 0),  # edit beats delete
        (side(3, A), B, None, Action.UPLOAD, 0),  # edit beats delete
        (side(3, A), B, side(5, C), Action.CONFLICT, 0),
        (None, A, side(5, B), Action.CONFLICT, 0),  # both created different files
    ],
)
def test_decide(
    base: Side | None,
    local: Content | None,
    remote: Side | None,
    action: Action,
    base_rev: int,
) -> None:
    decision = decide(base, local, remote)
    assert decision.action is action
    assert decision.base_rev == base_rev


def test_every_action_but_nothing_says_why() -> None:
    decision = decide(side(3, A), B, side(5, C))
    assert "both" in decision.reason

import pytest

from trio_sync.core.ignore import IGNORE_FILE, IgnoreRules

RULES = IgnoreRules.parse("# comment\nbuild/\n*.log\n!keep.log\n/top-only.txt\nnode_modules\n")


@pytest.mark.parametrize(
    ("path", "is_dir", "ignored"),
    [
        ("build", True, True),
        ("build/out.o", False, True),
        ("src/build/out.o", False, True),
        ("build", False, False),  # "build/" names folders only
        ("debug.log", False, True),
        ("deep/debug.log", False, True),
        ("keep.log", False, False),  # negation
        ("top-only.txt", False, True),
        ("sub/top-only.txt", False, False),  # anchored to the root
        ("node_modules/a/b.js", False, True),
        ("notes.txt", False, False),
        (IGNORE_FILE, False, False),
    ],
)
def test_gitignore_semantics(path: str, is_dir: bool, ignored: bool) -> None:
    assert RULES.ignored(path, is_dir=is_dir) is ignored


def test_the_rules_file_itself_always_syncs() -> None:
    assert not IgnoreRules.parse("*\n").ignored(IGNORE_FILE)
    assert IgnoreRules.parse("*\n").ignored("anything")


def test_no_rules_ignore_nothing() -> None:
    assert not IgnoreRules().ignored("a/b/c")

"""Ignore rules: `.trio-syncignore` at the folder root, in gitignore syntax (via pathspec).

The rules file itself always syncs, so every client ends up with the same rules. The state
folder and our temp files (which live inside it) are never seen at all.
"""

from __future__ import annotations

from collections.abc import Iterable

import pathspec

IGNORE_FILE = ".trio-syncignore"


class IgnoreRules:
    def __init__(self, lines: Iterable[str] = ()) -> None:
        self._spec = pathspec.GitIgnoreSpec.from_lines(list(lines))
        self._empty = len(self._spec.patterns) == 0

    @classmethod
    def parse(cls, text: str) -> IgnoreRules:
        return cls(text.splitlines())

    def ignored(self, path: str, *, is_dir: bool = False) -> bool:
        """True if *path* (a wire path) is ignored; a folder's contents go with the folder."""
        if self._empty or path == IGNORE_FILE:
            return False
        return bool(self._spec.match_file(path + "/" if is_dir else path))

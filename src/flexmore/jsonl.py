"""JSON Lines input: every reader of user files (tasks, training text, results) goes through here."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from .errors import FlexmoreError


def jsonl_objects(text: str, where: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is an error
    naming `where:line`. Lines split on "\\n" only: JSON strings may hold U+2028 and friends, where
    str.splitlines() would cut."""
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FlexmoreError(f"{where}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise FlexmoreError(f"{where}:{lineno}: expected a JSON object")
        yield lineno, obj

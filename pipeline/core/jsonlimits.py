"""Why ``json.loads`` failed on a user's file past the JSON grammar: nesting deeper than Python's recursion allows
(``RecursionError``) or an integer longer than Python converts (``ValueError``, ``sys.get_int_max_str_digits``)."""

from __future__ import annotations

import re
import sys


def _line_column(text: str, pos: int) -> str:
    """``line L column C`` of ``pos`` (``column C`` in a one-line text, such as a JSONL record)."""
    column = pos - text.rfind("\n", 0, pos)
    return f"line {text.count(chr(10), 0, pos) + 1} column {column}" if "\n" in text.strip() else f"column {column}"


def _deepest(text: str) -> tuple[int, int]:
    """(depth, position) of the first bracket at the greatest nesting depth, outside strings."""
    depth = best = where = 0
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > best:
                best, where = depth, i
        elif ch in "]}":
            depth -= 1
    return best, where


def json_limit_reason(text: str, exc: RecursionError | ValueError) -> str:
    """What in ``text`` ``json.loads`` could not read, and where (for its error line)."""
    if isinstance(exc, RecursionError):
        depth, pos = _deepest(text)
        return f"nested {depth} levels deep at {_line_column(text, pos)}, deeper than Python's JSON reader goes"
    limit = sys.get_int_max_str_digits()
    number = re.search(rf"\d{{{limit + 1},}}", text) if limit else None
    if number is None:
        return f"unreadable JSON ({exc})"
    return (f"a number of {len(number.group())} digits at {_line_column(text, number.start())}, more than Python "
            f"reads ({limit})")

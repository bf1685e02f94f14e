"""Near-match suggestions for misspelt names (plan patterns, config keys, flags), with difflib."""
from __future__ import annotations

import difflib


def closest(word: str, choices) -> str | None:
    """The choice closest to ``word`` (difflib's ratio of at least 0.6), or None."""
    near = difflib.get_close_matches(word, list(choices), n=1)
    return near[0] if near else None


def did_you_mean(word: str, choices) -> str:
    """``": did you mean 'x'?"`` for the choice closest to ``word``, or "" when none is close."""
    near = closest(word, choices)
    return f": did you mean {near!r}?" if near is not None else ""

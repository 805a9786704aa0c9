"""The one "did you mean" helper for messages about a misspelt name (config keys, recipes, losses,
rewards, trackers, health rules, file keys)."""

from __future__ import annotations

import difflib


def closest(name, choices, cutoff: float = 0.6) -> str | None:
    """The choice nearest to `name` (difflib's ratio at least `cutoff`), or None."""
    found = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=cutoff)
    return found[0] if found else None


def did_you_mean(name, choices, cutoff: float = 0.6) -> str:
    """' Did you mean `x`?' for the nearest choice, or '' when none is near: append it to a message."""
    near = closest(name, choices, cutoff)
    return f" Did you mean `{near}`?" if near else ""

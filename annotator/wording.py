"""Counts and lists in the lines people read: ``1 video``, ``2 videos``, ``a, b, c and 4 more``."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural (with an s) unless ``n`` is 1."""
    return f"{n} {noun}{'s' * (n != 1)}"


def listed(items: list, shown: int = 3) -> str:
    """The first ``shown`` of ``items``, comma-separated, and how many more there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(map(str, items[:shown])) + more

"""Counts in the lines people read: ``1 video``, ``2 videos``."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural (with an s) unless ``n`` is 1."""
    return f"{n} {noun}{'s' * (n != 1)}"

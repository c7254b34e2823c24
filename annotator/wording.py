"""Counts, lists and file names in the lines people read: ``1 video``, ``2 videos``, ``a, b, c and 4
more``, ``caf\\xe9.mp4``."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """``n`` (with thousands separators: "7,500 frames") and ``noun``, plural (with an s) unless
    ``n`` is 1."""
    return f"{n:,} {noun}{'s' * (n != 1)}"


def listed(items: list, shown: int = 3) -> str:
    """The first ``shown`` of ``items``, comma-separated, and how many more there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(map(str, items[:shown])) + more


def utf8_text(value: str) -> str:
    """``value`` as valid UTF-8 for a string column: a file name that is not UTF-8 (Linux names
    are bytes; Python carries the stray ones as lone surrogates) keeps those bytes as ``\\xNN``,
    e.g. ``caf\\xe9.mp4`` for Latin-1 ``café.mp4``. Why: Arrow refuses lone surrogates, and one
    such name among thousands must not stop a run."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")

"""Nodes that cannot read the videos the driver reads: their videos go to other nodes.

Why: on a cluster every node must see the videos at the driver's paths (a shared filesystem).
A node where that share is not mounted, has gone stale (NFS ``ESTALE``) or hangs up (a FUSE mount's
``ENOTCONN``) fails each video it is given in a millisecond, so it takes the next at once: tried
on a 2-node cluster with one such node, it took 7 of 8 videos and the run "finished" with 7
failed. One bad node among twenty would fail nearly a whole corpus in minutes.

So a worker first opens its video (:func:`unreadable_here`); if that fails, its failed row says
which node it runs on (:data:`UNREADABLE_FACT` in the row's video facts). The driver opens the
same path (:func:`misplaced`): if it can, the node is at fault, not the video, and the pool
(:mod:`annotator.actor_pool`) gives the video to another node and benches this one
(:class:`BenchedNodes`): its workers get no videos for a minute, then two, doubling up to half
an hour, so a mount that comes back is used again. If the driver cannot read the file either,
it is gone, and the failed row stands. When no worker of the run has read a video yet and every
one is on a benched node, the run stops in one line (:class:`NoNodeCanRead`): waiting would not help.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

#: The key of a failed row's video facts (``worker.VIDEO_COLUMN``) that names the worker's node.
UNREADABLE_FACT = "unreadable_on"
#: How long a node that cannot read the videos is first left out, and the most it ever is.
FIRST_BENCH_S = 60.0
LONGEST_BENCH_S = 1800.0


def unreadable_here(path: Path) -> str | None:
    """Why this process cannot open ``path`` for reading (the system's words), or None if it can.

    One ``open`` per video: a millisecond on a network share, against seconds of decoding."""
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


@functools.cache
def this_node() -> dict[str, str] | None:
    """This Ray worker's node (its id, and its address for people), None outside Ray."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return {"node_id": ray.get_runtime_context().get_node_id(), "address": ray.util.get_node_ip_address()}


def unreadable_facts(node: dict[str, str] | None) -> str | None:
    """A failed row's video facts (JSON) naming the node that could not open the video."""
    return json.dumps({UNREADABLE_FACT: node}) if node else None


class Misplaced(NamedTuple):
    """A video a node could not open while the driver can: the node's fault, not the video's."""

    node_id: str
    address: str
    reason: str  # the node's error, e.g. "/shared/a.mp4: No such file or directory"


def misplaced(path: Path, facts: dict[str, Any], error: str | None) -> Misplaced | None:
    """The node at fault when a worker's failed row (its video ``facts`` and its ``error``) says
    the worker could not open ``path`` and this process can; else None (the row stands: a bad
    video, or a file gone for everyone)."""
    node = facts.get(UNREADABLE_FACT)
    if not node or unreadable_here(path) is not None:
        return None
    return Misplaced(str(node["node_id"]), str(node["address"]), error or f"{path}: cannot be opened")


class NoNodeCanRead(Exception):
    """Every worker of the run is on a node that cannot read the videos, and none has read one."""


@dataclass
class _Bench:
    until: float
    seconds: float


@dataclass
class BenchedNodes:
    """Which nodes are left out of the pool's work for now, and until when.

    Actors are known by their node once one of their items comes back :class:`Misplaced`: an
    actor of a benched node not yet known so wastes one quick failed open, which is how it
    becomes known. ``first_s``/``longest_s``: the back-off (tests shorten it).
    """

    first_s: float = FIRST_BENCH_S
    longest_s: float = LONGEST_BENCH_S
    node_of: dict[Any, str] = field(default_factory=dict)  # actor → node id
    benches: dict[str, _Bench] = field(default_factory=dict)  # node id → its current or last bench
    said: dict[str, Misplaced] = field(default_factory=dict)  # node id → what it said last
    read_any: bool = False  # an actor of this run has sent a result that was not misplaced
    #: Bench warnings held back until a worker reads a video: if none ever does, the run's one
    #: line (:class:`NoNodeCanRead`) says it all.
    held: list[str] = field(default_factory=list)

    def bench(self, actor: Any, wrong: Misplaced) -> None:
        """``actor``'s item came back :class:`Misplaced`: bench its node, unless it is already
        (its other actors' items come back too, once each), and say so once per bench."""
        self.node_of[actor], self.said[wrong.node_id] = wrong.node_id, wrong
        now = time.monotonic()
        last = self.benches.get(wrong.node_id)
        if last is not None and last.until > now:
            return
        seconds = self.first_s if last is None else min(last.seconds * 2, self.longest_s)
        self.benches[wrong.node_id] = _Bench(now + seconds, seconds)
        again = "still cannot" if last is not None else "cannot"
        self.held.append(f"node {wrong.address} {again} open {_reason(wrong.reason)}, which this machine reads: "
                         f"are the videos mounted there at the same path? Its videos go to other nodes; it "
                         f"gets none for {_duration(seconds)}")
        if self.read_any:
            self.note_read()

    def note_read(self) -> None:
        """A worker has sent a result that was not misplaced: the benches are worth telling."""
        self.read_any = True
        for line in self.held:
            log.warning("%s", line)
        self.held.clear()

    def benched(self, actor: Any) -> bool:
        """Whether ``actor`` is known to be on a node benched now."""
        node = self.node_of.get(actor)
        bench = self.benches.get(node) if node is not None else None
        return bench is not None and bench.until > time.monotonic()

    def forget(self, actor: Any) -> None:
        """``actor`` is dead (replaced): its replacement may be placed on any node."""
        self.node_of.pop(actor, None)

    def seconds_to_next(self) -> float:
        """Seconds until the next bench ends (0 if none is on)."""
        now = time.monotonic()
        return max(0.0, min((b.until - now for b in self.benches.values() if b.until > now), default=0.0))

    def check_all_benched(self, actors: list[Any]) -> None:
        """Stop the run where waiting would not help: every actor is on a benched node and no
        worker of the run has read a video yet (the videos are on no node's path, or only on
        this machine's). Once some have, a bench is waited out: a share that comes back.

        Raises:
            NoNodeCanRead: naming the nodes and what they said.
        """
        if self.read_any or not actors or not all(self.benched(actor) for actor in actors):
            return
        said = [self.said[node] for node in sorted({self.node_of[actor] for actor in actors})]
        nodes = "node " + said[0].address if len(said) == 1 else f"{len(said)} nodes, such as {said[0].address},"
        raise NoNodeCanRead(f"no Ray worker can open the videos this machine reads: {nodes} cannot open "
                            f"{_reason(said[0].reason)}; put them on a path that every node mounts at the same place")


def _reason(reason: str) -> str:
    """``/shared/a.mp4 (No such file or directory)`` from a row's ``/shared/a.mp4: No such ...``."""
    path, sep, why = reason.rpartition(": ")
    return f"{path} ({why})" if sep else reason


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"

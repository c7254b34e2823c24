"""Work items spread over a fixed pool of Ray actors, each item's results streamed back as the
actor yields them.

Why not Ray Data's ``map_batches`` (what this project used first): for one unit of work per
video it added a streaming executor in the driver and three helper actors (stats, autoscaling
coordinator, actor-location tracker), which cost 2-3 s of a run's fixed start-up on 2 cores
(``steady_fps.py`` intercept: 10.4-12.6 s with Ray Data, 8.2-8.9 s with this pool) and gave
nothing a video-per-call pool needs. What is kept from it:

- one item in flight per actor, so a long video never queues others behind it;
- results stream back with Ray's streaming generators, and each actor may run at most
  :data:`BACKPRESSURE` tables ahead of the driver, so memory stays flat however large the corpus;
- models load once per actor (the actor class's constructor).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)

#: Tables one actor may yield before the driver has taken them (Ray then pauses the generator).
BACKPRESSURE = 4
_WAIT_S = 5.0
_WARN_AFTER_S = 60.0


def stream_from_pool(actors: list[Any], items: Iterable[Any], method: str = "annotate") -> Iterator[Any]:
    """What ``actor.<method>(item)`` yields, for every item, from whichever actor is free.

    An actor gets work once it has started (its models are loaded), so actors that Ray cannot
    place (``--workers 2`` on a cluster that has lost a node) hold nothing up: the others do
    the work. Tables of different items interleave; those of one item keep their order. The
    actors are killed when the stream ends, is closed early or fails, so no model-holding
    process outlives the run.

    Raises:
        ray.exceptions.RayError: an actor died (its node went away, it ran out of memory) or
            could not be built; the caller turns it into one line for the user.
    """
    import ray

    queue = deque(items)
    starting = {actor.__ray_ready__.remote(): actor for actor in actors}  # Ray's "constructor done" call
    idle: list[Any] = []
    running: dict[Any, Any] = {}  # ObjectRefGenerator → the actor producing it
    waited = 0.0
    try:
        while queue or running:
            while queue and idle:
                actor = idle.pop()
                call = getattr(actor, method).options(num_returns="streaming",
                                                      _generator_backpressure_num_objects=BACKPRESSURE)
                running[call.remote(queue.popleft())] = actor
            # A generator is "ready" when its next table is, or when it has ended.
            ready, _ = ray.wait([*running, *(starting if queue else ())], num_returns=1, timeout=_WAIT_S)
            if not ready:
                waited += _WAIT_S
                if not running and waited >= _WARN_AFTER_S:
                    log.warning("no worker has started after %.0f s: Ray cannot place them yet "
                                "(see its resource messages above); waiting", waited)
                    waited = float("-inf")  # once
                continue
            for ready_one in ready:
                if ready_one in starting:
                    ray.get(ready_one)  # raises if the constructor failed
                    idle.append(starting.pop(ready_one))
                    continue
                try:
                    ref = next(ready_one)
                except StopIteration:
                    idle.append(running.pop(ready_one))
                    continue
                yield ray.get(ref)
    finally:
        for actor in actors:
            ray.kill(actor)

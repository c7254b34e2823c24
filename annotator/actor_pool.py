"""Work items spread over a fixed pool of Ray actors, each item's results streamed back as the
actor yields them.

Why not Ray Data's ``map_batches`` (what this project used first): for one unit of work per
video it added a streaming executor in the driver and three helper actors (stats, autoscaling
coordinator, actor-location tracker), which cost 2-3 s of a run's fixed start-up on 2 cores
(``steady_fps.py`` intercept: 10.4-12.6 s with Ray Data, 8.2-8.9 s with this pool) and gave
nothing a video-per-call pool needs. What is kept from it:

- one item in flight per actor, so a long video never queues others behind it;
- results stream back with Ray's streaming generators, and each actor may run at most
  :data:`BACKPRESSURE` tables (about a second of rows each, ``worker.TABLE_EVERY_S``) ahead of the
  driver, so memory stays flat however large the corpus;
- models load once per actor (the actor class's constructor).

With a stall timeout, a busy actor is also asked whether it is alive (:class:`LivenessChecks`):
the worker's own watchdog (:mod:`annotator.watchdog`) cannot end a process that is frozen
whole (stopped by a signal or a paused container, or stuck in the kernel on a read from a dead
mount), and Ray does not notice one either, as its sockets stay open.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from annotator.node_access import BenchedNodes, Misplaced

log = logging.getLogger(__name__)

#: Tables one actor may yield before the driver has taken them (Ray then pauses the generator).
BACKPRESSURE = 4
#: Deaths of its worker after which an item is given up: one retry, for a node lost or an OOM kill
#: caused by a neighbour; a file that kills its worker twice is taken to be the cause.
TRIES = 2
#: What :func:`death_reason` says of an actor whose node was lost (Ray's "its node has died").
NODE_LOST = "its node was lost"
#: Node losses an item may meet before it is given up. A lost node (a spot instance taken back, a
#: machine gone) is not the video's doing, so these count apart from the deaths of :data:`TRIES`:
#: on a preemptible cluster, a long video's segment that met two of them was recorded as failed.
#: The cap only keeps an item from going round for ever.
NODE_LOSSES = 4
#: Workers (per worker of the pool) that may die while starting, one after another, before the
#: run stops: one that dies loading its models every time (too little memory) must not loop.
START_DEATHS = 3
#: The actors' concurrency group (``ray.remote(concurrency_groups={HEALTH_GROUP: 1})``) and
#: method that answer the driver's liveness checks while the default group runs an item.
HEALTH_GROUP = "health"
ALIVE_METHOD = "alive"
_WAIT_S = 5.0
#: How long a dead actor's probe may take to fail (Ray fails it with the item's call, at once).
_PROBE_WAIT_S = 10.0
_WARN_AFTER_S = 60.0
_CHECK_EVERY_S = 30.0
#: How often the pool asks whether the cluster has grown (``wanted``): one small call to the GCS.
GROW_EVERY_S = 10.0


class LivenessChecks:
    """Asks each busy actor, every little while, whether it is alive, and tells which have not
    answered for ``stall_s`` seconds: their processes are frozen, not merely slow.

    Why an answer means alive: the actor answers on a thread of its own (its
    :data:`HEALTH_GROUP`), so a busy item does not delay it; a process that is stopped, or stuck
    in the kernel, answers nothing. A process that runs but holds the GIL for ``stall_s`` is
    ended by its own watchdog first. A check is one small call per actor every
    ``min(30, stall_s / 4)`` seconds.
    """

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.every_s = min(_CHECK_EVERY_S, stall_s / 4)
        self._asked: dict[Any, tuple[Any, float]] = {}  # key → (the pending answer, when it was asked)
        self._answered: dict[Any, float] = {}  # key → when it last answered (or started its item)

    def start(self, key: Any) -> None:
        """``key`` (the item's generator) has started on an actor: check from now on."""
        self._answered[key] = time.monotonic()

    def stop(self, key: Any) -> None:
        """``key`` is over (finished, or its actor died): no more checks."""
        self._asked.pop(key, None)
        self._answered.pop(key, None)

    def frozen(self, actors: dict[Any, Any]) -> list[Any]:
        """The keys of ``actors`` (key → actor) that have not answered for ``stall_s``; asks the
        others that are due a check."""
        import ray

        pending = [answer for answer, _ in self._asked.values()]
        answered = set(ray.wait(pending, num_returns=len(pending), timeout=0)[0]) if pending else set()
        now, frozen = time.monotonic(), []
        for key, actor in actors.items():
            answer, asked_at = self._asked.get(key, (None, now))
            if answer is not None and answer in answered:  # alive (or dead: its item's generator says so)
                del self._asked[key]
                self._answered[key], answer = now, None
            if answer is not None:
                if now - asked_at >= self.stall_s:
                    frozen.append(key)
            elif now - self._answered.get(key, now) >= self.every_s:
                method = getattr(actor, ALIVE_METHOD).options(concurrency_group=HEALTH_GROUP)
                self._asked[key] = (method.remote(), now)
        return frozen


def stream_from_pool(actors: list[Any], items: Iterable[Any], method: str = "annotate", *,
                     replace: Callable[[], Any] | None = None,
                     gave_up: Callable[[Any, str, int], Any] | None = None, tries: int = TRIES,
                     stall_s: float = 0.0, misplaced: Callable[[Any, Any], Misplaced | None] | None = None,
                     bench: BenchedNodes | None = None,
                     wanted: Callable[[int], int] | None = None,
                     retry_elsewhere: Callable[[Any, Any], str | None] | None = None) -> Iterator[Any]:
    """What ``actor.<method>(item)`` yields, for every item, from whichever actor is free.

    An actor gets work once it has started (its models are loaded), so actors that Ray cannot
    place (``--workers 2`` on a cluster that has lost a node) hold nothing up: the others do
    the work. Tables of different items interleave; those of one item keep their order. The
    actors are killed when the stream ends, is closed early or fails, so no model-holding
    process outlives the run.

    An actor that dies on an item (a native crash on a hostile file, the OOM killer, its node
    lost) is replaced by ``replace()``, and the item is given to the next free actor, from its
    start: the consumer sees its results again from the first (the collector starts its part
    over). After ``tries`` deaths on one item, the stream yields ``gave_up(item, reason, tries)``
    in its place and goes on: one file that kills its worker every time must not end a week-long
    run at the same place on every resume. (Where every item kills its worker, a broken node or
    driver, every item ends that way, each with its reason: the run ends, its failures listed.)
    Deaths with the actor's node (:data:`NODE_LOST`) count apart, up to :data:`NODE_LOSSES`:
    ``gave_up(item, reason, NODE_LOSSES)``.
    ``stall_s``: the workers' stall timeout (:mod:`annotator.watchdog`; 0: none), so that a
    death that long after an item's last result is told as the hang it most likely was; and a
    busy actor that does not answer :class:`LivenessChecks` for that long is killed, which counts
    as its death on the item. The actors then need the :data:`ALIVE_METHOD`, in their
    :data:`HEALTH_GROUP`.

    A worker that dies while starting (its node lost, the OOM killer) is replaced too. So is one
    that died while idle (its node lost, the OOM killer making room for a neighbour), which Ray
    tells only when the next item's call fails: each item's call follows a probe (Ray's
    ``__ray_ready__``) in the actor's queue, so an item whose probe failed too was never begun,
    and it goes to the next free actor without counting as a death on it, up to
    :data:`START_DEATHS` times. One whose constructor raises is
    not replaced: it is left out, with a warning once another worker has started, and the stream
    stops only when no worker is left (as when every worker's constructor raises).

    ``misplaced(item, result)``: the node at fault when ``result`` says its actor could not open
    the item while the driver can (:mod:`annotator.node_access`). The result is not yielded; the
    item goes to another actor, and the actor's node is benched (``bench``, a
    :class:`BenchedNodes` by default): its actors get no items until the bench ends.

    ``wanted(n)``: how many actors the pool should have, now, for ``n`` items left (queued or
    running); asked every :data:`GROW_EVERY_S` seconds, and the pool grows to it with actors from
    ``replace()`` (it never shrinks: an actor is killed only at the end, or when it is dead). So
    nodes that join a running cluster (added by hand, or by Ray's autoscaler) get workers.

    ``retry_elsewhere(item, result)``: why ``result`` (an item's failure that its worker raised
    rather than the video's: a GPU that errs, memory a neighbour took) should not stand yet;
    None where it should. The result is not yielded, and the item goes, once, to another actor
    than the one that raised (to that one only where no other has started, nor will within a
    minute): a node whose engine fails fails each video in a moment and would otherwise take
    most of a corpus.

    Raises:
        ray.exceptions.RayError: an actor's constructor raised and no other actor is left;
            actors died starting :data:`START_DEATHS` times per worker in a row; or one died and
            ``replace`` is None (or on an item's last try, and ``gave_up`` is None). The caller
            turns it into one line for the user.
        NoNodeCanRead: every actor is on a benched node, and none has yielded a result that
            was not misplaced.
    """
    yield from _PoolRun(actors, items, method, replace=replace, gave_up=gave_up, tries=tries, stall_s=stall_s,
                        misplaced=misplaced, bench=bench, wanted=wanted, retry_elsewhere=retry_elsewhere).results()


#: What :meth:`_PoolRun._next_result` returns when an event leaves nothing to yield.
_NOTHING = object()


class _PoolRun:
    """One :func:`stream_from_pool`: its actors, its queue, what each item has met, and what to do
    on each thing Ray reports (a worker started, an item's next table, an item's end, a death).

    Why a class: the loop in :meth:`results` reads as the order of events, and each event's
    handling is a method that says which of the state it changes.
    """

    def __init__(self, actors: list[Any], items: Iterable[Any], method: str, *,
                 replace: Callable[[], Any] | None, gave_up: Callable[[Any, str, int], Any] | None,
                 tries: int, stall_s: float, misplaced: Callable[[Any, Any], Misplaced | None] | None,
                 bench: BenchedNodes | None, wanted: Callable[[int], int] | None,
                 retry_elsewhere: Callable[[Any, Any], str | None] | None = None) -> None:
        self.method, self.replace, self.gave_up, self.tries = method, replace, gave_up, tries
        self.stall_s, self.misplaced, self.wanted, self.retry_elsewhere = stall_s, misplaced, wanted, retry_elsewhere
        self.first_size = len(actors)
        self.queue = deque(items)
        # Items to try again on another actor, by the actor they avoid, with when they began to.
        self.avoiding: dict[Any, deque[tuple[Any, float]]] = {}
        self.retried: set[int] = set()  # id(item) of items sent elsewhere once already
        self.raised_on: set[Any] = set()  # actors that have raised on an item (told once each)
        self.starting = {actor.__ray_ready__.remote(): actor for actor in actors}  # Ray's "constructor done"
        self.pool = list(actors)  # alive, or not yet known dead: killed at the end
        self.idle: list[Any] = []
        # ObjectRefGenerator → (the actor producing it, its item; None once the item went elsewhere)
        self.running: dict[Any, tuple[Any, Any]] = {}
        self.probes: dict[Any, Any] = {}  # ObjectRefGenerator → the probe sent to its actor just before it
        self.heard: dict[Any, float] = {}  # ObjectRefGenerator → when it was started or last gave a result
        self.deaths: dict[tuple[int, bool], int] = {}  # (id(item), with its node) → how often its actor died so
        self.unstarted: dict[int, int] = {}  # id(item) → how often its actor died before beginning it
        self.start_deaths = 0  # workers that died starting (not by their constructor's error) since one started
        self.started_any = False  # a worker has loaded its models
        self.cannot_start = 0  # workers whose constructor raised
        self.untold: list[str] = []  # their lines, held until a worker starts (or none has for a while)
        self.waited = 0.0
        # A frozen actor is killed: only where it can be replaced and its item given up.
        self.checks = (LivenessChecks(stall_s) if stall_s > 0 and replace is not None and gave_up is not None
                       else None)
        self.wait_s = min(_WAIT_S, self.checks.every_s) if self.checks is not None else _WAIT_S
        self.bench = bench if bench is not None else BenchedNodes()  # benches nobody without ``misplaced``
        self.grown_at = time.monotonic()

    def results(self) -> Iterator[Any]:
        """Every item's results, then the actors killed (also when the consumer stops early)."""
        import ray

        try:
            while self._queued() or self.running:
                self._dispatch()
                yield from self._end_frozen()
                if self._queued() and time.monotonic() - self.grown_at >= GROW_EVERY_S:
                    self._grow()
                waiting_on = [*self.running, *(self.starting if self._queued() else ())]
                if not waiting_on:  # every actor idle on a benched node: stop, or wait for a bench to end
                    self.bench.check_all_benched(self.pool)
                    time.sleep(min(self.wait_s, max(self.bench.seconds_to_next(), 0.05)))
                    continue
                # A generator is "ready" when its next table is, or when it has ended.
                ready, _ = ray.wait(waiting_on, num_returns=1, timeout=self.wait_s)
                if not ready:
                    self._waited_in_vain()
                for ref in ready:
                    if ref in self.starting:
                        self._started(ref)
                    elif (result := self._next_result(ref)) is not _NOTHING:
                        yield result
        finally:
            # Only while Ray is up: after its shutdown the actors are gone with it, and a Ray call
            # would start a new local instance (a stream closed by the garbage collector at exit).
            if ray.is_initialized():
                for actor in self.pool:
                    ray.kill(actor)

    def _queued(self) -> int:
        return len(self.queue) + sum(len(items) for items in self.avoiding.values())

    def _dispatch(self) -> None:
        """The queue's next items to the actors that are free, each call after a probe."""
        while (pick := self._next_pair()) is not None:
            actor, item = pick
            call = getattr(actor, self.method).options(num_returns="streaming",
                                                       _generator_backpressure_num_objects=BACKPRESSURE)
            probe = actor.__ray_ready__.remote()  # answered first, on the item's own thread
            generator = call.remote(item)
            self.probes[generator] = probe
            self.running[generator], self.heard[generator] = (actor, item), time.monotonic()
            if self.checks is not None:
                self.checks.start(generator)

    def _next_pair(self) -> tuple[Any, Any] | None:
        """An idle actor that is not on a benched node (the last such to become idle) and the
        item it takes: one that another actor raised on first, else the queue's next; None if
        there is no such pair."""
        for i in range(len(self.idle) - 1, -1, -1):
            actor = self.idle[i]
            if self.bench.benched(actor):
                continue
            item = self._item_for(actor)
            if item is not None:
                del self.idle[i]
                return actor, item
        return None

    def _item_for(self, actor: Any) -> Any | None:
        """The item ``actor`` takes next: one another actor raised on, else the queue's next,
        else one it raised on itself where no other actor can take it (see :meth:`_alone`)."""
        others = [avoided for avoided in self.avoiding if avoided is not actor]
        if not others and not self.queue and actor in self.avoiding and self._alone(actor):
            others = [actor]
        if not others:
            return self.queue.popleft() if self.queue else None
        items = self.avoiding[others[0]]
        item, _ = items.popleft()
        if not items:
            del self.avoiding[others[0]]
        return item

    def _alone(self, actor: Any) -> bool:
        """Whether ``actor`` is the only one that can take the items it raised on: no other has
        started, and none is starting or the first item has waited :data:`_WARN_AFTER_S` for
        one (Ray may never place it). A worker that fails in a moment must not take its item
        back while the others still load their models."""
        if any(other is not actor for other in self.idle) or any(
                other is not actor for other, _ in self.running.values()):
            return False
        waited_s = time.monotonic() - self.avoiding[actor][0][1]
        return waited_s >= _WARN_AFTER_S or not any(other is not actor for other in self.starting.values())

    def _end_frozen(self) -> Iterator[Any]:
        """Kills the actors that have not answered the liveness checks; yields what ``gave_up``
        made of items that were on their last try."""
        import ray

        if self.checks is None:
            return
        for generator in self.checks.frozen({key: actor for key, (actor, _) in self.running.items()}):
            ray.kill(self.running[generator][0])  # SIGKILL ends even a stopped process
            gave, result = self._died(generator, f"it did not answer for {self.stall_s:g} s (--stall-timeout): "
                                                 "its process was frozen (stopped, or stuck in the kernel on a "
                                                 "read) and was killed")
            if gave:
                yield result

    def _grow(self) -> None:
        """New actors where the cluster now holds more than the pool has (see ``wanted``)."""
        self.grown_at = time.monotonic()
        if self.wanted is None or self.replace is None:
            return
        # Workers that could not start keep their places: new ones could land where they failed.
        more = self.wanted(self._queued() + len(self.running)) - len(self.pool) - self.cannot_start
        if more > 0:
            log.info("the cluster has grown: %d more worker%s", more, "s" * (more > 1))
        for _ in range(max(more, 0)):
            self._start_new()

    def _start_new(self) -> None:
        fresh = self.replace()  # type: ignore[misc]  (checked by the callers)
        self.pool.append(fresh)
        self.starting[fresh.__ray_ready__.remote()] = fresh

    def _waited_in_vain(self) -> None:
        """Nothing came in ``wait_s``: after a minute with no worker started, say why, once,
        with the workers that could not start (else a run whose other workers Ray cannot place
        would wait without a word of the error that stopped these)."""
        self.waited += self.wait_s
        if not self.running and self.waited >= _WARN_AFTER_S:
            log.warning("no worker has started after %.0f s: Ray cannot place them yet "
                        "(see its resource messages above); waiting", self.waited)
            self._tell_untold()
            self.waited = float("-inf")  # once

    def _tell_untold(self) -> None:
        for line in self.untold:
            log.warning("%s", line)
        self.untold.clear()

    def _started(self, ready: Any) -> None:
        """A worker's constructor is done: it becomes idle; or it raised, and is left out; or
        its process died starting, and another takes its place."""
        import ray

        actor = self.starting.pop(ready)
        try:
            ray.get(ready)
        except ray.exceptions.RayActorError as exc:
            if getattr(exc, "actor_init_failed", False):
                # Its constructor raised: the driver loaded the same models, so this is its node
                # (a full or read-only cache, no PyPI there). The run goes on without it while
                # another worker lives; where none does, it ends.
                ray.kill(actor)
                self.pool.remove(actor)
                self.cannot_start += 1
                self.untold.append(f"a worker could not start ({creation_error(exc)}); the run goes on "
                                   "without it")
                if not self.pool:
                    raise  # the error says it all: no warnings before it
                if self.started_any:
                    self._tell_untold()
                return
            # It died starting (its node lost, the OOM killer): start another.
            self.start_deaths += 1
            if self.replace is None or self.start_deaths > START_DEATHS * self.first_size:
                raise
            log.warning("a worker died while starting (%s); starting another", death_reason(exc))
            self._replace_dead(actor)
            return
        self.start_deaths = 0
        if not self.started_any:  # the workers that could not start so far: now worth telling
            self.started_any = True
            self._tell_untold()
        self.idle.append(actor)

    def _next_result(self, generator: Any) -> Any:
        """What to yield now that ``generator`` is ready: its item's next table, or what
        ``gave_up`` made of the item; :data:`_NOTHING` where the item ended, starts again, or
        goes to another actor (its actor cannot open it)."""
        import ray

        try:
            result = ray.get(next(generator))
            self.heard[generator] = time.monotonic()
        except StopIteration:
            self.idle.append(self._end(generator)[0])
            return _NOTHING
        except ray.exceptions.RayActorError as exc:
            _, item = self.running[generator]
            silent_s = time.monotonic() - self.heard[generator]
            reason = (f"no progress for {self.stall_s:g} s (--stall-timeout): it hung and was ended"
                      if 0 < self.stall_s <= silent_s else death_reason(exc))
            if self.replace is None or (item is not None and self.gave_up is None and self._last_try(item, reason)
                                        and self._charged(self.probes[generator], item)):
                raise
            gave, result = self._died(generator, reason)
            if not gave:
                return _NOTHING
        actor, item = self.running.get(generator, (None, None))
        if self.misplaced is not None and item is not None and (wrong := self.misplaced(item, result)) is not None:
            self.bench.bench(actor, wrong)
            self.running[generator] = (actor, None)  # its generator ends after this result
            self.queue.appendleft(item)
            return _NOTHING
        if (self.retry_elsewhere is not None and item is not None and id(item) not in self.retried
                and (why := self.retry_elsewhere(item, result)) is not None):
            self.retried.add(id(item))
            # Once per actor as a warning: a node whose engine fails raises on every item.
            log.log(logging.INFO if actor in self.raised_on else logging.WARNING,
                    "%s; it goes to another worker", why)
            self.raised_on.add(actor)
            self.running[generator] = (actor, None)  # its generator ends after this result
            self.avoiding.setdefault(actor, deque()).append((item, time.monotonic()))
            return _NOTHING
        self.bench.note_read()
        return result

    def _end(self, generator: Any) -> tuple[Any, Any, Any]:
        """``generator``'s item is over on its actor: (the actor, the item, the probe sent before it)."""
        actor, item = self.running.pop(generator)
        self.heard.pop(generator, None)
        if self.checks is not None:
            self.checks.stop(generator)
        return actor, item, self.probes.pop(generator)

    def _replace_dead(self, actor: Any) -> None:
        import ray

        ray.kill(actor)  # if it is only unreachable, it must not come back with a second copy
        self.pool.remove(actor)
        self.bench.forget(actor)
        self._start_new()

    def _charged(self, probe: Any, item: Any) -> bool:
        """Whether the death of an actor counts against its item: the actor answered ``probe``,
        queued just before the item, so it died on the item (or it has died before beginning
        this item too often, a sign of more than bad luck)."""
        import ray

        if self.unstarted.get(id(item), 0) >= START_DEATHS:
            return True
        try:
            ray.get(probe, timeout=_PROBE_WAIT_S)
            return True
        except ray.exceptions.RayActorError:
            return False  # dead before it got to the probe: idle
        except ray.exceptions.GetTimeoutError:
            return True

    def _limit(self, reason: str) -> int:
        return NODE_LOSSES if reason == NODE_LOST else self.tries

    def _last_try(self, item: Any, reason: str) -> bool:
        return self.deaths.get((id(item), reason == NODE_LOST), 0) + 1 >= self._limit(reason)

    def _died(self, generator: Any, reason: str) -> tuple[bool, Any]:
        """The item of ``generator``, whose actor is dead (replaced now): tried again, or given
        up: (True, what ``gave_up`` made of it) after its last try."""
        actor, item, probe = self._end(generator)
        self._replace_dead(actor)
        if item is None:  # it had gone elsewhere already
            return False, None
        name = getattr(item, "path", item)
        if not self._charged(probe, item):
            self.unstarted[id(item)] = self.unstarted.get(id(item), 0) + 1
            log.warning("a worker died before it began %s (%s); it goes to another worker", name, reason)
            self.queue.appendleft(item)
            return False, None
        if not self._last_try(item, reason):
            key = (id(item), reason == NODE_LOST)
            self.deaths[key] = self.deaths.get(key, 0) + 1
            log.warning("%s: its worker died (%s); it starts again on a new worker", name, reason)
            self.queue.appendleft(item)
            return False, None
        log.warning("%s: its worker died on it %d times (%s); skipped", name, self._limit(reason), reason)
        return True, self.gave_up(item, reason, self._limit(reason))  # type: ignore[misc]  (checked by the caller)


def creation_error(exc: Exception) -> str:
    """Where and why an actor's constructor raised, from Ray's message (its first line names the
    node's address; its last is the exception): ``on 10.0.0.7: ValueError: ...``."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    where = re.search(r"\bip=([^,)\s]+)", lines[0]) if lines else None
    return f"{'on ' + where.group(1) + ': ' if where else ''}{lines[-1].strip() if lines else type(exc).__name__}"


def death_reason(exc: Exception) -> str:
    """What killed an actor, in a few words, from Ray's long message about it (which lists the
    usual causes whatever the cause was, so only its memory monitor's words, its node's death
    and its preempted flag are told apart)."""
    if "running low on memory" in str(exc):
        return "Ray's memory monitor killed it, the node running low on memory"
    if "because its node has died" in str(exc) or getattr(exc, "preempted", False):
        return NODE_LOST
    return "its process crashed or was killed: a native crash, the kernel's OOM killer, or its node lost"

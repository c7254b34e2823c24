"""The actor pool that spreads work items over Ray actors (annotator/actor_pool.py), on a real
local Ray instance: every item's results arrive once and in order, items interleave across
actors, an actor that dies is replaced and its item tried again, then given up, and no actor
outlives the stream."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray")

from annotator.actor_pool import HEALTH_GROUP, NODE_LOSSES, NODE_LOST, TRIES, stream_from_pool  # noqa: E402
from annotator.cluster import init_ray  # noqa: E402
from annotator.config import RunConfig  # noqa: E402
from annotator.node_access import BenchedNodes, Misplaced, NoNodeCanRead  # noqa: E402


class Yielder:
    """Yields (item, step, pid) ``steps`` times, a little apart (2.5 s for item ``slow``), so
    two actors overlap."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def annotate(self, item: str) -> Iterator[tuple[str, int, int]]:
        once = item.split(":", 1)[1] if item.startswith(("die-once:", "die-once-late:")) else None
        first_time = once is not None and not os.path.exists(once)
        if item == "die" or first_time:
            if first_time:
                open(once, "w").close()
                if item.startswith("die-once-late:"):
                    time.sleep(3)
            yield (item, 0, os.getpid())
            os._exit(1)  # the process goes, as when a node is lost or the OOM killer strikes
        for step in range(self.steps):
            time.sleep(2.5 if item == "slow" else 0.1)
            yield (item, step, os.getpid())
        if item == "then-dies":  # once idle again: as a neighbour's memory or a lost node would
            threading.Thread(target=lambda: (time.sleep(1), os._exit(1)), daemon=True).start()

    def ping(self) -> int:
        return os.getpid()

    def alive(self) -> int:  # the pool's liveness checks, in the health group
        return os.getpid()


class DiesStarting:
    """A worker whose process goes while it loads (its node lost, the OOM killer)."""

    def __init__(self) -> None:
        os._exit(1)


class CannotStart:
    """A worker whose constructor raises (its models do not load): every worker's would."""

    def __init__(self) -> None:
        raise ValueError("no such model")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    init_ray(RunConfig(inputs=(), out=tmp_path_factory.mktemp("out") / "x.parquet", workers=2))
    # Ray's workers cannot import this test module by name: ship Yielder by value instead.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def actors(count: int, steps: int = 5) -> list:
    return [ray.remote(Yielder).options(num_cpus=0.5).remote(steps) for _ in range(count)]


def test_every_item_once_in_order_across_actors(local_ray: None) -> None:
    pool = actors(2)
    items = [f"video{i}" for i in range(6)]
    got = list(stream_from_pool(pool, items))
    assert len(got) == len(set(got)) == 6 * 5
    for item in items:
        assert [step for name, step, _ in got if name == item] == list(range(5))
    assert len({pid for _, _, pid in got}) == 2  # both actors worked
    # Items interleave: some item's results arrive while another's are still coming.
    spans = {item: [i for i, (name, _, _) in enumerate(got) if name == item] for item in items}
    assert any(a != b and spans[a][0] < spans[b][0] < spans[a][-1] for a in items for b in items)


def dies_soon(actor: object, within_s: float = 60.0) -> bool:
    """Whether the actor stops answering within ``within_s`` (``ray.kill`` is asynchronous: a call
    sent just after it may still be served)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.2)
    return False


def test_actors_are_gone_when_the_stream_ends_or_is_closed(local_ray: None) -> None:
    pool = actors(2)
    assert len(list(stream_from_pool(pool, ["a"]))) == 5
    assert all(dies_soon(actor) for actor in pool)
    pool = actors(1, steps=50)
    stream = stream_from_pool(pool, ["a", "b"])
    next(stream)
    stream.close()  # the driver stops early (Ctrl-C, a write error)
    assert dies_soon(pool[0])


def test_an_actor_dying_mid_item_is_a_ray_error_without_replacements(local_ray: None) -> None:
    got = []
    with pytest.raises(ray.exceptions.RayError):
        for result in stream_from_pool(actors(1), ["die", "after"]):
            got.append(result)
    assert all(name == "die" for name, _, _ in got)  # "after" never ran: the pool's only actor is gone


def _replacement():
    return ray.remote(Yielder).options(num_cpus=0.5).remote(3)


def test_an_item_whose_actor_dies_starts_again_on_a_new_actor(local_ray: None, tmp_path) -> None:
    item = f"die-once:{tmp_path / 'died'}"
    got = list(stream_from_pool(actors(1, steps=3), [item, "after"], replace=_replacement,
                                gave_up=lambda item, reason, times: ("gave up", item)))
    assert (tmp_path / "died").exists()  # its first actor died on it
    # (What that actor yielded just before dying may or may not have reached the driver.)
    again = [result for result in got if result[0] == item][-3:]
    assert [step for _, step, _ in again] == [0, 1, 2] and len({pid for *_, pid in again}) == 1  # from its start
    assert [step for name, step, _ in got if name == "after"] == [0, 1, 2]


def test_an_item_that_kills_every_actor_it_meets_is_given_up_and_the_rest_done(local_ray: None) -> None:
    reasons = []

    def gave_up(item, reason, times):
        reasons.append(reason)
        return ("gave up", item)

    got = list(stream_from_pool(actors(1, steps=3), ["die", "after"], replace=_replacement, gave_up=gave_up))
    assert len([r for r in got if r[0] == "die"]) <= 2  # tried twice (a dying actor's last yield may be lost)
    assert ("gave up", "die") in got and len(reasons) == 1 and "crashed or was killed" in reasons[0]
    assert [step for name, step, *_ in got if name == "after"] == [0, 1, 2]


def test_a_lost_node_is_not_counted_as_the_items_fault(local_ray: None, monkeypatch, caplog) -> None:
    """Deaths that Ray says came with the worker's node (a spot instance taken back) count apart
    from the item's own: the item is given up only after NODE_LOSSES of them (here every death is
    told as a node lost), where a crash gives it up after TRIES."""
    assert NODE_LOSSES > TRIES
    made: list[int] = []

    def replacement():
        made.append(1)
        return _replacement()

    for told, times in ((None, TRIES), (NODE_LOST, NODE_LOSSES)):
        if told is not None:
            monkeypatch.setattr("annotator.actor_pool.death_reason", lambda exc: told)
        made.clear()
        caplog.clear()
        gave: list[tuple[str, int]] = []
        got = list(stream_from_pool(actors(1, steps=3), ["die", "after"], replace=replacement,
                                    gave_up=lambda item, reason, n: gave.append((reason, n)) or ("gave up", item)))
        assert ("gave up", "die") in got and [n for _, n in gave] == [times]
        # Deaths counted against it: each but the last sends it to a new worker. (A death whose
        # probe is lost counts as one before the item began, not against it: a worker more.)
        assert caplog.text.count("die: its worker died (") == times - 1 and len(made) >= times
        assert [step for name, step, *_ in got if name == "after"] == [0, 1, 2]
    assert gave == [(NODE_LOST, NODE_LOSSES)]


def test_a_worker_that_died_idle_costs_its_next_item_no_try(local_ray: None, tmp_path, caplog) -> None:
    """A worker that dies between two items (the OOM killer making room for a neighbour, a node
    lost) is found dead only when it is handed the next item: that item goes to a new worker
    without counting the death. Here the item has already killed one worker (its first try), so
    counting the idle death as a second would give it up."""
    item = f"die-once-late:{tmp_path / 'died'}"  # kills its first worker after 3 s, then runs
    got = list(stream_from_pool(actors(2, steps=3), ["then-dies", item], replace=_replacement,
                                gave_up=lambda item, reason, times: ("gave up", item)))
    assert ("gave up", item) not in got
    assert [step for name, step, _ in got if name == "then-dies"] == [0, 1, 2]
    assert [step for name, step, _ in got if name == item][-3:] == [0, 1, 2]
    assert f"a worker died before it began {item}" in caplog.text  # the worker "then-dies" left


def test_an_actor_that_dies_starting_is_replaced(local_ray: None) -> None:
    doomed = ray.remote(DiesStarting).options(num_cpus=0.5).remote()
    got = list(stream_from_pool([doomed], ["a", "b"], replace=_replacement,
                                gave_up=lambda item, reason, times: ("gave up", item)))
    assert sorted((name, step) for name, step, _ in got) == [(n, s) for n in "ab" for s in range(3)]


def test_an_actor_whose_constructor_raises_ends_the_stream(local_ray: None) -> None:
    broken = ray.remote(CannotStart).options(num_cpus=0.5).remote()
    with pytest.raises(ray.exceptions.RayActorError, match="no such model"):
        list(stream_from_pool([broken], ["a"], replace=_replacement))


def test_actors_that_die_starting_again_and_again_end_the_stream(local_ray: None) -> None:
    """Three in a row per worker (one that dies loading its models every time must not loop)."""
    made = []

    def doomed():
        made.append(ray.remote(DiesStarting).options(num_cpus=0.5).remote())
        return made[-1]

    with pytest.raises(ray.exceptions.RayActorError):
        list(stream_from_pool([doomed()], ["a"], replace=doomed))
    assert len(made) == 4  # the first and three replacements


def test_an_actor_ray_cannot_place_holds_nothing_up(local_ray: None) -> None:
    """Two actors asked for, one placeable (the other wants more CPUs than the instance has, as
    ``--workers 2`` on a cluster that lost a node): every item is done by the one that started."""
    placeable = ray.remote(Yielder).options(num_cpus=1).remote(2)
    never = ray.remote(Yielder).options(num_cpus=64).remote(2)
    got = list(stream_from_pool([never, placeable], ["a", "b", "c"]))
    assert sorted((name, step) for name, step, _ in got) == [(n, s) for n in "abc" for s in range(2)]


def _checked(steps: int):
    """An actor that answers liveness checks on a thread of its own, as the run's workers do."""
    return ray.remote(concurrency_groups={HEALTH_GROUP: 1})(Yielder).options(num_cpus=0.5).remote(steps)


def test_a_frozen_actor_is_killed_and_its_item_starts_again(local_ray: None) -> None:
    """A process stopped whole (SIGSTOP: a paused container; a read stuck in the kernel) cannot
    end itself and Ray does not see it: the pool's liveness checks go unanswered, and after
    ``stall_s`` the actor is killed and replaced, its item done again from the start."""
    stream = stream_from_pool([_checked(steps=30)], ["a", "b"], replace=lambda: _checked(steps=3),
                              gave_up=lambda item, reason, times: ("gave up", item, reason), stall_s=2.0)
    name, step, pid = next(stream)
    assert (name, step) == ("a", 0)
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    rest = list(stream)
    assert 2.0 <= time.monotonic() - started < 30
    assert [(n, s) for n, s, _ in rest] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]
    assert pid not in {p for *_, p in rest}
    assert not _exists(pid, within_s=30)  # killed, stopped as it was


def test_a_busy_actor_that_answers_is_not_killed(local_ray: None) -> None:
    """An item that yields nothing for longer than ``stall_s`` on a live actor (a long stretch
    without faces, sparse sampling) is not taken for a frozen one."""
    got = list(stream_from_pool([_checked(steps=3)], ["slow"], replace=lambda: _checked(steps=3),
                                gave_up=lambda item, reason, times: ("gave up", item, reason), stall_s=1.0))
    assert [step for _, step, _ in got] == [0, 1, 2] and len({pid for *_, pid in got}) == 1


def _exists(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` still exists after ``within_s`` (False as soon as it is gone)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True


class Node:
    """An actor on a node that cannot open the videos while ``blind`` exists (a share not mounted
    there); otherwise it yields (item, step, pid) 3 times, 0.2 s apart. Its "node" is its pid."""

    failure = "cannot open"  # what it yields, alone, for an item it fails

    def __init__(self, blind: str | None) -> None:
        self.blind = blind

    def fails(self, item: str) -> bool:
        return self.blind is not None and os.path.exists(self.blind)

    def annotate(self, item: str) -> Iterator[tuple[str, int | str, int]]:
        if self.fails(item):
            yield (self.failure, item, os.getpid())
            return
        for step in range(3):
            time.sleep(0.2)
            yield (item, step, os.getpid())

    def ping(self) -> int:
        return os.getpid()


def _nodes(*blind: str | None) -> list:
    return [ray.remote(Node).options(num_cpus=0.5).remote(b) for b in blind]


def _misplaced(item: str, result: tuple) -> Misplaced | None:
    return Misplaced(str(result[2]), f"10.0.0.{result[2] % 250}", f"/shared/{item}: No such file or directory") \
        if result[0] == "cannot open" else None


def test_an_item_a_node_cannot_open_goes_to_another_and_that_node_is_benched(local_ray: None, tmp_path,
                                                                             caplog) -> None:
    """One node cannot open the videos: without a bench it took nearly every item, each failed in
    a millisecond (7 of 8 on a real 2-node cluster). Now its first item goes to the other node and
    it gets no more while benched: every item is done once, by the node that can read them."""
    (tmp_path / "blind").touch()
    seeing, blind = _nodes(None, str(tmp_path / "blind"))
    items = [f"video{i}" for i in range(6)]
    seeing_pid, _ = ray.get([seeing.ping.remote(), blind.ping.remote()])  # both started: each gets an item
    got = list(stream_from_pool([seeing, blind], items, misplaced=_misplaced))
    assert sorted((name, step) for name, step, _ in got) == [(i, s) for i in items for s in range(3)]
    assert {pid for *_, pid in got} == {seeing_pid}
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "cannot open /shared/video" in warning and "(No such file or directory)" in warning
    assert "it gets none for 1 min" in warning


def test_a_benched_node_gets_items_again_once_its_bench_ends(local_ray: None, tmp_path, caplog) -> None:
    """A share that comes back (a remount): after its bench the node works again; a node that
    still cannot read is benched twice as long."""
    blind = tmp_path / "blind"
    blind.touch()
    seen: list[str] = []

    def misplaced(item: str, result: tuple) -> Misplaced | None:
        wrong = _misplaced(item, result)
        if wrong is not None:
            seen.append(item)
            blind.unlink(missing_ok=True)  # mounted again
        return wrong

    pool = _nodes(str(blind), None)
    once_blind, _ = ray.get([actor.ping.remote() for actor in pool])
    items = [f"video{i}" for i in range(8)]
    got = list(stream_from_pool(pool, items, misplaced=misplaced, bench=BenchedNodes(first_s=1.0)))
    assert sorted((name, step) for name, step, _ in got) == [(i, s) for i in items for s in range(3)]
    assert len(seen) == 1 and "it gets none for 1 s" in caplog.text  # benched once
    assert once_blind in {pid for *_, pid in got}  # then it read again


def test_a_node_benched_again_waits_twice_as_long() -> None:
    bench = BenchedNodes(first_s=0.2, longest_s=0.5)
    wrong = Misplaced("n1", "10.0.0.1", "/shared/a.mp4: Stale file handle")
    bench.bench("actor", wrong)
    assert bench.benched("actor") and not bench.benched("other")
    time.sleep(0.25)
    assert not bench.benched("actor")
    bench.bench("actor", wrong)
    assert bench.benches["n1"].seconds == 0.4
    time.sleep(0.45)
    bench.bench("actor", wrong)
    assert bench.benches["n1"].seconds == 0.5  # at most longest_s
    bench.forget("actor")  # dead, replaced: its successor may be placed anywhere
    assert not bench.benched("actor")


def test_when_no_actor_can_open_anything_the_stream_stops(local_ray: None, tmp_path, caplog) -> None:
    """Every actor on a benched node and none has opened a video: waiting would not help. The
    benches' warnings are held back: the error says it all, in one line."""
    (tmp_path / "blind").touch()
    pool = _nodes(str(tmp_path / "blind"), str(tmp_path / "blind"))
    with pytest.raises(NoNodeCanRead) as stopped:
        list(stream_from_pool(pool, [f"video{i}" for i in range(4)], misplaced=_misplaced))
    message = str(stopped.value)
    assert message.startswith("no Ray worker can open the videos this machine reads: ")
    assert "cannot open /shared/video" in message and "(No such file or directory)" in message
    assert all(dies_soon(actor) for actor in pool)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_the_pool_grows_to_what_the_cluster_holds_now(local_ray: None, monkeypatch, caplog) -> None:
    """``wanted`` says the cluster now holds two workers (a node joined): a second actor starts
    and takes items; asked with fewer items left than actors, the pool does not shrink."""
    monkeypatch.setattr("annotator.actor_pool.GROW_EVERY_S", 0.5)
    asked: list[int] = []

    def wanted(left: int) -> int:
        asked.append(left)
        return min(2, left)

    caplog.set_level("INFO", logger="annotator.actor_pool")
    # 2 s an item on the first actor: a second one that starts within 16 s (a loaded machine) gets some.
    got = list(stream_from_pool(actors(1, steps=20), [f"video{i}" for i in range(8)], replace=_replacement,
                                wanted=wanted))
    assert sorted({name for name, *_ in got}) == [f"video{i}" for i in range(8)]
    assert len({pid for *_, pid in got}) == 2 and "the cluster has grown: 1 more worker" in caplog.text
    assert asked and asked[0] <= 8


class BrokenCache:
    """A worker whose node cannot hold the models: its constructor raises."""

    def __init__(self) -> None:
        raise OSError("/node/cache: cannot write the model cache (No space left on device)")


def test_a_worker_that_cannot_start_on_its_node_is_left_out(local_ray: None, caplog) -> None:
    """The driver loaded the same models, so a constructor that raises is that node's doing (a
    full cache, no PyPI there): the run goes on with the others, with one warning. Before, it
    ended the whole run, whatever the other workers could do."""
    good = actors(1, steps=2)[0]
    broken = ray.remote(BrokenCache).options(num_cpus=0.5).remote()
    got = list(stream_from_pool([broken, good], ["a", "b", "c"], replace=_replacement,
                                gave_up=lambda item, reason, times: ("gave up", item)))
    assert sorted((name, step) for name, step, _ in got) == [(n, s) for n in "abc" for s in range(2)]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("a worker could not start (on ") and warning.endswith(
        ": OSError: /node/cache: cannot write the model cache (No space left on device)); the run goes on without it")


def test_a_worker_that_cannot_start_is_told_while_the_others_wait_for_a_place(
        local_ray: None, caplog, monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker's constructor raises and Ray cannot place the other: the run waits (a node may
    join), and its warning that no worker has started comes with the error that stopped the
    first, not held back until a worker starts (which may be never)."""
    monkeypatch.setattr("annotator.actor_pool._WARN_AFTER_S", 1.0)
    monkeypatch.setattr("annotator.actor_pool._WAIT_S", 0.25)
    broken = ray.remote(BrokenCache).options(num_cpus=0.5).remote()
    never = ray.remote(Yielder).options(num_cpus=64).remote(2)
    ended: list[BaseException] = []

    def consume() -> None:
        try:
            list(stream_from_pool([broken, never], ["a"]))
        except BaseException as exc:  # noqa: BLE001  (what ended the stream, for the assertion)
            ended.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len([r for r in caplog.records if r.levelname == "WARNING"]) < 2:
        time.sleep(0.1)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    ray.kill(never)  # ends the wait: a worker that dies starting, with no replacement, ends the stream
    consumer.join(timeout=60)
    assert not consumer.is_alive() and isinstance(ended[0], ray.exceptions.RayActorError)
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("no worker has started after ")
    assert warnings[1].startswith("a worker could not start (") and "No space left on device" in warnings[1]


def test_when_no_worker_can_start_the_stream_ends_without_warnings(local_ray: None, caplog) -> None:
    broken = [ray.remote(BrokenCache).options(num_cpus=0.5).remote() for _ in range(2)]
    with pytest.raises(ray.exceptions.RayActorError, match="No space left on device"):
        list(stream_from_pool(broken, ["a"], replace=_replacement))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # the error says it all


class Raises(Node):
    """A worker whose engine fails (a GPU that errs) on every item whose name is in ``bad``, or on
    every item when ``bad`` is None, in a moment: it yields its failure, as the run's worker
    yields a failed row. Otherwise as :class:`Node`."""

    failure = "raised"

    def __init__(self, bad: tuple[str, ...] | None = None) -> None:
        self.bad = bad

    def fails(self, item: str) -> bool:
        return self.bad is None or item in self.bad


def _raisers(*bad: tuple[str, ...] | None) -> list:
    return [ray.remote(Raises).options(num_cpus=0.5).remote(b) for b in bad]


def _raised(item: str, result: tuple) -> str | None:
    return f"{item}: RuntimeError: CUDA error (pid {result[2]})" if result[0] == "raised" else None


def test_an_item_a_worker_raised_on_is_done_by_another(local_ray: None, caplog) -> None:
    """One worker's engine fails on everything, at once: every item it takes goes to the other,
    which does them all; the failures are never yielded. Before, that worker took most of the
    items (a failure costs it a moment) and each became a failed row."""
    caplog.set_level(logging.INFO, logger="annotator.actor_pool")
    broken, good = _raisers(None, ())
    pids = ray.get([broken.ping.remote(), good.ping.remote()])
    items = [f"video{i}" for i in range(6)]
    got = list(stream_from_pool([broken, good], items, retry_elsewhere=_raised))
    assert sorted((name, step) for name, step, _ in got) == [(n, s) for n in items for s in range(3)]
    assert {pid for *_, pid in got} == {pids[1]}  # every result from the good actor
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].endswith("; it goes to another worker")  # once per actor
    told = [r.getMessage() for r in caplog.records if "it goes to another worker" in r.getMessage()]
    assert len(told) >= 2  # it took more than one item: each went elsewhere


def test_an_item_that_raises_everywhere_stands_after_a_second_actor(local_ray: None) -> None:
    """A failure on two actors is the item's (or a bug's): its result is yielded, from the second
    actor, and the other items are done."""
    first, second = _raisers(("bad",), ("bad",))
    got = list(stream_from_pool([first, second], ["bad", "ok"], retry_elsewhere=_raised))
    failures = [result for result in got if result[0] == "raised"]
    assert len(failures) == 1 and sorted((n, s) for n, s, _ in got if n == "ok") == [("ok", s) for s in range(3)]


def test_a_single_worker_tries_the_item_again_itself(local_ray: None) -> None:
    """With no other actor, the item goes back to the one that raised (rather than waiting for
    ever), and its second failure stands."""
    got = list(stream_from_pool(_raisers(("bad",)), ["bad", "ok"], retry_elsewhere=_raised))
    assert [r[0] for r in got].count("raised") == 1 and [n for n, *_ in got].count("ok") == 3

"""The Ray cluster's head, watched from the driver: when it is gone, one line and exit 1.

When the head's GCS goes away (the head node rebooted or reclaimed, ``ray stop`` on it, the OOM
killer), Ray's core in the driver retries for ``gcs_rpc_server_reconnect_timeout_s`` (60 s) and
then ends the process itself, with a C++ log line ("Failed to connect to GCS within 60 seconds
... The program will terminate."), after a warning per video in flight that its worker died and
"starts again on a new worker", which it never will. Nothing of the output is lost (finished
videos are committed parts), but the run does not say so, nor that a re-run resumes.

So a thread asks the GCS for its cluster id every few seconds (the RPC ``annotator.cluster``
asks before joining; any answer, even a refusal, means it is there). Once it has not answered for
:func:`give_up_after_s` (10 s before Ray would give up, so a GCS that restarts in time keeps the
run), the driver prints one line and exits 1, as for any failed cluster. The exit is
``os._exit``: the main thread is inside Ray's C++ wait and cannot be interrupted; the output's
lock is an ``flock`` that dies with the process, and parts are only ever renamed into place whole.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

#: Seconds between two questions to the GCS (each a tiny RPC).
ASK_EVERY_S = 2.0
#: Ray's default for ``RAY_gcs_rpc_server_reconnect_timeout_s`` (Ray 2.60).
RAY_RECONNECT_TIMEOUT_S = 60.0
#: How much sooner than Ray the watch gives up, so that its line, not Ray's, ends the run.
MARGIN_S = 10.0


def give_up_after_s() -> float:
    """Seconds without an answer after which the head counts as lost: Ray's own reconnect timeout
    (``RAY_gcs_rpc_server_reconnect_timeout_s``, read as Ray reads it) less :data:`MARGIN_S`,
    and at least a few seconds."""
    try:
        ray_s = float(os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", RAY_RECONNECT_TIMEOUT_S))
    except ValueError:
        ray_s = RAY_RECONNECT_TIMEOUT_S
    return max(ray_s - MARGIN_S, ray_s / 2, 3.0)


class GcsQuestion:
    """A question for the GCS at ``host:port``: does it answer at all (within 5 s)? Its channel
    stays open between questions (gRPC reconnects by itself) until :meth:`close`, which must come
    before the GCS stops on purpose: a channel open then logs gRPC's "Got goaway" on stderr."""

    def __init__(self, gcs: str, token: str | None) -> None:
        import grpc

        self._grpc = grpc
        self._channel = grpc.insecure_channel(gcs)
        self._get_cluster_id = self._channel.unary_unary(
            "/ray.rpc.NodeInfoGcsService/GetClusterId",
            request_serializer=lambda request: request, response_deserializer=lambda reply: reply)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def __call__(self) -> bool:
        grpc = self._grpc
        try:
            self._get_cluster_id(b"", timeout=5, metadata=self._metadata)
        except grpc.RpcError as exc:
            return exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        except ValueError:  # the channel was closed meanwhile (a watch being stopped)
            return True
        return True

    def close(self) -> None:
        self._channel.close()


class HeadWatch(threading.Thread):
    """Calls ``on_lost(seconds)`` once ``ask`` has said no for ``give_up_s`` seconds in a row,
    unless ``watching()`` has turned false (this process left that cluster: Ray shut down, or
    started again elsewhere), which ends the watch quietly. ``close`` is called when the watch is
    stopped (a :class:`GcsQuestion`'s, whose channel must be closed before the GCS stops)."""

    def __init__(self, ask: Callable[[], bool], on_lost: Callable[[float], None], give_up_s: float,
                 watching: Callable[[], bool] = lambda: True, close: Callable[[], None] = lambda: None,
                 every_s: float = ASK_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name="annotate-head-watch", daemon=True)
        self.ask, self.on_lost, self.give_up_s, self.watching = ask, on_lost, give_up_s, watching
        self.close, self.every_s, self.clock = close, every_s, clock
        self.stopped = threading.Event()

    def run(self) -> None:
        answered = self.clock()
        while not self.stopped.wait(self.every_s) and self.watching():
            if self.ask():
                answered = self.clock()
            elif (silent := self.clock() - answered) >= self.give_up_s and not self.stopped.is_set() \
                    and self.watching():
                self.on_lost(silent)
                return

    def stop(self) -> None:
        """End the watch, and close what it asks through, before Ray stops."""
        self.stopped.set()
        self.close()


def exit_lost(gcs: str, out: Path) -> Callable[[float], None]:
    """What the driver does when the head is lost: one line on stderr, exit 1."""

    def lost(silent_s: float) -> None:
        print(f"annotate: error: lost the Ray cluster's head: its GCS at {gcs} has not answered for "
              f"{silent_s:.0f} s (the head node stopped or cannot be reached); what is finished is kept in "
              f"{out}, re-run the same command to resume once the cluster is back", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)  # EXIT_FAILED (annotator.run)

    return lost

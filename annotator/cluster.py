"""Ray itself: start a local instance or join a cluster, with its token authentication settled.

Kept free of the annotator's heavy imports (torch, the models): the driver never loads them, so
it starts in a third of a second, and Ray must be started from the main thread anyway (started
from another, its later calls hang).
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path

from annotator.config import RunConfig
from annotator.stopping import stop_on_sigterm

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """Ray could not be started or joined; the message is one line."""


def _ray_token() -> str | None:
    """The Ray auth token at hand, found where Ray's loader looks, in its order.

    ``RAY_AUTH_TOKEN`` (the token itself), ``RAY_AUTH_TOKEN_PATH`` (a file holding it; Ray
    aborts when that file cannot be read, so this says so in one line instead),
    ``~/.ray/auth_token`` (what ``ray get-auth-token --generate`` writes).
    """
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    if named := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            if token := Path(named).expanduser().read_text().strip():
                return token
        except OSError:
            pass
        raise ClusterError(f"RAY_AUTH_TOKEN_PATH={named} names no readable, non-empty token file")
    try:
        return (Path.home() / ".ray" / "auth_token").read_text().strip() or None
    except OSError:
        return None


def _has_ray_token() -> bool:
    return _ray_token() is not None


def init_ray(config: RunConfig) -> None:
    """Start a local Ray instance or join ``config.address``; a failure is one ClusterError line.

    Token authentication (Ray 2.60) is settled first, before Ray is imported: Ray reads
    ``RAY_AUTH_MODE`` from the environment once, at import.

    - A local instance listens on every interface (its GCS and raylet bind 0.0.0.0), so anyone
      who can reach this machine could run code in it: it keeps token authentication on, as
      Ray's default for ``ray.init()`` would. Saying so explicitly also spares the user Ray's
      warning about that default. Where no token is at hand Ray would write a new
      ``~/.ray/auth_token`` (world-readable) into the user's home; this run instead gets a
      one-off token in its environment, which Ray's processes inherit and which dies with them.
    - Joining a cluster: the driver's mode must match the cluster's (a token-mode driver's
      actors die at once on a cluster without auth, as a token-less driver is refused by one
      with it), and Ray never turns token mode on for an explicit address. So
      :func:`_settle_cluster_auth` asks the cluster first.
    """
    import sys

    imported_before = "ray" in sys.modules
    if config.address is None:
        import secrets

        os.environ.setdefault("RAY_AUTH_MODE", "token")
        if os.environ["RAY_AUTH_MODE"].lower() == "token" and not _has_ray_token():
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # kept for this process's later runs
    else:
        _settle_cluster_auth(config.address)
    import ray

    if ray.is_initialized():
        return
    if imported_before:  # Ray read the mode at its import, before it was settled: read it again
        try:
            ray._raylet.Config.initialize("")
            ray._raylet.AuthenticationTokenLoader.instance().reset_cache()
        except AttributeError:  # a Ray without token authentication (< 2.52)
            pass
    if config.address is not None:
        # The student's weights (10 MiB, package data of `engines`) travel with our modules on
        # purpose; Ray warns about any file over 10 MiB. Its errors (too large to ship) still show.
        logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.ERROR)
    try:
        ray.init(
            # "local" always starts a fresh instance: a bare init() would attach to whatever
            # `ray start` left in /tmp/ray/ray_current_cluster, and hang if that one is dead.
            address=config.address or "local",
            include_dashboard=False,
            log_to_driver=True,
            logging_level=logging.WARNING,
            # Our modules travel to workers on a cluster; a local instance shares the filesystem.
            runtime_env={"py_modules": modules} if config.address and (modules := _project_modules()) else None,
            ignore_reinit_error=True,
            # A local instance gets the CPUs this process may use (taskset, a scheduler's cpuset):
            # Ray counts the machine's, and its workers would then crowd the allowed cores.
            num_cpus=None if config.address else local_cpus(),
        )
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        # RayError: AuthenticationError (token mode without a token) is not a RuntimeError.
        where = f"join the Ray cluster at {config.address}" if config.address else "start a local Ray instance"
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ClusterError(f"cannot {where}: {reason}") from None
    stop_on_sigterm()  # Ray's handler replaced ours: a SIGTERM now ends the run cleanly again
    _watch_head(ray, config)


#: The running watch on the cluster's head (:mod:`annotator.head_watch`), while Ray is in use.
_head_watch = None


def _watch_head(ray, config: RunConfig) -> None:  # noqa: ANN001 - the ray module
    """Watch the GCS the driver depends on (a local instance's too: the OOM killer may take it)."""
    global _head_watch
    from annotator.head_watch import GcsQuestion, HeadWatch, exit_lost, give_up_after_s

    try:
        gcs = ray.get_runtime_context().gcs_address
    except (AttributeError, RuntimeError) as exc:  # a Ray that no longer says: Ray's own exit stays
        log.debug("the head is not watched: %s", exc)
        return
    token = _ray_token() if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else None

    def still_on_it() -> bool:  # Ray shut down or started again elsewhere (tests do): not ours to watch
        try:
            return ray.is_initialized() and ray.get_runtime_context().gcs_address == gcs
        except Exception:  # noqa: BLE001 - Ray's "not connected" errors vary between versions
            return False

    _stop_head_watch()
    question = GcsQuestion(gcs, token)
    _head_watch = HeadWatch(question, exit_lost(gcs, config.out), give_up_after_s(), still_on_it, question.close)
    _head_watch.start()
    # Before Ray's own exit hook stops a local instance (hooks run last registered first): an
    # interrupted run, or a test's process, ends without release_ray.
    atexit.unregister(_stop_head_watch)  # one hook, the latest (a process may start Ray more than once)
    atexit.register(_stop_head_watch)


def _stop_head_watch() -> None:
    global _head_watch
    if _head_watch is not None:
        _head_watch.stop()
        _head_watch = None


def release_ray() -> None:
    """Stop the local Ray instance (or leave the cluster) once its work is done: ``annotate run``
    as soon as every row is written and the summary shown (Ray's own exit hook would first sleep
    half a second for late worker logs), ``annotate distil`` before it trains, so its GCS,
    raylet and idle workers hold no memory and take no CPU through training."""
    import sys

    _stop_head_watch()  # first: the GCS is about to stop on purpose
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        _stop_autoscaler_monitor(ray)
        ray.shutdown()


def _stop_autoscaler_monitor(ray) -> None:  # noqa: ANN001 - the ray module
    """Kill a local instance's autoscaler monitor before ``ray.shutdown()`` stops the rest.

    Shutdown stops the GCS before the monitor, whose SIGTERM handler then tries to report its
    own death to that GCS and hangs until Ray kills it a second later: a second of every run
    (shutdown 1.38 s, 0.38 s with the monitor gone first; Ray 2.60). The monitor only
    autoscales, which a local instance never does. It is reached through Ray's private node
    handle, so on a Ray where that has moved this does nothing and shutdown takes its second.
    """
    try:
        from ray._private import ray_constants

        node = ray._private.worker._global_node
        if node is not None and ray_constants.PROCESS_TYPE_MONITOR in node.all_processes:
            node._kill_process_type(ray_constants.PROCESS_TYPE_MONITOR, check_alive=False, allow_graceful=False,
                                    wait=True)
    except (AttributeError, ImportError, KeyError, OSError) as exc:
        log.debug("autoscaler monitor left to ray.shutdown(): %s", exc)


def local_cpus() -> int | None:
    """CPUs for a local Ray instance: this process's affinity when it is narrower than the
    machine, else None (Ray's own count, which also reads a container's CPU quota)."""
    from annotator.config import usable_cores

    usable = usable_cores()
    return usable if usable < (os.cpu_count() or usable) else None


def _gcs_address(address: str) -> str | None:
    """``host:port`` of the GCS that ``ray.init(address)`` would join, where that is cheap to know
    without importing Ray: an explicit address, or for ``auto`` ``RAY_ADDRESS`` (set inside a
    Ray job) or the file the last ``ray start`` on this machine wrote. Else None."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if address in ("", "auto", "local"):
            tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
            try:
                address = (Path(tmp) / "ray" / "ray_current_cluster").read_text().strip()
            except OSError:
                return None
    if "://" in address or ":" not in address:  # ray:// (Ray Client) and the like
        return None
    return address


def _settle_cluster_auth(address: str) -> None:
    """Ask the cluster's GCS once (no Ray import, so the mode can still be set) whether it wants a
    token and takes ours; set ``RAY_AUTH_MODE`` to match unless the user set it.

    Also turns the failures Ray reports slowly into one line within seconds: left to
    ``ray.init``, a dead address or a missing or wrong token retries for about 15 s, printing a
    C++ warning every second, and ends in "Failed to connect to Ray cluster", which does not
    name the token. Where it cannot ask (TLS, Ray Client, ``auto`` without a known address) it
    keeps Ray's own rule: token mode when a token is at hand.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    token = _ray_token()
    gcs = _gcs_address(address)
    if gcs is None or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        if not mode and token:
            os.environ["RAY_AUTH_MODE"] = "token"
        return
    import grpc

    where = f"cannot join the Ray cluster at {address}"
    fix = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token must hold the head's token; see README"

    def ask(metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
        with grpc.insecure_channel(gcs) as channel:
            get_cluster_id = channel.unary_unary(
                "/ray.rpc.NodeInfoGcsService/GetClusterId",  # an empty request; the reply is not read
                request_serializer=lambda request: request, response_deserializer=lambda reply: reply)
            try:
                get_cluster_id(b"", timeout=10, metadata=metadata)
            except grpc.RpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    answer = ask(())
    if answer in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        raise ClusterError(f"{where}: no Ray cluster answers at {gcs} ({answer.name.lower()})")
    if answer == grpc.StatusCode.OK:  # no authentication there: a token-mode driver would break
        if mode == "token":
            raise ClusterError(f"{where}: it runs without token authentication and RAY_AUTH_MODE=token is set "
                               "here (its workers could not reach this driver); unset it, or turn tokens on there")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        return
    if answer != grpc.StatusCode.UNAUTHENTICATED:  # another Ray; let ray.init have its say
        if not mode and token:
            os.environ["RAY_AUTH_MODE"] = "token"
        return
    if token is None:
        raise ClusterError(f"{where}: it requires token authentication and no Ray auth token was found here ({fix})")
    if mode not in ("", "token"):
        raise ClusterError(f"{where}: it requires token authentication and RAY_AUTH_MODE={mode} holds the token back")
    if ask((("authorization", f"Bearer {token}"),)) == grpc.StatusCode.UNAUTHENTICATED:
        raise ClusterError(f"{where}: it rejected this machine's Ray auth token ({fix})")
    os.environ["RAY_AUTH_MODE"] = "token"


def _project_modules() -> list[str]:
    """Our code's directories, shipped as ``py_modules`` when joining a cluster: workers import
    them from there, so the code that runs is the driver's whatever a node has installed.

    Empty inside a Ray job whose uploaded working directory holds them already (the README's
    ``ray job submit --working-dir .``): shipping them again would upload another ~11 MB (the
    student's weights) and clash with a job that sets ``py_modules`` itself.
    """
    import json

    import annotator
    import engines

    dirs = [Path(annotator.__file__).resolve().parent, Path(engines.__file__).resolve().parent]
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        job = {}
    working_dir = (job.get("runtime_env") or {}).get("working_dir") if isinstance(job, dict) else None
    if working_dir and all(d.is_relative_to(Path.cwd().resolve()) for d in dirs):
        return []
    return [str(d) for d in dirs]


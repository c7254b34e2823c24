"""Where videos are processed: Ray Data over a pool of model-holding actors, or this process.

Every Ray knob lives in :func:`stream_with_ray`, because Ray's API for actor pools has moved
between releases. The chain is: videos → ``map_batches(RayVideoWorker, batch_size=1,
ActorPoolStrategy)`` → tagged Arrow tables streamed back to the driver, which writes them.
Ray's backpressure keeps the driver's memory flat whatever the size of the corpus.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from annotator.config import RunConfig
from annotator.pipeline import VideoPipeline
from annotator.worker import RayVideoWorker, WorkItem, annotate_tagged

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


def stream_in_process(config: RunConfig, items: list[WorkItem]) -> Iterator[pa.Table]:
    """The single-process path (``--workers 0``): same stages, a plain loop, no Ray."""
    pipeline = VideoPipeline(config)
    for item in items:
        yield from annotate_tagged(pipeline, item)


def _init_ray(config: RunConfig) -> None:
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
        )
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        # RayError: AuthenticationError (token mode without a token) is not a RuntimeError.
        where = f"join the Ray cluster at {config.address}" if config.address else "start a local Ray instance"
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ClusterError(f"cannot {where}: {reason}") from None


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


# One CPU worker's memory, measured on this project's 2-core VM (ONNX Runtime, 2026-11-25): a
# worker with its models loaded peaks at 0.64 GB on a 176x144 clip; the detector's activations
# take ~420 B per input pixel per frame (720p at batch 8 peaks at 1.49 GB, batch 4 at 1.07 GB,
# both at --det-size 640); decoded frames never exceed the decoder's pixel budget per batch; and
# FFmpeg's own reference frames grow with the source (~0.6 GB for 8000x8000 H.264).
_WORKER_BASE_BYTES = 0.65 * 2**30
_DETECTOR_BYTES_PER_PIXEL = 420
_DECODER_BYTES = 0.6 * 2**30


def worker_memory_bytes(config: RunConfig) -> int:
    """What one CPU worker may use at most, from the run's batch size and detector size.

    Frames are bounded by pixels, not by count (``engines.decoders.CPU_BATCH_PIXELS``), so the
    estimate holds for a 4K or 8K corpus as for 720p; the pool is sized by it and Ray reserves
    it per actor, so a machine is never given more workers than its memory holds.
    """
    from engines.decoders import CPU_BATCH_PIXELS

    side = config.det_size
    detector_pixels = side * math.ceil(side * 9 / 16 / 32) * 32  # a 16:9 frame, padded as RetinaFace pads it
    frames = 2 * 3 * CPU_BATCH_PIXELS  # one batch, plus the frame being converted
    detector = _DETECTOR_BYTES_PER_PIXEL * detector_pixels * config.resolved_batch_size()
    return int(_WORKER_BASE_BYTES + detector + frames + _DECODER_BYTES)


def pool_size(config: RunConfig, videos: int) -> int:
    """Actors in the pool: ``--workers``, else sized to the cluster Ray reports.

    One per GPU on GPUs. On CPUs one single-threaded worker per core, within memory
    (:func:`worker_memory_bytes` each): measured
    on 2 cores at 720p, 2 workers x 1 thread gave 18.9 frames/s end to end and 1 worker x 2
    threads 13.1, because decoding and inference then overlap across processes. Never more
    actors than videos.
    """
    import ray

    if config.workers:
        wanted = config.workers
    else:
        resources = ray.cluster_resources()
        if config.resolved_device() == "cuda":
            wanted = int(resources.get("GPU", 1))
        else:
            per_worker = worker_memory_bytes(config)
            by_memory = int(resources.get("memory", per_worker) // per_worker)
            wanted = min(int(resources.get("CPU", 1)), by_memory)
    return max(1, min(wanted, videos))


def _worker_resources(config: RunConfig, workers: int) -> tuple[float, float, int]:
    """(num_cpus, num_gpus, intra-op threads) per actor."""
    import ray

    if config.resolved_device() == "cuda":
        # One actor per GPU: a single process feeds NVDEC and the engines best (DESIGN.md).
        return 1.0, 1.0, 0
    cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    per_worker = max(1.0, cpus // workers) if workers <= cpus else cpus / workers
    return per_worker, 0.0, max(1, int(per_worker))


def cluster_workers(config: RunConfig) -> int:
    """The pool a run would get with work for all (starts or joins Ray): how finely to split."""
    _init_ray(config)
    return pool_size(config, videos=1 << 30)


def stream_with_ray(config: RunConfig, items: list[WorkItem]) -> Iterator[pa.Table]:
    """Tagged tables from a Ray actor pool (see :func:`pool_size`), as they are produced."""
    _init_ray(config)  # first: it sets Ray's auth mode before Ray is imported
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows one bar of its own
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    # Ray Data's per-dataset INFO lines and its "progress bars disabled" warning are noise next
    # to our own bar; its errors still show.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    # Ray's C++ ERROR line for every pool actor, "has constructor arguments in the object store"
    # (Ray Data's own refs, not our RunConfig; see annotator/stderr_filter.py): dropped from
    # stderr, nothing else is.
    from annotator.stderr_filter import drop_ray_false_alarms

    drop_ray_false_alarms()
    workers = pool_size(config, len(items))
    num_cpus, num_gpus, threads = _worker_resources(config, workers)
    videos = ray.data.from_items(
        [item.to_row() for item in items],
        override_num_blocks=len(items),  # one block per item, so every actor gets work
    )
    annotated = videos.map_batches(
        RayVideoWorker,
        fn_constructor_kwargs={"config": config, "threads": threads},
        batch_size=1,  # the unit of work is one video, or one segment of a long one
        batch_format="pyarrow",
        # One item in flight per actor: a long video never queues others behind it.
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        # Ray reserves each CPU actor's memory, so no node gets more workers than it can hold.
        memory=None if num_gpus else worker_memory_bytes(config),
    )
    try:
        yield from annotated.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
    except ray.exceptions.RayError as exc:
        # Bad videos never get here (workers report them as rows); this is the cluster failing.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClusterError(f"the Ray run failed ({reason}); finished videos are kept, re-run to resume") from exc

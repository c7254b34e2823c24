"""Where videos are processed: Ray Data over a pool of model-holding actors, or this process.

Every Ray knob lives in :func:`stream_with_ray`, because Ray's API for actor pools has moved
between releases. The chain is: videos → ``map_batches(RayVideoWorker, batch_size=1,
ActorPoolStrategy)`` → tagged Arrow tables streamed back to the driver, which writes them.
Ray's backpressure keeps the driver's memory flat whatever the size of the corpus.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from annotator.config import RunConfig
from annotator.pipeline import VideoPipeline
from annotator.worker import RayVideoWorker, annotate_tagged

log = logging.getLogger(__name__)

WorkItem = tuple[Path, str]  # (video path, part key)


class ClusterError(RuntimeError):
    """Ray could not be started or joined; the message is one line."""


def _has_ray_token() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


def stream_in_process(config: RunConfig, items: list[WorkItem]) -> Iterator[pa.Table]:
    """The single-process path (``--workers 0``): same stages, a plain loop, no Ray."""
    pipeline = VideoPipeline(config)
    for path, part in items:
        yield from annotate_tagged(pipeline, path, part)


def _init_ray(config: RunConfig) -> None:
    # Token authentication: Ray >= 2.5x turns it on for every new local cluster (generating
    # ~/.ray/auth_token) unless RAY_AUTH_MODE=disabled. A driver joining a cluster only sends
    # the token in token mode, so when one is at hand we say so (ray 2.60 leaves it off). Ray
    # reads the mode when it is first imported, hence before the import.
    if config.address is not None and "RAY_AUTH_MODE" not in os.environ and _has_ray_token():
        os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(
            # "local" always starts a fresh instance: a bare init() would attach to whatever
            # `ray start` left in /tmp/ray/ray_current_cluster, and hang if that one is dead.
            address=config.address or "local",
            include_dashboard=False,
            log_to_driver=True,
            logging_level=logging.WARNING,
            # Our modules travel to workers on a cluster; a local instance shares the filesystem.
            runtime_env=None if config.address is None else {"py_modules": _project_modules()},
            ignore_reinit_error=True,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"join the Ray cluster at {config.address}" if config.address else "start a local Ray instance"
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ClusterError(f"cannot {where}: {reason}") from None


def _project_modules() -> list[str]:
    import annotator
    import engines

    return [str(Path(annotator.__file__).parent), str(Path(engines.__file__).parent)]


#: Peak RSS of one CPU worker (~1.4 GB at 720p, batch 8) plus headroom.
_WORKER_MEMORY_BYTES = 2 * 2**30


def pool_size(config: RunConfig, videos: int) -> int:
    """Actors in the pool: ``--workers``, else sized to the cluster Ray reports.

    One per GPU on GPUs. On CPUs one single-threaded worker per core, within memory: measured
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
            by_memory = int(resources.get("memory", _WORKER_MEMORY_BYTES) // _WORKER_MEMORY_BYTES)
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
    workers = pool_size(config, len(items))
    num_cpus, num_gpus, threads = _worker_resources(config, workers)
    videos = ray.data.from_items(
        [{"path": str(path), "part": part} for path, part in items],
        override_num_blocks=len(items),  # one block per video, so every actor gets work
    )
    annotated = videos.map_batches(
        RayVideoWorker,
        fn_constructor_kwargs={"config": config, "threads": threads},
        batch_size=1,  # the unit of work is one video
        batch_format="pyarrow",
        # One video in flight per actor: a long video never queues others behind it.
        compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    try:
        yield from annotated.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
    except ray.exceptions.RayError as exc:
        # Bad videos never get here (workers report them as rows); this is the cluster failing.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClusterError(f"the Ray run failed ({reason}); finished videos are kept, re-run to resume") from exc

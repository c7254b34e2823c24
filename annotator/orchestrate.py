"""Where videos are processed: a pool of model-holding Ray actors, or this process.

The pool is sized and its actors given their CPUs, GPU share and memory here; the chain is:
work items (videos, or segments of long ones) → :func:`annotator.actor_pool.stream_from_pool`
over ``RayVideoWorker`` actors → tagged Arrow tables streamed back to the driver, which writes
them. Ray's generator backpressure keeps the driver's memory flat whatever the corpus's size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator

import pyarrow as pa

from annotator.cluster import ClusterError, init_ray
from annotator.config import ConfigError, RunConfig
from annotator.actor_pool import TRIES
from annotator.node_access import Misplaced, NoNodeCanRead, misplaced
from annotator.schema import error_row
from annotator.watchdog import StallWatchdog
from annotator.worker import (RAISED_FACT, STATUS_COLUMN, VIDEO_COLUMN, RayVideoWorker, WorkItem, annotate_watched,
                              return_freed_memory, tag_table)

log = logging.getLogger(__name__)



def stream_in_process(config: RunConfig, items: list[WorkItem], pipeline_class: type | None = None) -> Iterator[pa.Table]:
    """The single-process path (``--workers 0``): same stages, a plain loop, no Ray.

    ``pipeline_class``: a :class:`VideoPipeline` subclass (``annotate distil``'s harvest), else the run's.
    """
    from annotator.pipeline import VideoPipeline

    pipeline = (pipeline_class or VideoPipeline)(config)
    # No worker to replace here: a video that hangs (a read that never returns) stops the run,
    # in one line naming it, instead of holding it for ever; the videos finished are kept.
    watchdog = StallWatchdog(config.stall_timeout)
    for item in items:
        stalled = (f"{item.path}: no progress for {config.stall_timeout:g} s (--stall-timeout); the run stops here "
                   "(finished videos are kept; without --workers 0, Ray workers record such a video as failed "
                   "and go on)")
        yield from annotate_watched(pipeline, item, watchdog, stalled)
        return_freed_memory()


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

    def padded_pixels(side: int) -> int:  # a 16:9 frame, padded as RetinaFace pads it
        return side * math.ceil(side * 9 / 16 / 32) * 32

    frames = 2 * 3 * CPU_BATCH_PIXELS  # one batch, plus the frame being converted
    # A keyframe batch at --det-size, or one frame scanned at up to twice that (annotator.tracking).
    detector = _DETECTOR_BYTES_PER_PIXEL * max(padded_pixels(config.det_size) * config.resolved_batch_size(),
                                               padded_pixels(config.scan_size))
    return int(_WORKER_BASE_BYTES + detector + frames + _DECODER_BYTES)


def pool_size(config: RunConfig, videos: int) -> int:
    """Actors in the pool: ``--workers``, else sized to the cluster Ray reports.

    On GPUs ``--pipelines-per-gpu`` per GPU (see :func:`gpu_pipelines`). On CPUs one single-threaded worker per core, within memory
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
            wanted = gpu_pool_size(resources.get("GPU", 1), gpu_pipelines(config, resources))
        else:
            per_worker = worker_memory_bytes(config)
            by_memory = int(resources.get("memory", per_worker) // per_worker)
            wanted = min(int(resources.get("CPU", 1)), by_memory)
    return max(1, min(wanted, videos))


def _worker_resources(config: RunConfig, workers: int) -> tuple[float, float, int]:
    """(num_cpus, num_gpus, intra-op threads) per actor."""
    import ray

    if config.resolved_device() == "cuda":
        # Several decode pipelines (actors) share a GPU, one per NVDEC engine: a fractional GPU each.
        return 1.0, 1.0 / gpu_pipelines(config, ray.cluster_resources()), 0
    cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    per_worker = max(1.0, cpus // workers) if workers <= cpus else cpus / workers
    # Never more than one node has: two 1-CPU nodes and --workers 1 must not ask for 2 CPUs (no
    # node could ever place it; the run would wait forever).
    per_worker = min(per_worker, largest_node_cpus(ray.nodes()) or per_worker)
    return per_worker, 0.0, max(1, int(per_worker))


def largest_node_cpus(nodes: list[dict]) -> float:
    """The most CPUs one live node of the cluster offers (``ray.nodes()``); 0 when none says."""
    return max((float(node.get("Resources", {}).get("CPU", 0)) for node in nodes if node.get("Alive")), default=0.0)


def on_cluster(config: RunConfig) -> RunConfig:
    """Start or join Ray; ``--device auto`` becomes what the cluster offers.

    Resolved from the cluster's resources, not from the driver's machine: a CPU-only head node
    (or laptop) driving a GPU cluster still asks for GPUs, and the driver never loads torch to
    find out.
    """
    init_ray(config)
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    check_gpus(config, gpus)
    if config.device != "auto":
        return config
    return dataclasses.replace(config, device="cuda" if gpus > 0 else "cpu")


def check_gpus(config: RunConfig, gpus: float) -> None:
    """``--device cuda`` where Ray offers no GPU fails now, in one line: otherwise Ray waits
    forever for a GPU that will never come.

    Raises:
        ConfigError: no GPU in the local instance or the cluster.
    """
    if config.device == "cuda" and gpus <= 0:
        where = f"the Ray cluster at {config.address} has" if config.address else "this machine has"
        raise ConfigError(f"--device cuda: {where} no GPU (Ray reports none); use --device cpu or auto")


def require_device(config: RunConfig) -> None:
    """Check an explicit ``--device cuda`` before any work (models are pulled, outputs claimed).

    In this process (``--workers 0``) torch must see a GPU; otherwise the local Ray instance or
    the cluster at ``--address`` must offer one (Ray is started or joined here, as the run would).
    """
    if config.device != "cuda":
        return
    if config.workers == 0:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: this machine has no CUDA GPU that torch can use; use --device cpu or auto")
        return
    on_cluster(config)


def accelerator_type(resources: dict[str, float]) -> str | None:
    """The GPU model Ray detected (its ``accelerator_type:<name>`` resource), if one."""
    names = [key.split(":", 1)[1] for key in resources if key.startswith("accelerator_type:")]
    return names[0] if len(names) == 1 else None


def gpu_pipelines(config: RunConfig, resources: dict[str, float]) -> int:
    """Decode pipelines per GPU: ``--pipelines-per-gpu``, else one per NVDEC engine of the GPU
    model Ray reports (memory permitting; 1 for a model not in the table or a mixed cluster)."""
    from engines.decoders.choice import pipelines_per_gpu
    from engines.runtimes.engine_plan import actor_memory

    memory = actor_memory(config.resolved_batch_size(), config.scan_size)
    accelerator = accelerator_type(resources)
    return pipelines_per_gpu(accelerator, config.pipelines_per_gpu, memory.total)


def gpu_pool_size(gpus: float, pipelines: int) -> int:
    """Actors that ``gpus`` GPUs hold at ``pipelines`` actors each (each asks 1/pipelines of one)."""
    return max(1, int(gpus) * pipelines)


def cluster_workers(config: RunConfig) -> int:
    """The pool a run gets when there is work for all: how finely to split long videos."""
    return pool_size(config, videos=1 << 30)


def worker_died(item: WorkItem, reason: str, times: int = TRIES) -> pa.Table:
    """The failed row of a work item whose worker died on it every time it was tried."""
    message = f"{item.path}: its worker died on it {times} times ({reason}); skipped"
    return tag_table(error_row(str(item.path), message), item.tag, "failed")


def _failed_row(table: pa.Table) -> tuple[dict, str | None] | None:
    """(its video facts, its error) when ``table`` is a work item's failed row (one row); else None."""
    if table.num_rows != 1 or table[STATUS_COLUMN][0].as_py() != "failed":
        return None
    facts = table[VIDEO_COLUMN][0].as_py()
    return (json.loads(facts) if facts else {}), table["error"][0].as_py()


def misplaced_item(item: WorkItem, table: pa.Table) -> Misplaced | None:
    """The node at fault when ``table`` is the failed row of a worker that could not open the
    item's video while this process can (:mod:`annotator.node_access`)."""
    failed = _failed_row(table)
    return misplaced(item.path, *failed) if failed else None


def raised_item(item: WorkItem, table: pa.Table) -> str | None:
    """Why to try the item on another worker when ``table`` is the failed row of a worker that
    raised on it (:data:`annotator.worker.RAISED_FACT`): its error and node; else None."""
    failed = _failed_row(table)
    node = failed[0].get(RAISED_FACT) if failed else None
    return f"{failed[1]} (on {node['address']})" if node else None


def stream_with_ray(config: RunConfig, items: list[WorkItem], worker: type = RayVideoWorker) -> Iterator[pa.Table]:
    """Tagged tables from a pool of Ray actors (see :func:`pool_size`), as they are produced.

    ``worker``: the actors' class (``annotate distil`` passes its harvest worker); its
    ``annotate(item)`` yields the item's tables.
    """
    init_ray(config)  # first: it sets Ray's auth mode before Ray is imported
    import ray

    from annotator.actor_pool import HEALTH_GROUP, creation_error, stream_from_pool

    workers = pool_size(config, len(items))
    num_cpus, num_gpus, threads = _worker_resources(config, workers)
    if num_gpus:
        from engines.runtimes.engine_plan import actor_memory

        log.info("%d GPU workers, %d per GPU; estimated %s at 1080p", workers, round(1 / num_gpus),
                 actor_memory(config.resolved_batch_size(), config.scan_size).describe())
    # The health group answers the pool's liveness checks on a thread of its own while the
    # default group (one thread: one item at a time) annotates.
    actor_class = ray.remote(concurrency_groups={HEALTH_GROUP: 1})(worker).options(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        # Ray reserves each CPU actor's memory, so no node gets more workers than it can hold.
        memory=None if num_gpus else worker_memory_bytes(config),
    )
    # A worker gets its videos as items: the run's paths (100,000 of them from a --files-from
    # list) need not travel with every actor, nor with each replacement.
    shipped = dataclasses.replace(config, inputs=(), listed=())
    actors = [actor_class.remote(shipped, threads) for _ in range(workers)]
    try:
        yield from stream_from_pool(actors, items, replace=lambda: actor_class.remote(shipped, threads),
                                    gave_up=worker_died, stall_s=config.stall_timeout, misplaced=misplaced_item,
                                    wanted=lambda left: pool_size(config, left), retry_elsewhere=raised_item)
    except NoNodeCanRead as exc:
        raise ClusterError(f"{exc}; finished videos are kept, re-run to resume") from None
    except ray.exceptions.RayError as exc:
        # Bad videos never get here (workers report them as rows, and a video that kills its worker
        # twice becomes one too): this is the cluster failing.
        if getattr(exc, "actor_init_failed", False):
            raise ClusterError(f"no Ray worker could start (the last one {creation_error(exc)}); finished videos "
                               "are kept, re-run to resume") from exc
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClusterError(f"the Ray run failed ({reason}); finished videos are kept, re-run to resume") from exc

"""One benchmark stage in a fresh process, so that its peak resident memory is its own.

``python -m benchmarks.stage STAGE --video V [options]`` runs one stage of the per-video
pipeline in isolation (or the whole pipeline) the way one Ray worker runs it, and prints one
line ``BENCH-RESULT {json}`` on stdout. :func:`run_stage` starts that process and returns the
parsed result; ``annotate bench`` and ``benchmarks/memory.py`` call it.

Stages, each timed after a warm-up call (model loading and first-call allocations excluded), the
median of ``--repeats`` passes:

* ``decode``: PyAV (or DALI) decoding of the clip into RGB batches, nothing held.
* ``detect``: the face-finding stage as the pipeline does it: :class:`annotator.tracking.FaceTracker`
  over the frames (full-frame detection on keyframes, re-detection in crops around each track
  in between). Its faces are saved to ``WORK/detections-<backend>.npz`` for the later stages.
* ``detect_full``: full-frame detection on every frame (the tracker with ``detect_every=1``, each
  face refined in its crop as on every keyframe), for comparison; its faces are saved to
  ``WORK/detections_full-<backend>.npz``.
* ``align``: :func:`engines.align.align_faces` on the saved landmarks.
* ``score``: ``Scorer.predict`` on the aligned crops of each batch (made untimed, batch by batch,
  so only the crops are held); the probabilities are saved to ``WORK/scores-<backend>.npz``.
  Then, untimed, the faces of ``detect_full`` are scored too and compared with the tracked path's
  on the same faces (``agreement``: top-1 expression agreement and mean |probability difference|,
  faces matched by IoU >= 0.5), which shows what the speed of tracking costs in outputs.
* ``write``: :func:`annotator.schema.frame_rows` per batch and a Parquet part written with
  :class:`annotator.writer.PartWriter` (fsync and rename included) into a temporary folder.
* ``pipeline``: :meth:`annotator.pipeline.VideoPipeline.annotate`, with its own per-stage timings.

``detect``, ``detect_full`` and ``align`` first decode the frames they need and hold them in
memory (untimed), so their ``peak_rss_mb`` (the process's peak) includes them;
``inputs_rss_mb`` is the resident memory just before the timed pass (inputs held, models loaded,
warm-up done), and ``stage_rss_mb`` the peak above it during the pass.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from annotator import config as run_defaults  # the run's defaults, so a bench measures what a run does

STAGES = ("decode", "detect", "detect_full", "align", "score", "write", "pipeline")
#: Environment variables that cap the threads of the numeric libraries a child loads.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_MARKER = "BENCH-RESULT "


class StageError(RuntimeError):
    """A stage process failed; the message ends with the tail of its stderr."""


@dataclass(kw_only=True)
class DetectionSettings:
    """How faces are found and scored, as ``annotate run`` does by default: a bench measures what a
    run does. Shared by ``annotate bench``'s options and each stage process's."""

    detector: str = run_defaults.DEFAULT_DETECTOR
    scorer: str = run_defaults.DEFAULT_SCORER
    det_size: int = run_defaults.DEFAULT_DET_SIZE
    det_threshold: float = run_defaults.DEFAULT_DET_THRESHOLD
    min_face: float = run_defaults.DEFAULT_MIN_FACE
    detect_every: int = run_defaults.DEFAULT_DETECT_EVERY
    scan_every: int = run_defaults.DEFAULT_SCAN_EVERY
    int8_keyframes: bool = True  # as annotate run (engines.int8); full detection on every frame stays float


@dataclass(kw_only=True)
class StageOptions(DetectionSettings):
    """What one stage process is told; every field becomes a ``--option`` of the child."""

    video: Path
    work: Path  # shared between the stages of one clip: detections and scores pass through it
    batch_size: int = 8
    backend: str = "onnxrt"
    device: str = "cpu"
    decoder: str = "pyav"
    frames: int = 0  # the first N frames of the clip (0: all)
    full_frames: int = 0  # detect_full: the first N of those (0: all of them)
    threads: int = 1
    inputs_backend: str = "onnxrt"  # align/write: whose saved detections and scores to use
    sample_rss: bool = False  # pipeline: record resident memory after every batch
    repeats: int = 1  # timed passes; the median one is reported (detect_full: always one)

    def argv(self) -> list[str]:
        args = []
        for name, value in self.__dict__.items():
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                args += [flag] if value else []
            else:
                args += [flag, str(value)]
        return args


def run_stage(stage: str, options: StageOptions, timeout: float | None = None) -> dict[str, Any]:
    """Run ``stage`` in a fresh Python process and return its result.

    The child is capped to ``options.threads`` threads (torch, ONNX Runtime, FFmpeg and the
    OpenMP pools), as one single-threaded Ray worker is.

    Raises:
        StageError: the child failed or printed no result.
    """
    env = dict(os.environ)
    env.update({name: str(options.threads) for name in _THREAD_VARIABLES})
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, "-m", "benchmarks.stage", stage, *options.argv()]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARKER):
            if proc.returncode == 0:
                return json.loads(line[len(_MARKER):])
            break
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise StageError(f"stage {stage} on {options.video.name} ({options.backend}, batch {options.batch_size}) "
                     f"failed with exit code {proc.returncode}:\n{tail}")


# ----------------------------------------------------------------------------------------------
# The child
# ----------------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """Resident memory of this process now, MB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE / 1e6


#: The process's peak before :func:`_timed` reset the kernel's mark (VmHWM), MB.
_peak_before_reset = 0.0


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started, MB.

    The kernel's VmHWM of this process, not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux keeps
    ``ru_maxrss`` across ``execve``, so a child started by a large parent (``annotate bench``
    after making its clips) reports the parent's peak instead of its own.
    """
    hwm = _hwm_mb()
    if hwm is None:  # not Linux: the best there is
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
    return max(hwm, _peak_before_reset, rss_mb())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _decode(opts: argparse.Namespace, batch_size: int | None = None):
    """The batches the pipeline's decoder yields for this clip (a fresh generator)."""
    from engines.decoders import Sampling

    if opts.decoder == "dali":
        from engines.decoders.dali import decode

        return decode(opts.video, Sampling(), batch_size or opts.batch_size)
    from engines.decoders.pyav import decode

    return decode(opts.video, Sampling(), batch_size or opts.batch_size, threads=opts.threads)


def _take(batches, limit: int):
    """The batches holding the first ``limit`` frames (0: all), the last one cut to fit."""
    from engines.decoders import FrameBatch

    count = 0
    for batch in batches:
        if limit and count + len(batch) >= limit:
            keep = limit - count
            yield FrameBatch(batch.frames[:keep], batch.frame_index[:keep], batch.pts_s[:keep], batch.scale)
            return
        count += len(batch)
        yield batch


def _load_frames(opts: argparse.Namespace) -> list:
    """The clip's first ``--frames`` frames, decoded once and held (each batch keeps its own buffer)."""
    return list(_take(_decode(opts), opts.frames))


def _min_face(opts: argparse.Namespace, batch) -> float:
    return opts.min_face / batch.scale  # as the pipeline: --min-face is in video pixels


def _detector(opts: argparse.Namespace, int8_frames: bool = False):
    from engines.factory import create_detector

    detector, _ = create_detector(opts.detector, opts.backend, opts.device, opts.threads,
                                  det_size=opts.det_size, threshold=opts.det_threshold, min_face=opts.min_face,
                                  int8_frames=int8_frames)
    return detector


def _detector_side(opts: argparse.Namespace, batch, factor: int = 1) -> int:
    """The keyframe detector's long side for this clip (``factor`` 2: a scan's, as the pipeline)."""
    from engines.retinaface import detector_side

    height, width = int(batch.frames.shape[1]), int(batch.frames.shape[2])
    return detector_side(width, height, _min_face(opts, batch), opts.det_size * factor)


def _truth(video: Path) -> list | None:
    """The ground truth of a :func:`benchmarks.media.multiface_clip`, when one lies beside the clip."""
    if not video.with_suffix(".json").is_file():
        return None
    from benchmarks.media import load_truth

    try:
        return load_truth(video)
    except (KeyError, TypeError, ValueError):
        return None  # some other JSON file


def _recall(video: Path, frame_index, boxes_per_frame, min_face: float) -> dict[str, float] | None:
    """Recall against the clip's ground truth: over all faces, over those of at least
    ``--min-face`` (the ones the run asks for), and per face."""
    truth = _truth(video)
    if truth is None or max(frame_index, default=-1) >= len(truth):
        return None
    from benchmarks.media import recall

    found = recall([truth[i] for i in frame_index], boxes_per_frame, min_side=min_face)
    return {k: round(v, 4) if v == v else None for k, v in found.items()}  # NaN: no face that large


def _timed(fn, repeats: int = 1) -> tuple[Any, float, float, float]:
    """(result, seconds, RSS before, peak RSS during) of the median of ``repeats`` calls of ``fn()``.

    A shared VM's speed drifts by 10-30 % from one second to the next, which would decide a
    ratio of two stages measured a minute apart; the median of a few passes does not follow one
    slow or fast second. ``fn`` must start afresh each call; the result is the median pass's.
    The kernel's peak-RSS mark (VmHWM) is reset first where Linux allows it, so the peak is
    these calls', not that of the loading before them; otherwise it is the process's peak so far.
    """
    before = rss_mb()
    reset = _reset_peak()
    passes = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        passes.append((time.perf_counter() - start, result))
    seconds, result = sorted(passes, key=lambda p: p[0])[len(passes) // 2]
    peak = (_hwm_mb() if reset else None) or peak_rss_mb()
    return result, seconds, before, max(peak, before)


def _reset_peak() -> bool:
    global _peak_before_reset
    _peak_before_reset = max(_peak_before_reset, _hwm_mb() or 0.0)
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # "reset the peak resident set size" (proc(5))
        return _hwm_mb() is not None
    except OSError:
        return False


def _hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def _stage_decode(opts: argparse.Namespace) -> dict[str, Any]:
    next(iter(_take(_decode(opts), opts.batch_size)))  # warm-up: FFmpeg's codec and threads, page cache

    def run() -> tuple[int, tuple[int, int]]:
        count, size = 0, (0, 0)
        for batch in _take(_decode(opts), opts.frames):
            count += len(batch)
            size = (int(batch.frames.shape[2]), int(batch.frames.shape[1]))
        _sync(opts.device)
        return count, size

    (frames, size), seconds, before, peak = _timed(run, opts.repeats)
    return {"frames": frames, "faces": 0, "seconds": seconds, "inputs_rss_mb": before, "during_peak_mb": peak,
            "decoded_size": list(size)}


def _tracked_arrays(found: list) -> dict[str, Any]:
    import numpy as np

    return {
        "counts": np.array([len(f.scores) for f in found], np.int64),
        "boxes": np.concatenate([f.boxes for f in found]).reshape(-1, 4).astype(np.float32),
        "landmarks": np.concatenate([f.landmarks for f in found]).reshape(-1, 5, 2).astype(np.float32),
        "scores": np.concatenate([f.scores for f in found]).reshape(-1).astype(np.float32),
        "track_ids": np.concatenate([f.track_ids for f in found]).reshape(-1).astype(np.int64),
        "keyframe": np.array([f.keyframe for f in found], bool),
    }


def _track(opts: argparse.Namespace, detect_every: int, frames: int, saved_as: str,
           int8_frames: bool = False) -> dict[str, Any]:
    """Find faces as the pipeline does (:class:`annotator.tracking.FaceTracker`) on the first
    ``frames`` frames, timed; the faces are saved to ``WORK/<saved_as>-<backend>.npz``."""
    import numpy as np

    from annotator.tracking import FaceTracker

    batches = list(_take(iter(_load_frames(opts)), frames))
    tracker = FaceTracker(_detector(opts, int8_frames), detect_every=detect_every, scan_every=opts.scan_every)
    side, min_face = _detector_side(opts, batches[0]), _min_face(opts, batches[0])
    scan = _detector_side(opts, batches[0], run_defaults.SCAN_SIZE_FACTOR)
    tracker.start(side, min_face, scan_size=scan)
    tracker(batches[0].frames[:2])  # warm-up: a scan and a crop re-detection
    tracker.detector.detect(batches[0].frames[:1], min_face=min_face, det_size=side)  # and a keyframe

    def run() -> list:
        tracker.start(side, min_face, scan_size=scan)  # each pass from the first frame, as a video
        found = [faces for batch in batches for faces in tracker(batch.frames)]
        _sync(opts.device)
        return found

    # Full detection on every frame is a comparison, 10x slower and outside the ratio: one pass.
    found, seconds, before, peak = _timed(run, 1 if detect_every == 1 else opts.repeats)
    arrays = _tracked_arrays(found)
    frame_index = np.concatenate([b.frame_index for b in batches])
    scale = batches[0].scale
    np.savez(opts.work / f"{saved_as}-{opts.backend}.npz", frame_index=frame_index,
             pts_s=np.concatenate([b.pts_s for b in batches]), scale=scale, **arrays)
    result = {"frames": len(found), "faces": int(arrays["counts"].sum()), "seconds": seconds,
              "inputs_rss_mb": before, "during_peak_mb": peak, "keyframes": tracker.keyframes,
              "scans": tracker.scans, "detector_side": side, "scan_side": tracker.scan_size}
    found_recall = _recall(opts.video, frame_index.tolist(), [f.boxes * scale for f in found], opts.min_face)
    if found_recall is not None:
        result["recall"], result["recall_asked"] = found_recall.pop("all"), found_recall.pop("asked")
        result["recall_by_face"] = found_recall
    return result


def _stage_detect(opts: argparse.Namespace) -> dict[str, Any]:
    return _track(opts, opts.detect_every, opts.frames, "detections", int8_frames=opts.int8_keyframes)


def _stage_detect_full(opts: argparse.Namespace) -> dict[str, Any]:
    """Full-frame detection on every frame (``--detect-every 1``): the reference the tracked path
    is compared with, for speed here and for its expression outputs in the score stage; always the
    float network, so the comparison also covers ``--int8-keyframes``."""
    return _track(opts, 1, opts.full_frames or opts.frames, "detections_full")


def _saved(opts: argparse.Namespace, what: str) -> dict[str, Any]:
    import numpy as np

    path = opts.work / f"{what}-{opts.inputs_backend}.npz"
    if not path.is_file():
        raise SystemExit(f"{path}: missing; run the detect (and score) stage with --backend {opts.inputs_backend} first")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _faces_per_batch(batches: list, detections: dict[str, Any]) -> list[tuple]:
    """Per batch: (frame_of_face, landmarks, face slice) of the saved detections."""
    import numpy as np

    counts = detections["counts"]
    if len(counts) < sum(len(b) for b in batches):
        raise SystemExit("the saved detections cover fewer frames than this stage was given")
    out, frame, face = [], 0, 0
    for batch in batches:
        per_frame = counts[frame:frame + len(batch)]
        n = int(per_frame.sum())
        frame_of_face = np.repeat(np.arange(len(batch)), per_frame)
        out.append((frame_of_face, detections["landmarks"][face:face + n], slice(face, face + n)))
        frame, face = frame + len(batch), face + n
    return out


def _skip(detections: dict[str, Any], frames: int) -> dict[str, Any]:
    """The saved detections from frame ``frames`` on."""
    counts = detections["counts"]
    first = int(counts[:frames].sum())
    return {**detections, "counts": counts[frames:], "landmarks": detections["landmarks"][first:]}


def _stage_align(opts: argparse.Namespace) -> dict[str, Any]:
    from engines.align import align_faces

    batches = _load_frames(opts)
    faces = _faces_per_batch(batches, _saved(opts, "detections"))
    align_faces(batches[0].frames, *faces[0][:2])  # warm-up

    def run() -> int:
        count = 0
        for batch, (frame_of_face, landmarks, _) in zip(batches, faces):
            count += len(align_faces(batch.frames, frame_of_face, landmarks))
        _sync(opts.device)
        return count

    count, seconds, before, peak = _timed(run, opts.repeats)
    return {"frames": sum(len(b) for b in batches), "faces": count, "seconds": seconds,
            "inputs_rss_mb": before, "during_peak_mb": peak}


def _stage_score(opts: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from engines.align import align_faces
    from engines.factory import create_scorer

    opts.inputs_backend = opts.backend  # this backend's own detections
    detections = _saved(opts, "detections")
    crops, frames = [], 0
    for batch in _take(_decode(opts), opts.frames):  # batch by batch: only the crops are held
        ((frame_of_face, landmarks, _),) = _faces_per_batch([batch], _skip(detections, frames))
        crops.append(align_faces(batch.frames, frame_of_face, landmarks))
        frames += len(batch)
    scorer = create_scorer(opts.scorer, opts.backend, opts.device, opts.threads)
    warm = next((c for c in crops if len(c)), None)
    if warm is not None:
        scorer.predict(warm)  # warm-up at a real batch's shape

    def run() -> list:
        out = [scorer.predict(c) for c in crops]
        _sync(opts.device)
        return out

    predicted, seconds, before, peak = _timed(run, opts.repeats)
    probs = np.concatenate([p for p, _ in predicted]).reshape(-1, 7)
    va = None if not scorer.has_va else np.concatenate([v for _, v in predicted]).reshape(-1, 2)
    np.savez(opts.work / f"scores-{opts.backend}.npz", probs=probs, model_id=scorer.model_id,
             **({"va": va} if va is not None else {}))
    result = {"frames": frames, "faces": len(probs), "seconds": seconds, "inputs_rss_mb": before,
              "during_peak_mb": peak, "crop_batches": len(crops)}
    if (opts.work / f"detections_full-{opts.backend}.npz").is_file():
        result["agreement"] = _agreement(opts, scorer, detections, probs)
    return result


def _agreement(opts: argparse.Namespace, scorer, tracked: dict[str, Any], tracked_probs) -> dict[str, Any]:
    """Expression outputs of the tracked path against full detection on every frame, same faces.

    Faces of a frame are matched by IoU >= 0.5 (each at most once); over the matched ones, the
    share whose top-1 expression is the same and the mean absolute difference of the 7
    probabilities. ``unmatched``: faces only one of the two paths found (a new face that the
    tracked path finds at its next keyframe, or a small one found only in its crop).
    """
    import numpy as np

    from annotator.tracking import associate
    from engines.align import align_faces

    full = _saved(opts, "detections_full")
    probs, frames = [], 0
    for batch in _take(_decode(opts), len(full["counts"])):
        ((frame_of_face, landmarks, _),) = _faces_per_batch([batch], _skip(full, frames))
        if len(frame_of_face):
            probs.append(scorer.predict(align_faces(batch.frames, frame_of_face, landmarks))[0])
        frames += len(batch)
    full_probs = np.concatenate(probs).reshape(-1, 7) if probs else np.zeros((0, 7), np.float32)
    starts = {name: np.concatenate([[0], np.cumsum(d["counts"])]) for name, d in (("tracked", tracked), ("full", full))}
    same, diffs, unmatched = [], [], 0
    for f in range(min(frames, len(tracked["counts"]))):
        a0, a1 = starts["full"][f], starts["full"][f + 1]
        b0, b1 = starts["tracked"][f], starts["tracked"][f + 1]
        match = associate(tracked["boxes"][b0:b1], full["boxes"][a0:a1], threshold=0.5)
        for i, j in enumerate(match):
            if j < 0:
                continue
            p, q = full_probs[a0 + i], tracked_probs[b0 + j]
            same.append(int(p.argmax()) == int(q.argmax()))
            diffs.append(float(np.abs(p - q).mean()))
        unmatched += (a1 - a0) + (b1 - b0) - 2 * int((match >= 0).sum())
    return {"frames": frames, "faces": len(same), "top1": round(float(np.mean(same)), 4) if same else None,
            "mean_abs_dp": round(float(np.mean(diffs)), 4) if diffs else None, "unmatched": int(unmatched)}


def _stage_write(opts: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from annotator.pipeline import video_id
    from annotator.schema import frame_rows
    from annotator.writer import PartWriter, schema_with_metadata

    dets, scores = _saved(opts, "detections"), _saved(opts, "scores")
    total = len(dets["counts"]) if not opts.frames else min(opts.frames, len(dets["counts"]))
    vid, model_id = video_id(opts.video), str(scores["model_id"])
    va = scores.get("va")
    schema = schema_with_metadata({"package": "video-annotator", "benchmark": True})
    starts = np.concatenate([[0], np.cumsum(dets["counts"])])

    def batch_rows(lo: int, hi: int):
        a, b = int(starts[lo]), int(starts[hi])
        return frame_rows(
            video_path=str(opts.video), video_id=vid, model_id=model_id,
            frame_index=dets["frame_index"][lo:hi], pts_s=dets["pts_s"][lo:hi], faces_per_frame=dets["counts"][lo:hi],
            boxes=dets["boxes"][a:b] * dets["scale"], scores=dets["scores"][a:b],
            landmarks=dets["landmarks"][a:b] * dets["scale"], track_ids=dets["track_ids"][a:b],
            probs=scores["probs"][a:b], va=None if va is None else va[a:b],
        )

    with tempfile.TemporaryDirectory(dir=opts.work) as tmp:
        batch_rows(0, min(total, opts.batch_size))  # warm-up: Arrow's kernels

        def run() -> tuple[int, dict[str, float]]:
            timings = {"rows": 0.0, "write": 0.0}
            writer = PartWriter(Path(tmp) / "part-bench.parquet", schema)
            rows = 0
            for lo in range(0, total, opts.batch_size):
                start = time.perf_counter()
                batch = batch_rows(lo, min(total, lo + opts.batch_size))
                middle = time.perf_counter()
                writer.write(batch)
                timings["rows"] += middle - start
                timings["write"] += time.perf_counter() - middle
                rows += batch.num_rows
            start = time.perf_counter()
            writer.commit(json.dumps({"benchmark": True}))
            timings["write"] += time.perf_counter() - start
            return rows, timings

        (rows, timings), seconds, before, peak = _timed(run, opts.repeats)
        size = (Path(tmp) / "part-bench.parquet").stat().st_size
    return {"frames": total, "faces": int(dets["counts"][:total].sum()), "seconds": seconds, "inputs_rss_mb": before,
            "during_peak_mb": peak, "rows": rows, "rows_s": timings["rows"], "write_s": timings["write"],
            "parquet_bytes": size}


def _stage_pipeline(opts: argparse.Namespace) -> dict[str, Any]:
    from annotator.config import RunConfig
    from annotator.pipeline import STAGES as PIPELINE_STAGES, VideoPipeline

    config = RunConfig(inputs=(opts.video,), out=opts.work / "unused.parquet", workers=0,
                       batch_size=opts.batch_size, device=opts.device, decoder=opts.decoder, backend=opts.backend,
                       detector=opts.detector, scorer=opts.scorer, det_size=opts.det_size,
                       det_threshold=opts.det_threshold, min_face=opts.min_face, detect_every=opts.detect_every,
                       scan_every=opts.scan_every, int8_keyframes=opts.int8_keyframes)
    pipeline = VideoPipeline(config, threads=opts.threads)
    load_rss = rss_mb()
    warm = pipeline.annotate(opts.video)
    next(warm)  # warm-up: one batch through every stage
    warm.close()

    def run() -> dict[str, Any]:
        pipeline.timings = dict.fromkeys(PIPELINE_STAGES, 0.0)
        pipeline.frames = pipeline.faces = 0
        samples: list[float] = []
        for _ in pipeline.annotate(opts.video):
            if opts.sample_rss:
                samples.append(rss_mb())
            if opts.frames and pipeline.frames >= opts.frames:
                break
        _sync(opts.device)
        return {"frames": pipeline.frames, "faces": pipeline.faces, "keyframes": pipeline.tracker.keyframes,
                "stage_s": dict(pipeline.timings), "samples": samples}

    counted, seconds, before, peak = _timed(run, opts.repeats)
    samples = counted.pop("samples")
    result = {**counted, "seconds": seconds, "inputs_rss_mb": before, "during_peak_mb": peak,
              "models_rss_mb": load_rss}
    if samples:
        result["rss_mb_at_10pct"] = samples[len(samples) // 10]
        result["rss_mb_at_end"] = samples[-1]
        result["rss_samples"] = len(samples)
    return result


_RUNNERS = {"decode": _stage_decode, "detect": _stage_detect, "detect_full": _stage_detect_full,
            "align": _stage_align, "score": _stage_score, "write": _stage_write, "pipeline": _stage_pipeline}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stage", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=STAGES)
    defaults = StageOptions(video=Path(), work=Path())
    for name, value in defaults.__dict__.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(value), default=value, required=name in ("video", "work"))
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)  # the warps and the letterbox, as VideoPipeline(threads=...)
    opts.work.mkdir(parents=True, exist_ok=True)
    result = _RUNNERS[opts.stage](opts)
    seconds = result["seconds"]
    result.update(
        stage=opts.stage, backend=opts.backend, batch_size=opts.batch_size, decoder=opts.decoder,
        fps=result["frames"] / seconds if seconds > 0 else 0.0,
        faces_per_s=result["faces"] / seconds if seconds > 0 else 0.0,
        peak_rss_mb=peak_rss_mb(),
    )
    result["stage_rss_mb"] = max(0.0, result.pop("during_peak_mb") - result["inputs_rss_mb"])
    print(_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

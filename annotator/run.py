"""``annotate run`` as a library call: discover, pull models, stream rows to parts, merge.

The driver never holds more than the tables in flight: each arriving table is appended to its
video's part writer, and a part is committed (renamed into place) only when its video is done.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

import annotator
from annotator.collect import PartCollector
from annotator.config import ConfigError, RunConfig
from annotator.discover import Discovery, find_videos
from annotator import segmenting
from annotator.orchestrate import cluster_workers, on_cluster, require_device, stream_in_process, stream_with_ray
from annotator.ownership import OutputClaim, writing
from annotator.progress import STATUS_EVERY_S, RunProgress
from annotator.schema import error_row
from annotator.temporal_card import temporal_card, temporal_record
from annotator.wording import counted, listed
from annotator.writer import (
    ExistingParts,
    MergedResult,
    OutputLayout,
    changed_since,
    key_of_part,
    merge_parts,
    part_key,
    schema_with_metadata,
    video_stamp,
)
from engines.cache import Artifacts, resolve
from engines.factory import lookup, model_id
from engines.registry import ModelEntry
from engines.spec import ModelSpec, check_onnx, is_spec, load_spec

log = logging.getLogger(__name__)


#: Exit codes of ``annotate run`` (documented in its --help and the README).
EXIT_OK = 0  # every video annotated
EXIT_FAILED = 1  # the program or the cluster failed (finished videos are kept; re-run resumes)
EXIT_USAGE = 2  # bad options or paths, an --out that cannot be used; nothing was done
EXIT_SOME_INPUTS_FAILED = 3  # the run finished, but some inputs failed or were damaged


@dataclass(frozen=True)
class RunSummary:
    """What a run did; the CLI prints it and derives the exit code from it."""

    out: Path
    videos: int
    skipped: int
    failed: int
    frames: int
    faces: int
    seconds: float
    damaged: int = 0  # annotated as far as they decode; the damage is in their error row
    frames_lost: int = 0
    problems: tuple[str, ...] = ()  # one line per video failed or damaged in this run
    not_videos: str = ""  # "skipped N files that are not videos (...)"

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_INPUTS_FAILED if self.failed or self.damaged else EXIT_OK

    def line(self) -> str:
        lost = f"{counted(self.frames_lost, 'frame')} lost"
        damaged = f", {self.damaged:,} damaged ({lost})" if self.damaged else ""
        skipped = f"; {self.not_videos}" if self.not_videos else ""
        rate = f", {self.fps:,.1f} frames/s" if self.frames else ""  # nothing decoded: no rate (it read "0.0")
        return (f"{self.out}: {counted(self.videos, 'video')} ({self.skipped:,} already done, {self.failed:,} failed"
                f"{damaged}), {counted(self.frames, 'frame')}, {counted(self.faces, 'face')}{rate}{skipped}")


def _model_record(role: str, artifacts: Artifacts) -> dict[str, object]:
    entry = artifacts.entry
    return {
        "role": role, "name": entry.name, "id": model_id(artifacts), "source": entry.source.describe(),
        "source_sha256": entry.sha256 or entry.sha256_prefix, "artifact_sha256": artifacts.sha256,
        "licence": entry.licence, "training_data": entry.training_data, "description": entry.description,
        "valence_arousal": "predicted" if entry.has_va else "not predicted by this model: columns are null",
    }


def _keyframe_record(artifacts: Artifacts, config: RunConfig) -> dict[str, object]:
    """The int8 copy of the detector that keyframes use (made here on first use, so that the
    workers of this machine find it ready), where the run may use it: ONNX Runtime on a CPU
    (the driver cannot tell ``--device auto`` apart without torch; a GPU worker uses the float
    network whatever this says). Empty where it cannot apply."""
    if not (config.int8_keyframes and config.backend in ("auto", "onnxrt") and config.device in ("auto", "cpu")):
        return {}
    from engines.int8 import int8_onnx, int8_sha256

    path = int8_onnx(artifacts, config.cache_dir)
    return {"keyframes_int8": {"onnx": f"{path.parent.name}/{path.name}", "sha256": int8_sha256(path),
                               "used": "for keyframes' full-frame detection where a worker runs ONNX Runtime "
                                       "on a CPU; faces are re-found and aligned by the float network"}}


def _spec_record(spec: ModelSpec) -> dict[str, object]:
    """A spec model's record: what the spec says, and the digests of both files that made a row."""
    return {
        "role": "scorer", "name": spec.name, "id": spec.model_id, "source": spec.source,
        "spec": str(spec.path), "spec_sha256": spec.spec_sha256, "onnx": spec.onnx.name, "onnx_sha256": spec.sha256,
        "artifact_sha256": {spec.onnx.name: spec.sha256}, "licence": spec.licence,
        "labels": list(spec.expression.labels), "dropped_labels": list(spec.expression.dropped),
        "description": f"ONNX model described by {spec.path.name}",
        "valence_arousal": "predicted" if spec.has_va else "not predicted by this model: columns are null",
    }


def _lookup_scorer(name: str) -> ModelEntry | ModelSpec:
    if is_spec(name):
        spec = load_spec(name)
        check_onnx(spec)  # a graph that contradicts the spec fails now, not in every worker
        return spec
    return lookup(name, "scorer")


def lookup_models(config: RunConfig) -> tuple[ModelEntry, ModelEntry | ModelSpec]:
    """The detector entry and the scorer's entry (or spec); an unknown name or a bad spec is a
    configuration error."""
    try:
        entries = lookup(config.detector, "detector"), _lookup_scorer(config.scorer)
        if config.temporal:
            temporal_card(config.scorer)
        return entries
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def run_metadata(config: RunConfig) -> dict[str, object]:
    """Models (with digests), package version and options; pulls the models if needed."""
    detector, scorer = lookup_models(config)
    detector_artifacts = resolve(detector, config.cache_dir)
    models = [{**_model_record("detector", detector_artifacts), **_keyframe_record(detector_artifacts, config)},
              _spec_record(scorer) if isinstance(scorer, ModelSpec)
              else _model_record("scorer", resolve(scorer, config.cache_dir))]
    if config.temporal:  # its id joins the fingerprint: temporal and per-frame rows never mix
        models.append(temporal_record(config.scorer))
    options = config.options_for_metadata()
    # What makes rows comparable across resumed runs: same weights, same sampling and detection.
    # Not --int8-keyframes: keyframes only place the windows faces are re-found and aligned in by
    # the float network, and rows made either way agreed on 0.999-1.000 of faces (engines.int8);
    # each part's metadata says which it was.
    fingerprint = {
        "models": [m["id"] for m in models],
        **{k: options[k] for k in ("sampling", "det_threshold", "det_size", "min_face", "detect_every", "scan_every",
                                   "deinterlace")},
    }
    return {"package": "video-annotator", "version": annotator.__version__, "models": models,
            "options": options, "fingerprint": fingerprint}


def _check_single_file(layout: OutputLayout, config: RunConfig) -> MergedResult | None:
    """``--out x.parquet``: an existing file is touched only if annotate wrote it. A re-run adds to
    it (the earlier result it returns); --overwrite replaces it."""
    out = layout.out
    if not layout.single_file or not (out.exists() or out.is_symlink()):
        return None
    if not out.is_file():
        raise ConfigError(f"{out}: exists and is not a file")
    try:
        base = MergedResult.read(out)
    except (OSError, KeyError, ValueError, pa.ArrowException) as exc:
        # Ours are written whole (write, then rename): one that does not read is someone else's, or
        # was damaged since (a copy cut short); either way it is not annotate's to replace.
        raise ConfigError(f"{out}: was not written by annotate, or is damaged ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}); refusing to replace it "
                          "(choose another --out)") from None
    if config.overwrite:
        return None
    if base is None:
        raise ConfigError(f"{out}: already exists, merged by an older annotate that did not list its videos, so "
                          "a re-run cannot add to it (pass --overwrite to annotate every video again into it, or "
                          "choose another --out)")
    return base


def _refuse_others(where: Path, fingerprints: set[str], ours: str) -> None:
    """Results made with other models or options are refused rather than mixed."""
    others = {comparable_fingerprint(f) for f in fingerprints} - {ours}
    if others:
        theirs, mine = json.loads(sorted(others)[0]), json.loads(ours)
        theirs = theirs if isinstance(theirs, dict) else {}
        differ = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        raise ConfigError(
            f"{where}: holds results made with other models or options ({', '.join(differ)}; "
            "pass the same options, --overwrite, or choose another --out)"
        )


def _existing_parts(layout: OutputLayout, claim: OutputClaim, metadata: dict[str, object],
                    config: RunConfig, base: MergedResult | None = None) -> ExistingParts:
    """What is already done, after --overwrite removed earlier parts (only ours, see OutputClaim):
    the parts, and the videos of ``base`` (an earlier merged result) that no part redoes."""
    if config.overwrite:
        claim.remove_parts()
    existing = layout.scan()
    ours = json.dumps(metadata["fingerprint"], sort_keys=True)
    held = base.existing() if base is not None else None
    if held is not None:
        _refuse_others(layout.out, held.fingerprints, ours)
    _refuse_others(layout.parts_dir, existing.fingerprints, ours)
    if held is not None:
        redone = {key_of_part(path)[0] for path in layout.parts()}
        existing.done |= held.done - redone
        existing.stamps = {**{k: v for k, v in held.stamps.items() if k not in redone}, **existing.stamps}
        existing.damaged = {**{k: v for k, v in held.damaged.items() if k not in redone}, **existing.damaged}
    return existing


def comparable_fingerprint(fingerprint: str) -> str:
    """A part's fingerprint (JSON) as this version writes it: parts from before ``--deinterlace``
    were made without deinterlacing, so they resume with ``--no-deinterlace``."""
    values = json.loads(fingerprint)
    if isinstance(values, dict):
        values.setdefault("deinterlace", False)
    return json.dumps(values, sort_keys=True)


def run(config: RunConfig, progress: bool = True, status_every: float = STATUS_EVERY_S) -> RunSummary:
    """Annotate every video of ``config.inputs`` into ``config.out``.

    ``progress``: a bar on a terminal, else a status line on stderr every ``status_every``
    seconds (0: none); no progress output at all without it.

    Raises:
        ConfigError: bad paths or options, or an output that cannot be used; raised before
            any video is processed.
        OutputBusy: another run is writing the same output.
        OutputWriteError: the output stopped accepting writes (a full disk); finished videos
            are kept and a re-run resumes.
        engines.sources.FetchError: a model cannot be fetched.
    """
    start = time.perf_counter()
    started_utc = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lookup_models(config)
    require_device(config)  # --device cuda without a GPU: one line now, not a wait forever
    layout = OutputLayout(config.out)
    found = find_videos(config.inputs, own=(layout.parts_dir, layout.out), listed=config.listed,
                        list_name=config.files_from or "")
    if found.aliases:
        log.warning("%s to videos listed under another path (links?), annotated once: %s",
                    counted(len(found.aliases), "path"),
                    listed([f"{alias} (= {kept})" for alias, kept in found.aliases]))
    base = _check_single_file(layout, config)
    with OutputClaim(layout.parts_dir) as claim:
        try:
            metadata = run_metadata(config)
            existing = _existing_parts(layout, claim, metadata, config, base)
        except BaseException:
            if claim.created and not layout.parts():
                claim.dissolve()  # nothing of ours worth keeping: leave no empty folder behind
            raise
        summary = _annotate(config, layout, found, existing, schema_with_metadata(metadata), progress, start,
                            status_every)
        if layout.single_file:
            keys = [part_key(p) for p in found.videos] + [part_key(p) for p, _ in found.problems]
            candidates = (layout.part_path(k, failed=failed) for k in keys for failed in (False, True))
            parts = [p for p in candidates if p.is_file()]
            # How long this invocation took and what it did (a resumed run counts only its own
            # frames), for `annotate report`; a parts directory has no single place for it.
            timing = {"started_utc": started_utc, "seconds": round(time.perf_counter() - start, 3),
                      "frames": summary.frames}
            if base is None or not base.unchanged_by(parts):  # else: nothing new, the file stays as it is
                with writing(layout.out, "the parts are kept, re-run to merge them"):
                    merge_parts(parts, layout.out, schema_with_metadata({**metadata, "timing": timing}), base)
            claim.dissolve()
    return summary


def _forget_changed(layout: OutputLayout, existing: ExistingParts, keys: dict[Path, str]) -> None:
    """Remove the parts of videos that changed since they were annotated (another size or
    modification time than their part records: replaced, re-encoded, or still being copied
    then), so that they are annotated again rather than keep rows of what they no longer hold.
    The parts are annotate's own; parts written before stamps were recorded are kept."""
    changed = [video for video, key in keys.items()
               if key in existing.done and changed_since(existing.stamps.get(key), video_stamp(video))]
    for video in changed:
        key = keys[video]
        layout.part_path(key).unlink(missing_ok=True)
        existing.done.discard(key)
        existing.damaged.pop(key, None)
    if changed:
        log.warning("%s changed since annotated (size or modification time), annotated again: %s",
                    counted(len(changed), "video"), listed(changed))


def _forget_split_in_error(layout: OutputLayout, existing: ExistingParts, keys: dict[Path, str]) -> None:
    """Remove the parts of videos that an earlier version cut into segments although their clock
    starts again (recordings joined from pieces), so that they are annotated again, whole: their
    segments lost the frames of a piece without an error. Only parts stitched before the check
    are checked (a few, long videos; packet headers only)."""
    for video, key in keys.items():
        if key in existing.done and key in existing.split_unchecked:
            if (why := segmenting.split_in_error(video)) is not None:
                log.warning("%s: cut into segments by an earlier version although %s, and its segments lost "
                            "frames: annotated again, whole", video, why)
                layout.part_path(key).unlink(missing_ok=True)
                existing.done.discard(key)
                existing.damaged.pop(key, None)


def _annotate(config: RunConfig, layout: OutputLayout, found: Discovery, existing: ExistingParts,
              schema: pa.Schema, progress: bool, start: float, status_every: float) -> RunSummary:
    """Stream every video not yet done into its part; return what happened. ``progress``: a bar
    where stderr is a terminal, otherwise a status line every ``status_every`` seconds
    (annotator.progress); neither without it."""
    videos = found.videos
    keys = {v: part_key(v) for v in videos}
    _forget_changed(layout, existing, keys)
    _forget_split_in_error(layout, existing, keys)
    pending = [(v, key) for v, key in keys.items() if key not in existing.done]
    collector = PartCollector(layout, schema)
    for key in existing.damaged.keys() & set(keys.values()):
        collector.note_damage(existing.damaged[key])  # done before, damaged all the same
    for _, key in pending:
        layout.part_path(key, failed=True).unlink(missing_ok=True)  # failed before: retry
    # Long videos are split into segments (annotator.segmenting.work_items); only PyAV decodes a
    # segment, and the in-process path has one worker anyway.
    on_ray = bool(pending) and config.workers != 0
    if on_ray:
        config = on_cluster(config)
    split = on_ray and config.resolved_decoder() == "pyav"
    items = segmenting.work_items(layout, pending, cluster_workers(config) if split else 1)
    # Videos done, in hundredths: each table of rows counts the part of its video it finishes
    # (annotator.collect.PartCollector.add), so a long video moves the bar and its time left.
    bar = RunProgress(len(videos), len(videos) - len(pending), "annotate", shown=progress, every_s=status_every)
    written = functools.partial(writing, layout.parts_dir, "finished videos are kept, re-run to resume")
    stream = stream_in_process(config, items) if config.workers == 0 else stream_with_ray(config, items)
    try:
        with written():
            for path, why in found.problems:
                collector.add_failure(part_key(path), pa.Table.from_batches([error_row(str(path), f"{path}: {why}")]))
        for table in (stream if items else ()):
            with written():
                share = collector.add(table)
            rate = collector.frames / (time.perf_counter() - start)
            bar.advance(share, frames=collector.frames, faces=collector.faces, failed=collector.failed, fps=f"{rate:,.1f}")
    finally:
        # Stop the workers now, while Ray is up: a stream left to the garbage collector after an
        # error (a full disk) would run its clean-up after Ray's shutdown, and Ray's calls there
        # start a new local instance and wait on it for ever.
        try:
            stream.close()
        finally:  # whatever stopping the workers raised, no open part is kept
            collector.close()
            bar.close()
    return RunSummary(
        config.out, len(videos) + len(found.problems), len(videos) - len(pending), collector.failed,
        collector.frames, collector.faces, time.perf_counter() - start,
        damaged=collector.damaged, frames_lost=collector.frames_lost,
        problems=tuple(collector.problems), not_videos=found.skipped_line(),
    )

"""``annotate run`` as a library call: discover, pull models, stream rows to parts, merge.

The driver never holds more than the tables in flight: each arriving table is appended to its
video's part writer, and a part is committed (renamed into place) only when its video is done.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

import annotator
from annotator.config import ConfigError, RunConfig
from annotator.discover import find_videos
from annotator.orchestrate import WorkItem, stream_in_process, stream_with_ray
from annotator.worker import PART_COLUMN, STATUS_COLUMN
from annotator.writer import OutputLayout, PartWriter, merge_parts, part_key, read_metadata, schema_with_metadata, write_part
from engines.cache import Artifacts, resolve
from engines.factory import lookup, model_id
from engines.registry import ModelEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSummary:
    """What a run did; the CLI prints it."""

    out: Path
    videos: int
    skipped: int
    failed: int
    frames: int
    faces: int
    seconds: float

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def _model_record(role: str, artifacts: Artifacts) -> dict[str, object]:
    entry = artifacts.entry
    return {
        "role": role, "name": entry.name, "id": model_id(artifacts), "source": entry.source.describe(),
        "source_sha256": entry.sha256 or entry.sha256_prefix, "artifact_sha256": artifacts.sha256,
        "licence": entry.licence, "training_data": entry.training_data, "description": entry.description,
        "valence_arousal": "predicted" if entry.has_va else "not predicted by this model: columns are null",
    }


def lookup_models(config: RunConfig) -> tuple[ModelEntry, ModelEntry]:
    """The detector and scorer entries; an unknown name is a configuration error."""
    try:
        return lookup(config.detector, "detector"), lookup(config.scorer, "scorer")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def run_metadata(config: RunConfig) -> dict[str, object]:
    """Models (with digests), package version and options; pulls the models if needed."""
    detector = resolve(lookup_models(config)[0], config.cache_dir)
    scorer = resolve(lookup_models(config)[1], config.cache_dir)
    models = [_model_record("detector", detector), _model_record("scorer", scorer)]
    options = config.options_for_metadata()
    # What makes rows comparable across resumed runs: same weights, same sampling and detection.
    fingerprint = {
        "models": [m["id"] for m in models],
        **{k: options[k] for k in ("sampling", "det_threshold", "det_size", "min_face")},
    }
    return {"package": "video-annotator", "version": annotator.__version__, "models": models,
            "options": options, "fingerprint": fingerprint}


def _check_resumable(layout: OutputLayout, metadata: dict[str, object], config: RunConfig) -> None:
    if config.overwrite:
        if layout.single_file:
            layout.out.unlink(missing_ok=True)
        if layout.parts_dir.exists():
            shutil.rmtree(layout.parts_dir)
        return
    if layout.single_file and layout.out.exists():
        raise ConfigError(f"{layout.out}: already exists (pass --overwrite to replace it)")
    if layout.parts_dir.exists() and not layout.parts_dir.is_dir():
        raise ConfigError(f"{layout.parts_dir}: exists and is not a directory")
    for part in layout.parts()[:1]:
        previous = read_metadata(part).get("fingerprint")
        if previous != metadata["fingerprint"]:
            raise ConfigError(
                f"{layout.parts_dir}: holds results made with other models or options "
                "(pass --overwrite, or choose another --out)"
            )


def _frames_and_faces(table: pa.Table) -> tuple[int, int]:
    face_index = table.column("face_index")
    is_frame = pc.and_(pc.is_valid(table.column("frame_index")),
                       pc.fill_null(pc.equal(face_index, 0), True))
    return pc.sum(is_frame).as_py() or 0, pc.count(face_index).as_py() or 0


def _runs(table: pa.Table) -> Iterator[tuple[str, str, pa.Table]]:
    """Split a streamed table into runs of one (part, status), output columns only.

    Ray Data may concatenate several tables a worker yielded into one block, so one table can
    hold a video's last ``rows`` and its ``done`` rows (or, in principle, several videos).
    """
    keys = table.column(PART_COLUMN).to_numpy(zero_copy_only=False)
    statuses = table.column(STATUS_COLUMN).to_numpy(zero_copy_only=False)
    change = np.flatnonzero((keys[1:] != keys[:-1]) | (statuses[1:] != statuses[:-1])) + 1
    bounds = [0, *change.tolist(), table.num_rows]
    rows = table.drop_columns([PART_COLUMN, STATUS_COLUMN])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        yield str(keys[lo]), str(statuses[lo]), rows.slice(lo, hi - lo)


def run(config: RunConfig, progress: bool = True) -> RunSummary:
    """Annotate every video of ``config.inputs`` into ``config.out``.

    Raises:
        ConfigError: bad paths or options, or an output that cannot be resumed; raised before
            any video is processed.
        engines.sources.FetchError: a model cannot be fetched.
    """
    start = time.perf_counter()
    lookup_models(config)
    videos = find_videos(config.inputs)
    layout = OutputLayout(config.out)
    metadata = run_metadata(config)
    _check_resumable(layout, metadata, config)
    schema = schema_with_metadata(metadata)
    done = layout.completed_keys()
    items: list[WorkItem] = [(v, part_key(v)) for v in videos if part_key(v) not in done]
    for _, key in items:
        layout.part_path(key, failed=True).unlink(missing_ok=True)  # failed before: retry
    workers = config.resolved_workers()
    stream = stream_in_process(config, items) if workers == 0 else stream_with_ray(config, items, min(workers, len(items)))
    frames = faces = failed = 0
    writers: dict[str, PartWriter] = {}
    bar = tqdm(total=len(videos), initial=len(videos) - len(items), unit="video", disable=not progress,
               desc="annotate", dynamic_ncols=True)
    try:
        for table in (stream if items else ()):
            for key, status, rows in _runs(table):
                if status == "failed":
                    if key in writers:
                        writers.pop(key).abort()
                    write_part(layout.part_path(key, failed=True), schema, rows.to_batches()[0])
                    failed += 1
                    bar.update(1)
                    continue
                writer = writers.get(key) or writers.setdefault(key, PartWriter(layout.part_path(key), schema))
                writer.write(rows)
                n_frames, n_faces = _frames_and_faces(rows)
                frames, faces = frames + n_frames, faces + n_faces
                if status == "done":
                    writers.pop(key).commit()
                    bar.update(1)
            bar.set_postfix(fps=f"{frames / (time.perf_counter() - start):.1f}", faces=faces, failed=failed, refresh=False)
    finally:
        for writer in writers.values():
            writer.abort()
        bar.close()
    if layout.single_file:
        by_key = {p.name: p for p in layout.parts()}
        ordered = [by_key[n] for v in videos for n in (f"part-{part_key(v)}.parquet", f"part-{part_key(v)}.error.parquet") if n in by_key]
        merge_parts(ordered, layout.out, schema)
        shutil.rmtree(layout.parts_dir)
    return RunSummary(config.out, len(videos), len(videos) - len(items), failed, frames, faces,
                      time.perf_counter() - start)

"""``annotate run`` as a library call: discover, pull models, stream rows to parts, merge.

The driver never holds more than the tables in flight: each arriving table is appended to its
video's part writer, and a part is committed (renamed into place) only when its video is done.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import annotator
from annotator.collect import PartCollector
from annotator.config import ConfigError, RunConfig
from annotator.discover import find_videos
from annotator.orchestrate import WorkItem, stream_in_process, stream_with_ray
from annotator.writer import (
    OutputLayout,
    merge_parts,
    part_key,
    read_metadata,
    schema_with_metadata,
)
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
    stream = stream_in_process(config, items) if config.workers == 0 else stream_with_ray(config, items)
    collector = PartCollector(layout, schema)
    bar = tqdm(total=len(videos), initial=len(videos) - len(items), unit="video", disable=not progress,
               desc="annotate", dynamic_ncols=True)
    try:
        for table in (stream if items else ()):
            bar.update(collector.add(table))
            rate = collector.frames / (time.perf_counter() - start)
            bar.set_postfix(fps=f"{rate:.1f}", faces=collector.faces, failed=collector.failed, refresh=False)
    finally:
        collector.close()
        bar.close()
    if layout.single_file:
        by_key = {p.name: p for p in layout.parts()}
        ordered = [by_key[n] for v in videos for n in (f"part-{part_key(v)}.parquet", f"part-{part_key(v)}.error.parquet") if n in by_key]
        merge_parts(ordered, layout.out, schema)
        shutil.rmtree(layout.parts_dir)
    return RunSummary(config.out, len(videos), len(videos) - len(items), collector.failed, collector.frames,
                      collector.faces, time.perf_counter() - start)

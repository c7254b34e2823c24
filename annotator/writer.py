"""Parquet output: one part file per video, written atomically, merged into one file on request.

Layout for ``--out results.parquet``: parts go to ``results.parquet.parts/`` while the run goes
on, and are merged into ``results.parquet`` (write, then rename) at the end. For ``--out DIR``
the parts are the result: ``DIR/part-<key>.parquet``, readable as one dataset by pyarrow. A
part exists only once its video is complete and its bytes are on disk (fsync, then rename), so a
re-run skips it; a video that failed leaves a ``.error.parquet`` part (one row saying why),
which a re-run retries. Which files of the directory are ours is :mod:`annotator.ownership`'s
business.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from annotator.ownership import fsync_directory
from annotator.schema import SCHEMA
from annotator.wording import utf8_text

log = logging.getLogger(__name__)

#: Rows buffered per part before a row group is written: ~10 MB of this schema, large enough
#: for efficient scans, small enough that many videos in flight stay cheap on the driver.
ROW_GROUP_ROWS = 65_536
_COMPRESSION = "zstd"
METADATA_KEY = b"annotator"
#: Per-video facts (size, rotation applied, damage) in a part's footer; see worker.video_facts.
VIDEO_KEY = b"annotator.video"
#: A merged file's footer key for its inventory (:data:`INVENTORY`): a key of its own, not in the
#: run's metadata, because that one is also stored in Arrow's schema (base64) and so twice: for
#: 100,000 videos the footer would hold about 40 MB, decoded on every read of the file.
PARTS_KEY = b"annotator.parts"
#: Part footers read at once when a re-run checks what is done (:meth:`OutputLayout.scan`).
#: Measured on 20,000 parts (2 cores, local disk): 7.8-8.7 → 5.0-5.6 s with a cold page cache,
#: 4.9 → 3.9 s warm (one read of each footer, not two, is part of that); 8 and 16 threads were
#: slower warm, the footers' parsing holding the GIL.
SCAN_THREADS = 4
_SCAN_WINDOW = 256
#: The video fact naming the int8 detector copy that a part's keyframes took (its sha256).
KEYFRAMES_INT8_FACT = "keyframes_int8_sha256"


def key_of_part(part: Path) -> tuple[str, bool]:
    """(the key, whether its video failed) of a part file ``part-<key>[.error].parquet``."""
    failed = part.name.endswith(".error.parquet")
    return part.name[len("part-"):-len(".error.parquet" if failed else ".parquet")], failed


def part_key(video: Path) -> str:
    """A stable file-name key for one input video (its real absolute path, hashed).

    ``os.path.realpath`` rather than ``Path.resolve``: it never raises, so a symlink loop among
    the inputs becomes that video's error row, not a crash of the run.
    """
    return hashlib.sha1(os.fsencode(os.path.realpath(video))).hexdigest()[:16]


def video_stamp(video: Path) -> tuple[int, int] | None:
    """(size, modification time in ns) of a video file, as its part records them: a re-run that
    finds other values annotates the video again, as ``make`` and ``rsync`` decide what changed.
    Why: a video replaced, re-encoded or still being copied when it was first annotated would
    otherwise keep its old rows for ever. None: the file cannot be read (its error row says why)."""
    try:
        stat = os.stat(video)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


#: In a segment plan and in the facts of a part stitched from segments: the video's timestamps
#: were checked to go on (engines.decoders.segments.check_timestamps_go_on) before it was cut.
#: Plans and parts from before the check are checked when found (annotator.segmenting): a
#: recording joined from pieces, its clock starting again, lost the frames of a piece in
#: segments, without an error.
TIMESTAMPS_CHECKED = "timestamps_checked"


@dataclass
class ExistingParts:
    """What an output already holds, checked part by part."""

    done: set[str] = field(default_factory=set)  # keys of videos annotated (damaged ones too)
    damaged: dict[str, dict] = field(default_factory=dict)  # key -> facts of a done video that was damaged
    fingerprints: set[str] = field(default_factory=set)
    unreadable: list[Path] = field(default_factory=list)  # removed: their videos are redone
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> its video's stamp when annotated
    # keys of done videos stitched from segments before their timestamps were checked
    split_unchecked: set[str] = field(default_factory=set)


class OutputLayout:
    """Where parts and the final result live for one ``--out``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.single_file = out.suffix == ".parquet"
        self.parts_dir = out.with_name(out.name + ".parts") if self.single_file else out

    def part_path(self, key: str, failed: bool = False) -> Path:
        return self.parts_dir / f"part-{key}{'.error' if failed else ''}.parquet"

    def segment_path(self, key: str, index: int) -> Path:
        """A finished segment of a video still being annotated (hidden from dataset readers)."""
        return self.parts_dir / f".part-{key}.seg{index:04d}.parquet"

    def plan_path(self, key: str) -> Path:
        """The segments a video was cut into, kept until the video is stitched (resume per segment)."""
        return self.parts_dir / f".part-{key}.plan.json"

    def segment_done(self, key: str, index: int) -> bool:
        """A segment part that exists and reads back; an unreadable one is removed (and redone)."""
        path = self.segment_path(key, index)
        if not path.is_file():
            return False
        try:
            _verified_metadata(path)
            return True
        except (OSError, ValueError, pa.ArrowException) as exc:
            log.warning("%s: unreadable segment part (%s), its segment is annotated again", path, exc)
            path.unlink(missing_ok=True)
            return False

    def completed_keys(self) -> set[str]:
        """Keys of videos already annotated successfully (failed ones are retried)."""
        return self.scan().done

    def scan(self) -> ExistingParts:
        """Check every committed part: a part that cannot be read is removed, never counted done.

        Reads only footers (a few KB each) and checks that every column chunk they point at lies
        inside the file, which catches a truncated or foreign-written file without reading data.
        The footers are read :data:`SCAN_THREADS` at a time: a re-run reads one per finished
        video before it starts, and on a cluster's shared filesystem each is a round trip.
        """
        found = ExistingParts()
        paths = self.parts()
        with ThreadPoolExecutor(max_workers=min(SCAN_THREADS, max(len(paths), 1))) as pool:
            # A window at a time: the pool's map makes every task at once, and 100,000 pending
            # footers would hold hundreds of MB.
            for start in range(0, len(paths), _SCAN_WINDOW):
                window = paths[start:start + _SCAN_WINDOW]
                for path, meta in zip(window, pool.map(_footer_or_error, window)):
                    self._take_part(found, path, meta)
        return found

    @staticmethod
    def _take_part(found: ExistingParts, path: Path, meta: dict | Exception) -> None:
        """Count one part in ``found`` from its footer's metadata, or remove it (unreadable)."""
        if isinstance(meta, Exception):
            log.warning("%s: unreadable part (%s), its video is annotated again", path, meta)
            path.unlink(missing_ok=True)
            found.unreadable.append(path)
            return
        found.fingerprints.add(json.dumps(meta.get("fingerprint"), sort_keys=True))
        key, failed = key_of_part(path)
        if failed:
            return
        found.done.add(key)
        if (facts := meta.get("video") or {}).get("damage"):
            found.damaged[key] = facts
        if (stamp := recorded_stamp(facts)) is not None:  # parts from before stamps have none
            found.stamps[key] = stamp
        if facts.get("segments", 1) > 1 and not facts.get(TIMESTAMPS_CHECKED):
            found.split_unchecked.add(key)

    def parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.parquet")) if self.parts_dir.is_dir() else []


def changed_since(recorded: tuple[int, int] | None, now: tuple[int, int] | None) -> bool:
    """Whether a video's file changed since ``recorded`` (its :func:`video_stamp` then; None for
    results written before stamps), ``now`` being its stamp today. Either unknown counts as
    unchanged: a file that cannot be read for a moment must not cost its results."""
    return recorded is not None and now is not None and tuple(recorded) != tuple(now)


def recorded_stamp(facts: dict) -> tuple[int, int] | None:
    """The :func:`video_stamp` a part's video facts record (None: a part written before stamps)."""
    size, mtime_ns = facts.get("file_size"), facts.get("file_mtime_ns")
    return (size, mtime_ns) if size is not None and mtime_ns is not None else None


def schema_with_metadata(metadata: dict[str, object]) -> pa.Schema:
    return SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def read_metadata(path: Path) -> dict[str, object]:
    """The run metadata (models, hashes, version, options) stored in a result file; a part
    also carries its video's facts under ``"video"``."""
    return _annotator_metadata(pq.read_metadata(path))


def _annotator_metadata(footer: pq.FileMetaData) -> dict[str, object]:
    raw = footer.metadata or {}  # the footer's key-value pairs, not only the schema's
    meta = json.loads(raw[METADATA_KEY])
    if VIDEO_KEY in raw:
        meta["video"] = json.loads(raw[VIDEO_KEY])
    if PARTS_KEY in raw:  # else a file merged before it had a key of its own: in the run's metadata
        meta[INVENTORY] = json.loads(raw[PARTS_KEY])
    return meta


def _footer_or_error(path: Path) -> dict[str, object] | Exception:
    """:func:`_verified_metadata`, or the reason the part cannot be read."""
    try:
        return _verified_metadata(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        return exc


def _verified_metadata(path: Path) -> dict[str, object]:
    """:func:`read_metadata`, from the footer read once, after checking that every column chunk
    it points at lies inside the file (a truncated or foreign-written file fails here)."""
    file_meta = pq.read_metadata(path)
    size = path.stat().st_size
    for group in range(file_meta.num_row_groups):
        row_group = file_meta.row_group(group)
        for column in range(row_group.num_columns):
            chunk = row_group.column(column)
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            if start is None or start < 4 or start + chunk.total_compressed_size > size:
                raise ValueError(f"row group {group} points past the end of the file")
    try:
        return _annotator_metadata(file_meta)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"no annotator metadata ({exc})") from None


def _sync_and_rename(fh: BinaryIO, tmp: Path, final: Path) -> None:
    """Flush ``fh`` to disk, then rename: after a crash the final name holds all bytes or none."""
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
    os.replace(tmp, final)
    fsync_directory(final.parent)


class PartWriter:
    """Streams one video's record batches into a temporary file; :meth:`commit` renames it."""

    def __init__(self, final_path: Path, schema: pa.Schema) -> None:
        self.final_path = final_path
        self.tmp_path = final_path.with_name(f".{final_path.name}.tmp")
        final_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp_path, "wb")
        try:
            self._writer = pq.ParquetWriter(self._file, schema, compression=_COMPRESSION)
        except BaseException:
            self._file.close()
            self.tmp_path.unlink(missing_ok=True)
            raise
        self._schema = schema
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        batches = batch.to_batches() if isinstance(batch, pa.Table) else [batch]
        for b in batches:
            self._buffer.append(b)
            self._buffered += b.num_rows
        if self._buffered >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            table = pa.Table.from_batches(self._buffer, schema=SCHEMA).replace_schema_metadata(self._schema.metadata)
            self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            self._buffer, self._buffered = [], 0

    def commit(self, video: str | None = None) -> Path:
        """Finish the file (with the video's facts, JSON, in its footer) and rename it into place."""
        self._flush()
        if video is not None:
            self._writer.add_key_value_metadata({VIDEO_KEY: video.encode()})
        self._writer.close()
        _sync_and_rename(self._file, self.tmp_path, self.final_path)
        return self.final_path

    def abort(self) -> None:
        """Drop the temporary file; never raises for a disk that is already failing."""
        try:
            self._writer.close()
        except (OSError, pa.ArrowException):
            pass
        try:
            self._file.close()  # flushes what is buffered: on a full disk, that fails too
        except OSError:
            pass
        self.tmp_path.unlink(missing_ok=True)


def write_part(path: Path, schema: pa.Schema, batch: pa.RecordBatch) -> Path:
    """Write a one-batch part atomically (used for error rows)."""
    writer = PartWriter(path, schema)
    try:
        writer.write(batch)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


#: The merged file's metadata key listing every part it took in (:func:`part_entry`), so that a
#: re-run into the same ``--out x.parquet`` knows which videos it holds, done or failed, and
#: whether their files are still the ones annotated (:class:`MergedResult`).
INVENTORY = "parts"


def part_entry(part: Path) -> dict[str, object]:
    """What a merged file records of one part: its key, the ``video_path`` its rows carry, whether
    the video failed (and why), and the video file's size and modification time when annotated
    (None for a failed video, or a part written before stamps)."""
    key, failed = key_of_part(part)
    facts = read_metadata(part).get("video") or {}
    first = pq.ParquetFile(part).read_row_group(0, columns=["video_path", "error"])
    stamp = recorded_stamp(facts)
    return {"key": key, "video_path": first["video_path"][0].as_py(), "status": "failed" if failed else "done",
            "error": first["error"][0].as_py() if failed else None,
            "file_size": stamp[0] if stamp else None, "file_mtime_ns": stamp[1] if stamp else None}


def _notable(facts: dict | None, int8_copy: str | None = None) -> bool:
    """Video facts worth listing in a merged file: turned or mirrored, stretched to square pixels,
    shown as SDR (an HDR source), damaged, with frames that change size (whose rows' pixels are
    then not all of one size), with video streams left out, or annotated with another int8 copy
    of the detector for keyframes than ``int8_copy``, the one the run's metadata records (another
    machine's), or with none where one was asked for (a worker that could not make it)."""
    other_copy = bool(facts) and KEYFRAMES_INT8_FACT in facts and facts[KEYFRAMES_INT8_FACT] != int8_copy
    return bool(facts) and bool(facts.get("rotation_cw_deg") or facts.get("mirrored")
                                or facts.get("sample_aspect", 1.0) != 1.0 or facts.get("damage")
                                or facts.get("tone_mapped") or facts.get("size_changes")
                                or facts.get("other_video_streams") or other_copy)


def _int8_copy(run: dict) -> str | None:
    """The sha256 of the int8 keyframe detector the run's metadata records (annotator.run)."""
    return next((m["keyframes_int8"]["sha256"] for m in run.get("models", ()) if "keyframes_int8" in m), None)


@dataclass
class MergedResult:
    """An ``--out x.parquet`` an earlier run merged, which a re-run adds to: its videos count as
    done (unless their files changed), and the merge keeps their rows, less those of the videos
    this run annotates again (changed, failed before), which come from their new parts."""

    path: Path
    metadata: dict[str, object]
    entries: dict[str, dict[str, object]]  # key -> part_entry

    @classmethod
    def read(cls, path: Path) -> MergedResult | None:
        """The result at ``path``; None where it records no inventory (written by an older version).

        Raises:
            ValueError, OSError, pyarrow.ArrowException: not a result annotate wrote, or unreadable.
        """
        metadata = _verified_metadata(path)
        inventory = metadata.get(INVENTORY)
        if not isinstance(inventory, list):
            return None
        return cls(path, metadata, {entry["key"]: entry for entry in inventory})

    def existing(self) -> ExistingParts:
        """What this result holds, as :meth:`OutputLayout.scan` tells it of parts."""
        held = ExistingParts(fingerprints={json.dumps(self.metadata.get("fingerprint"), sort_keys=True)})
        damage = {utf8_text(str(facts.get("video_path"))): facts
                  for facts in self.metadata.get("videos") or () if facts.get("damage")}
        for key, entry in self.entries.items():
            if entry["status"] != "done":
                continue
            held.done.add(key)
            if (facts := damage.get(entry["video_path"])) is not None:
                held.damaged[key] = facts
            if (stamp := recorded_stamp(entry)) is not None:
                held.stamps[key] = stamp
        return held

    def unchanged_by(self, parts: list[Path]) -> bool:
        """Whether merging ``parts`` would change nothing: each is a failure this result already
        records, in the same words (an entry that is no video is refused at every run)."""
        for entry in map(part_entry, parts):
            held = self.entries.get(str(entry["key"]))
            if entry["status"] != "failed" or held is None or held != entry:
                return False
        return True


class _RowGroups:
    """Tables gathered into row groups of :data:`ROW_GROUP_ROWS` rows for a merged file.

    A part holds one short video's rows in one small row group; copied group for group, a merged
    file of 2,000 four-frame videos had 2,000 row groups, a 7.3 MB footer (each group describes
    each of its columns) for 8,000 rows, and took 1.7 s to read. Memory stays bounded by one
    row group (about 10 MB)."""

    def __init__(self, writer: pq.ParquetWriter, schema: pa.Schema) -> None:
        self.writer, self.schema = writer, schema
        self.tables: list[pa.Table] = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.tables.append(table)
            self.rows += table.num_rows
        while self.rows >= ROW_GROUP_ROWS:  # whole groups out, the rest kept (slices: no copy)
            gathered = pa.concat_tables(self.tables)
            self._write(gathered.slice(0, ROW_GROUP_ROWS))
            self.tables, self.rows = [gathered.slice(ROW_GROUP_ROWS)], self.rows - ROW_GROUP_ROWS

    def flush(self) -> None:
        """Write what is gathered (the file's last, shorter row group)."""
        if self.rows:
            self._write(pa.concat_tables(self.tables))
        self.tables, self.rows = [], 0

    def _write(self, table: pa.Table) -> None:
        self.writer.write_table(table.replace_schema_metadata(self.schema.metadata), row_group_size=ROW_GROUP_ROWS)


def merge_parts(parts: list[Path], out: Path, schema: pa.Schema, base: MergedResult | None = None) -> int:
    """Concatenate part files (in the given order) into one Parquet file, atomically.

    Streams row group by row group, so memory stays flat however large the result; the parts'
    rows are gathered into row groups of :data:`ROW_GROUP_ROWS`. The facts
    of videos that were turned or mirrored, stretched to square pixels, shown as SDR (HDR
    sources) or damaged are gathered into the file's metadata, and every part is listed in its
    inventory (:data:`INVENTORY`).

    ``base``: an earlier result at ``out`` to add to. Its rows come first, less those of the
    videos that ``parts`` annotate again; so a video's rows stay together and in frame order,
    while videos added by a later run follow the earlier ones.

    Returns:
        The number of rows written.
    """
    entries = [part_entry(p) for p in parts]
    redone = {str(e["key"]) for e in entries}
    kept = [e for key, e in (base.entries.items() if base else ()) if key not in redone]
    dropped = {str(base.entries[key]["video_path"]) for key in redone if base and key in base.entries}
    earlier = [v for v in ((base.metadata.get("videos") or []) if base else [])
               if utf8_text(str(v.get("video_path"))) not in dropped]
    run = json.loads(schema.metadata[METADATA_KEY])
    int8_copy = _int8_copy(run)
    notable = [*earlier, *(v for v in (read_metadata(p).get("video") for p in parts) if _notable(v, int8_copy))]
    schema = schema_with_metadata({**run, "videos": notable})
    drop = pa.array(sorted(dropped), pa.string())  # the base's rows of videos annotated again
    tmp = out.with_name(f".{out.name}.tmp")
    rows = 0
    with open(tmp, "wb") as fh:
        try:
            with pq.ParquetWriter(fh, schema, compression=_COMPRESSION) as writer:
                pending = _RowGroups(writer, schema)
                for source_path in ([base.path] if base else []) + parts:
                    source = pq.ParquetFile(source_path)
                    for group in range(source.num_row_groups):
                        table = source.read_row_group(group).cast(SCHEMA)
                        if base is not None and source_path is base.path and len(drop):
                            table = table.filter(pc.invert(pc.is_in(table["video_path"], value_set=drop)))
                        pending.add(table)
                        rows += table.num_rows
                pending.flush()
                writer.add_key_value_metadata({PARTS_KEY: json.dumps([*kept, *entries], sort_keys=True).encode()})
            _sync_and_rename(fh, tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return rows

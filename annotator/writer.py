"""Parquet output: one part file per video, written atomically, merged into one file on request.

Layout for ``--out results.parquet``: parts go to ``results.parquet.parts/`` while the run goes
on, and are merged into ``results.parquet`` (write, then rename) at the end. For ``--out DIR``
the parts are the result: ``DIR/part-<key>.parquet``, readable as one dataset by pyarrow. A
part exists only once its video is complete, so a re-run skips it; a video that failed leaves
a ``.error.parquet`` part (one row saying why), which a re-run retries.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from annotator.schema import SCHEMA

#: Rows buffered per part before a row group is written: ~10 MB of this schema, large enough
#: for efficient scans, small enough that many videos in flight stay cheap on the driver.
ROW_GROUP_ROWS = 65_536
_COMPRESSION = "zstd"
METADATA_KEY = b"annotator"


def part_key(video: Path) -> str:
    """A stable file-name key for one input video (its absolute path, hashed)."""
    return hashlib.sha1(str(video.resolve()).encode()).hexdigest()[:16]


class OutputLayout:
    """Where parts and the final result live for one ``--out``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.single_file = out.suffix == ".parquet"
        self.parts_dir = out.with_name(out.name + ".parts") if self.single_file else out

    def part_path(self, key: str, failed: bool = False) -> Path:
        return self.parts_dir / f"part-{key}{'.error' if failed else ''}.parquet"

    def completed_keys(self) -> set[str]:
        """Keys of videos already annotated successfully (failed ones are retried)."""
        if not self.parts_dir.is_dir():
            return set()
        return {
            p.name[len("part-"):-len(".parquet")]
            for p in self.parts_dir.glob("part-*.parquet")
            if not p.name.endswith(".error.parquet")
        }

    def parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.parquet")) if self.parts_dir.is_dir() else []


def schema_with_metadata(metadata: dict[str, object]) -> pa.Schema:
    return SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def read_metadata(path: Path) -> dict[str, object]:
    """The run metadata (models, hashes, version, options) stored in a result file."""
    raw = pq.read_schema(path).metadata or {}
    return json.loads(raw[METADATA_KEY])


class PartWriter:
    """Streams one video's record batches into a temporary file; :meth:`commit` renames it."""

    def __init__(self, final_path: Path, schema: pa.Schema) -> None:
        self.final_path = final_path
        self.tmp_path = final_path.with_name(f".{final_path.name}.tmp")
        final_path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.tmp_path, schema, compression=_COMPRESSION)
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

    def commit(self) -> Path:
        self._flush()
        self._writer.close()
        os.replace(self.tmp_path, self.final_path)
        return self.final_path

    def abort(self) -> None:
        self._writer.close()
        self.tmp_path.unlink(missing_ok=True)


def write_part(path: Path, schema: pa.Schema, batch: pa.RecordBatch) -> Path:
    """Write a one-batch part atomically (used for error rows)."""
    writer = PartWriter(path, schema)
    writer.write(batch)
    return writer.commit()


def merge_parts(parts: list[Path], out: Path, schema: pa.Schema) -> int:
    """Concatenate part files (in the given order) into one Parquet file, atomically.

    Streams row group by row group, so memory stays flat however large the result.

    Returns:
        The number of rows written.
    """
    tmp = out.with_name(f".{out.name}.tmp")
    rows = 0
    with pq.ParquetWriter(tmp, schema, compression=_COMPRESSION) as writer:
        for part in parts:
            source = pq.ParquetFile(part)
            for group in range(source.num_row_groups):
                table = source.read_row_group(group).cast(SCHEMA).replace_schema_metadata(schema.metadata)
                writer.write_table(table)
                rows += table.num_rows
    os.replace(tmp, out)
    return rows

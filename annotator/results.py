"""Reading a finished result back: one ``.parquet`` file or a ``--out DIR`` of parts, checked.

``annotate report`` and ``annotate overlay`` both start here, so a path that is missing, is not
Parquet, or was not written by ``annotate run`` fails the same way: one line naming the file
and the reason. Nothing here reads rows; callers scan the dataset with the columns they need.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from annotator.schema import SCHEMA
from annotator.writer import METADATA_KEY, OutputLayout


class ResultsError(ValueError):
    """A results path that cannot be read as an annotate result; the message names it."""


@dataclass(frozen=True)
class Results:
    """A result on disk: its Parquet files and the run metadata they carry."""

    path: Path
    files: tuple[Path, ...]
    metadata: dict[str, object]

    def dataset(self, files: Iterable[str | Path] | None = None) -> ds.Dataset:
        """All rows as one dataset, read lazily (older parts are cast to the current schema);
        ``files``: only these of the result's files (where a caller knows which hold its rows)."""
        paths = [str(f) for f in self.files] if files is None else sorted(map(str, files))
        return ds.dataset(paths, schema=SCHEMA, format="parquet")

    @property
    def num_rows(self) -> int:
        return sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)

    def model(self, role: str) -> dict[str, object]:
        """The metadata record of the detector or scorer (empty if the run did not record it)."""
        return next((m for m in self.metadata.get("models", []) if m.get("role") == role), {})


def open_results(path: Path) -> Results:
    """Check ``path`` and read its run metadata (from the footer; a part's own video facts aside).

    Raises:
        ResultsError: missing, not Parquet, no parts, not written by annotate, or lacking columns.
    """
    if not path.exists():
        raise ResultsError(f"{path}: no such file or directory")
    if path.is_dir():
        files = tuple(OutputLayout(path).parts())
        if not files:
            raise ResultsError(f"{path}: holds no part-*.parquet files (not an annotate result directory)")
    else:
        files = (path,)
    try:
        footer = pq.read_metadata(files[0])
        schema = pq.read_schema(files[0])
    except (OSError, pa.ArrowException) as exc:
        raise ResultsError(f"{files[0]}: not a readable Parquet file ({exc})") from None
    raw = (footer.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ResultsError(f"{files[0]}: not written by annotate run (no '{METADATA_KEY.decode()}' metadata)")
    try:
        metadata = json.loads(raw)
    except ValueError as exc:
        raise ResultsError(f"{files[0]}: its annotate metadata is not JSON ({exc})") from None
    missing = [name for name in SCHEMA.names if name not in schema.names]
    if missing:
        raise ResultsError(f"{files[0]}: not an annotate result (missing columns: {', '.join(missing)})")
    return Results(path, files, metadata)

"""Everything the report plots, reduced from the rows by pyarrow, one record batch at a time.

A result can hold hundreds of millions of rows, so no column is ever turned into Python
objects and no more than one batch (a row group, ~65 k rows) is held at once: counts, sums and
histograms are added up batch by batch, and per-video and per-track figures come from
``group_by`` on each batch, re-grouped over the small partial tables at the end. Only the few
videos that get a timeline are read again, and even those are binned in time by Arrow before
anything reaches matplotlib.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from annotator.results import Results
from annotator.schema import PROB_COLUMNS
from engines.registry import EXPRESSIONS

#: Valence/arousal density grid: 40 x 40 cells over [-1, 1]^2 (0.05 wide, finer than any model's error).
VA_BINS = 40
#: Detector-score histogram: 50 bins from the run's threshold (nothing below it is kept) to 1.
SCORE_BINS = 50
#: Faces per frame above this are counted in one last "N+" bar.
MAX_FACES_SHOWN = 10
#: Points per track in a timeline: enough for a smooth curve at page width, few enough to stay small.
TIMELINE_POINTS = 600

_SCAN_COLUMNS = ["video_path", "frame_index", "pts_s", "face_index", "track_id", "det_score", "expression",
                 *PROB_COLUMNS, "valence", "arousal", "error"]


@dataclass
class VideoStats:
    """One video's line in the report."""

    path: str
    frames: int = 0  # sampled frames with rows
    frames_with_face: int = 0
    faces: int = 0
    tracks: int = 0
    first_s: float | None = None
    last_s: float | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Failed outright: an error row and not a single frame (a damaged video has frames)."""
        return bool(self.errors) and self.frames == 0

    @property
    def damaged(self) -> bool:
        return bool(self.errors) and self.frames > 0

    @property
    def length_s(self) -> float:
        if self.first_s is None or self.last_s is None:
            return 0.0
        return self.last_s - self.first_s

    @property
    def coverage(self) -> float:
        return self.frames_with_face / self.frames if self.frames else 0.0


@dataclass
class Corpus:
    """The whole result, reduced: what the corpus charts and the run section show."""

    rows: int = 0
    frames: int = 0
    faces: int = 0
    videos: list[VideoStats] = field(default_factory=list)  # longest first
    expression_counts: np.ndarray = field(default_factory=lambda: np.zeros(len(EXPRESSIONS), np.int64))
    probability_sums: np.ndarray = field(default_factory=lambda: np.zeros(len(EXPRESSIONS), np.float64))
    faces_per_frame: np.ndarray = field(default_factory=lambda: np.zeros(MAX_FACES_SHOWN + 1, np.int64))
    score_edges: np.ndarray = field(default_factory=lambda: np.linspace(0, 1, SCORE_BINS + 1))
    score_counts: np.ndarray = field(default_factory=lambda: np.zeros(SCORE_BINS, np.int64))
    va_edges: np.ndarray = field(default_factory=lambda: np.linspace(-1, 1, VA_BINS + 1))
    va_counts: np.ndarray = field(default_factory=lambda: np.zeros((VA_BINS, VA_BINS), np.int64))
    va_faces: int = 0  # faces with valence and arousal
    track_faces: pa.Table | None = None  # video_path, track_id, faces
    # The files each video's rows are in (one part in a directory of parts), so that a
    # timeline reads those, not every file of a result of 100,000 parts.
    files_of: dict[str, set[str]] = field(default_factory=dict)

    @property
    def mean_probabilities(self) -> np.ndarray:
        return self.probability_sums / self.faces if self.faces else self.probability_sums

    @property
    def failed(self) -> list[VideoStats]:
        return [v for v in self.videos if v.failed]

    @property
    def damaged(self) -> list[VideoStats]:
        return [v for v in self.videos if v.damaged]

    def top_tracks(self, video: str, limit: int) -> tuple[list[int], int]:
        """The ``limit`` tracks of ``video`` with the most faces, and how many tracks it has."""
        if self.track_faces is None:
            return [], 0
        mine = self.track_faces.filter(pc.equal(self.track_faces["video_path"], video))
        ranked = mine.sort_by([("faces", "descending"), ("track_id", "ascending")])
        return ranked["track_id"].slice(0, limit).to_pylist(), mine.num_rows


def aggregate(results: Results, batch_rows: int = 1 << 18) -> Corpus:
    """Scan every row once and reduce it to a :class:`Corpus`."""
    threshold = float((results.metadata.get("options") or {}).get("det_threshold") or 0.0)
    corpus = Corpus(score_edges=np.linspace(min(threshold, 0.999), 1.0, SCORE_BINS + 1))
    per_video: list[pa.Table] = []
    per_track: list[pa.Table] = []
    errors: list[pa.Table] = []
    scanner = results.dataset().scanner(columns=_SCAN_COLUMNS, batch_size=batch_rows)
    for table in _gathered(scanner.scan_batches(), batch_rows, corpus.files_of):
        corpus.rows += table.num_rows
        per_video.append(_video_partials(table))
        errors.append(table.filter(pc.is_valid(table["error"])).select(["video_path", "error"]))
        faces = table.filter(pc.is_valid(table["face_index"]))
        _add_frames(corpus, table)
        _add_faces(corpus, faces)
        if faces.num_rows:
            per_track.append(
                faces.group_by(["video_path", "track_id"]).aggregate([("face_index", "count")])
                .rename_columns(["video_path", "track_id", "faces"])
            )
    corpus.videos = _videos(per_video, errors)
    if per_track:
        tracks = pa.concat_tables(per_track).group_by(["video_path", "track_id"]).aggregate([("faces", "sum")])
        corpus.track_faces = tracks.rename_columns(["video_path", "track_id", "faces"])
        counts = corpus.track_faces.group_by("video_path").aggregate([("track_id", "count")])
        by_path = dict(zip(counts["video_path"].to_pylist(), counts["track_id_count"].to_pylist()))
        for video in corpus.videos:
            video.tracks = by_path.get(video.path, 0)
    return corpus


def _video_partials(table: pa.Table) -> pa.Table:
    """Per video in this batch: frames, frames with a face, faces, first and last pts."""
    is_frame = pc.is_valid(table["frame_index"])
    face_index = table["face_index"]
    first_face = pc.fill_null(pc.equal(face_index, 0), False)
    # A frame has one row per face, or one row when it has none: count its face-0 or face-less row.
    frame_row = pc.and_(is_frame, pc.or_(pc.is_null(face_index), first_face))
    partial = pa.table({
        "video_path": table["video_path"],
        "frame": pc.cast(frame_row, pa.int64()),
        "with_face": pc.cast(first_face, pa.int64()),
        "face": pc.cast(pc.is_valid(face_index), pa.int64()),
        "pts_s": table["pts_s"],
    })
    return partial.group_by("video_path").aggregate(
        [("frame", "sum"), ("with_face", "sum"), ("face", "sum"), ("pts_s", "min"), ("pts_s", "max")]
    ).rename_columns(["video_path", "frame", "with_face", "face", "pts_s_min", "pts_s_max"])


def _videos(partials: list[pa.Table], errors: list[pa.Table]) -> list[VideoStats]:
    if not partials:
        return []
    total = pa.concat_tables(partials).group_by("video_path").aggregate(
        [("frame", "sum"), ("with_face", "sum"), ("face", "sum"), ("pts_s_min", "min"), ("pts_s_max", "max")]
    )
    columns = {name: total[name].to_pylist() for name in total.column_names}  # one entry per video
    videos = {
        path: VideoStats(path, frames, with_face, faces, first_s=first, last_s=last)
        for path, frames, with_face, faces, first, last in zip(
            columns["video_path"], columns["frame_sum"], columns["with_face_sum"], columns["face_sum"],
            columns["pts_s_min_min"], columns["pts_s_max_max"])
    }
    failed = pa.concat_tables(errors)
    for path, message in zip(failed["video_path"].to_pylist(), failed["error"].to_pylist()):
        videos[path].errors.append(message)
    return sorted(videos.values(), key=lambda v: (-v.length_s, -v.frames, v.path))


def _add_frames(corpus: Corpus, table: pa.Table) -> None:
    """Frames, and how many faces each has: a frame with k faces has rows face_index 0..k-1."""
    face_index = table["face_index"]
    corpus.frames += pc.sum(pc.cast(pc.and_(pc.is_valid(table["frame_index"]),
                                            pc.fill_null(pc.equal(face_index, 0), True)), pa.int64())).as_py() or 0
    no_face = pc.sum(pc.cast(pc.and_(pc.is_valid(table["frame_index"]), pc.is_null(face_index)),
                             pa.int64())).as_py() or 0
    rows_at = np.bincount(face_index.drop_null().to_numpy(), minlength=MAX_FACES_SHOWN + 2)
    with_at_least = np.concatenate([[0], rows_at])  # frames with >= k faces, k = 1, 2, ...
    exactly = with_at_least[1:-1] - with_at_least[2:]
    corpus.faces_per_frame[0] += no_face
    corpus.faces_per_frame[1:MAX_FACES_SHOWN] += exactly[: MAX_FACES_SHOWN - 1]
    corpus.faces_per_frame[MAX_FACES_SHOWN] += with_at_least[MAX_FACES_SHOWN]


def _add_faces(corpus: Corpus, faces: pa.Table) -> None:
    if not faces.num_rows:
        return
    corpus.faces += faces.num_rows
    labels = pc.index_in(faces["expression"], value_set=pa.array(EXPRESSIONS))
    corpus.expression_counts += np.bincount(labels.drop_null().to_numpy(), minlength=len(EXPRESSIONS))
    corpus.probability_sums += [pc.sum(faces[c]).as_py() or 0.0 for c in PROB_COLUMNS]
    scores = faces["det_score"].drop_null().to_numpy()
    corpus.score_counts += np.histogram(np.clip(scores, corpus.score_edges[0], 1.0), corpus.score_edges)[0]
    va = faces.filter(pc.and_(pc.is_valid(faces["valence"]), pc.is_valid(faces["arousal"])))
    if va.num_rows:
        corpus.va_faces += va.num_rows
        valence = np.clip(va["valence"].to_numpy(), -1, 1)
        arousal = np.clip(va["arousal"].to_numpy(), -1, 1)
        corpus.va_counts += np.histogram2d(valence, arousal, [corpus.va_edges, corpus.va_edges])[0].astype(np.int64)


@dataclass
class TrackTimeline:
    """One track's smoothed curves on a common time grid (NaN where the track is absent)."""

    track_id: int
    faces: int
    times_s: np.ndarray  # bin centres
    probabilities: np.ndarray  # (T, 7), Aff-Wild2 order
    valence: np.ndarray | None  # (T,), None when the model predicts no valence/arousal
    arousal: np.ndarray | None


def _gathered(tagged: Iterator[ds.TaggedRecordBatch], rows: int, files_of: dict[str, set[str]]) -> Iterator[pa.Table]:
    """The scan's batches as tables of about ``rows`` rows, noting in ``files_of`` the file each
    video's rows came from. A directory of parts yields one small batch per part (a short
    video's few hundred rows), and reducing each on its own cost 5 ms of Python a part: 11.4 s
    for a report of 2,000 four-frame videos."""
    batches: list[pa.RecordBatch] = []
    held = 0
    for batch, fragment in tagged:
        if batch.num_rows == 0:
            continue
        for video in pc.unique(batch.column("video_path")).to_pylist():
            files_of.setdefault(video, set()).add(fragment.path)
        batches.append(batch)
        held += batch.num_rows
        if held >= rows:
            yield pa.Table.from_batches(batches)
            batches, held = [], 0
    if batches:
        yield pa.Table.from_batches(batches)


def timelines(results: Results, corpus: Corpus, video: VideoStats, max_tracks: int,
              smooth_s: float) -> tuple[list[TrackTimeline], int]:
    """Smoothed expression and valence/arousal curves of the ``max_tracks`` largest tracks of a video.

    Faces are averaged into at most :data:`TIMELINE_POINTS` time bins by Arrow (one video can
    hold millions of rows), then smoothed by a centred moving mean ``smooth_s`` wide that skips
    empty bins. Returns the timelines and the video's total track count.
    """
    track_ids, total = corpus.top_tracks(video.path, max_tracks)
    if not track_ids:
        return [], total
    columns = ["track_id", "pts_s", *PROB_COLUMNS, "valence", "arousal"]
    condition = (ds.field("video_path") == video.path) & ds.field("track_id").isin(track_ids)
    rows = results.dataset(corpus.files_of.get(video.path)).to_table(columns=columns, filter=condition)
    start = video.first_s or 0.0
    # No finer than the sampled frames: a bin per frame at most, so a track has no empty bins.
    width = max(video.length_s / TIMELINE_POINTS, video.length_s / max(video.frames - 1, 1), 1e-6)
    bins = pc.cast(pc.floor(pc.divide(pc.subtract(rows["pts_s"], start), width)), pa.int64())
    binned = rows.append_column("bin", bins).group_by(["track_id", "bin"]).aggregate(
        [(name, "mean") for name in (*PROB_COLUMNS, "valence", "arousal")] + [("pts_s", "count")]
    )
    window = max(1, int(round(smooth_s / width)))
    n_bins = int(video.length_s / width) + 1
    out = []
    for track in track_ids:
        mine = binned.filter(pc.equal(binned["track_id"], track))
        index = np.clip(mine["bin"].to_numpy(), 0, n_bins - 1)

        def grid(name: str) -> np.ndarray:
            return _smoothed(_on_grid(index, mine[f"{name}_mean"], n_bins), window)

        has_va = mine["valence_mean"].null_count < mine.num_rows
        out.append(TrackTimeline(
            track_id=int(track), faces=int(pc.sum(mine["pts_s_count"]).as_py()),
            times_s=start + (np.arange(n_bins) + 0.5) * width,
            probabilities=np.stack([grid(c) for c in PROB_COLUMNS], axis=1),
            valence=grid("valence") if has_va else None, arousal=grid("arousal") if has_va else None,
        ))
    return out, total


def _on_grid(index: np.ndarray, values: pa.ChunkedArray, n_bins: int) -> np.ndarray:
    grid = np.full(n_bins, np.nan)
    grid[index] = values.to_numpy(zero_copy_only=False)  # nulls (no valence) come back as NaN
    return grid


def _smoothed(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving mean over ``window`` bins that ignores empty bins.

    A bin stays empty only when its whole window is: a short gap is bridged, a track's absence
    longer than the window shows as a break in the line. A window wider than the curve (a video
    shorter than ``--smooth``) is the whole curve: numpy's "same" convolution would return the
    kernel's length instead.
    """
    window = min(window, len(values))
    if window <= 1:
        return values
    valid = ~np.isnan(values)
    kernel = np.ones(window)
    total = np.convolve(np.where(valid, values, 0.0), kernel, mode="same")
    count = np.convolve(valid.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        smooth = total / count
    smooth[count == 0] = np.nan
    return smooth

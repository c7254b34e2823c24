"""``annotate report``: a result reduced by pyarrow (aggregate), drawn by matplotlib (charts),
laid out as one self-contained HTML page (page).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from annotator.results import Results, open_results


@dataclass(frozen=True)
class ReportSummary:
    out: Path
    rows: int
    videos: int
    timelines: int


def build_report(results_path: Path, out: Path, *, videos: int = 10, tracks: int = 4,
                 smooth_s: float = 0.5) -> ReportSummary:
    """Write the report of ``results_path`` to ``out`` (a temporary file, then a rename).

    ``videos``: how many of the longest videos get a timeline; ``tracks``: the largest tracks
    drawn per video; ``smooth_s``: the width of the moving mean on the timelines.

    Raises:
        annotator.results.ResultsError: the results cannot be read.
        OSError: ``out`` cannot be written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # never a GUI backend, even where a display exists
    from annotator.report import charts
    from annotator.report.aggregate import aggregate, timelines
    from annotator.report.page import Figures, VideoSection, render

    results: Results = open_results(results_path)
    corpus = aggregate(results)
    has_faces = corpus.faces > 0
    figures = Figures(
        expressions=charts.expressions(corpus) if has_faces else None,
        valence_arousal=charts.valence_arousal(corpus) if corpus.va_faces else None,
        faces_per_frame=charts.faces_per_frame(corpus) if corpus.frames else None,
        coverage=charts.coverage(corpus) if corpus.frames else None,
        detector_scores=charts.detector_scores(corpus) if has_faces else None,
    )
    sections = []
    for video in [v for v in corpus.videos if v.frames][:videos]:
        curves, total = timelines(results, corpus, video, tracks, smooth_s)
        sections.append(VideoSection(video, charts.timeline(video, curves) if curves else None, len(curves), total))
    written = dt.datetime.fromtimestamp(max(f.stat().st_mtime for f in results.files)).astimezone()
    html = render(source=str(results_path), metadata=results.metadata, written=written, corpus=corpus,
                  figures=figures, sections=sections, smooth_s=smooth_s)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ReportSummary(out, corpus.rows, len(corpus.videos), len(sections))

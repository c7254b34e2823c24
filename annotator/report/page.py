"""The report as one self-contained HTML file: inline CSS, figures as data URIs, no script.

No script and no external reference means the page opens from a mail attachment or a shared
drive in any browser, offline, and has nothing that can fail at view time. Every string that
comes from the result (paths, error messages, option values) is escaped.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from html import escape

from annotator.report.aggregate import Corpus, VideoStats

#: Rows of the per-video and failed-video tables; the rest are counted, not listed (a page of
#: 100 000 table rows would be tens of MB and unreadable anyway: filter the Parquet for those).
TABLE_ROWS = 500

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1280px; margin: 0 auto; padding: 0 24px 48px; }
h1 { font-size: 1.6em; margin: 24px 0 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; }
h3 { margin-bottom: 4px; word-break: break-all; }
.sub { color: #666; margin: 0 0 16px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { text-align: left; padding: 3px 10px 3px 0; border-bottom: 1px solid #eee; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 0.9em; word-break: break-all; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 110px; }
.card b { display: block; font-size: 1.4em; } .card.bad b { color: #c62828; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.charts img, .video img { max-width: 100%; height: auto; }
.note { background: #fff8e1; border-left: 4px solid #f9a825; padding: 8px 12px; }
.err { color: #c62828; }
"""


@dataclass(frozen=True)
class VideoSection:
    """One video with a timeline: its stats, the figure (a data URI, or None) and its track count."""

    video: VideoStats
    figure: str | None
    tracks_shown: int
    tracks_total: int


@dataclass(frozen=True)
class Figures:
    expressions: str | None
    valence_arousal: str | None
    faces_per_frame: str | None
    coverage: str | None
    detector_scores: str | None


def render(*, source: str, metadata: dict, written: dt.datetime, corpus: Corpus, figures: Figures,
           sections: list[VideoSection], smooth_s: float) -> str:
    """The whole page."""
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>annotate report: {escape(source)}</title><style>{_CSS}</style></head><body>",
        "<h1>annotate report</h1>",
        f'<p class="sub"><code>{escape(source)}</code> &middot; {corpus.rows:,} rows</p>',
        _counts(corpus),
        _run(metadata, written, corpus),
        _failures(corpus),
        _corpus_views(metadata, corpus, figures),
        _videos(corpus, sections),
        _timelines(sections, smooth_s),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _counts(corpus: Corpus) -> str:
    failed, damaged = len(corpus.failed), len(corpus.damaged)
    done = len(corpus.videos) - failed
    cards = [("videos done", f"{done:,}", False), ("failed", f"{failed:,}", failed > 0),
             ("damaged", f"{damaged:,}", damaged > 0), ("sampled frames", f"{corpus.frames:,}", False),
             ("faces", f"{corpus.faces:,}", False),
             ("frames with a face", _percent(sum(v.frames_with_face for v in corpus.videos), corpus.frames), False)]
    items = "".join(f'<div class="card{" bad" if bad else ""}"><b>{value}</b>{label}</div>'
                    for label, value, bad in cards)
    return f'<div class="cards">{items}</div>'


def _run(metadata: dict, written: dt.datetime, corpus: Corpus) -> str:
    timing = metadata.get("timing") or {}
    seconds = timing.get("seconds")
    speed = (f"{seconds:,.1f} s, {timing.get('frames', corpus.frames) / seconds:,.1f} frames/s" if seconds
             else "not recorded in this result (the run's metadata holds no timing)")
    started = timing.get("started_utc")
    facts = [
        ("package", f"{metadata.get('package', 'video-annotator')} {metadata.get('version', '?')}"),
        ("run", f"started {started}" if started else "start not recorded"),
        ("written", written.strftime("%Y-%m-%d %H:%M:%S %Z").strip() + " (the result file's modification time)"),
        ("how long", speed),
    ]
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in facts)
    models = "".join(
        "<tr>" + "".join(f"<td>{cell}</td>" for cell in (
            escape(str(m.get("role", ""))), f"<code>{escape(str(m.get('id', m.get('name', ''))))}</code>",
            "<br>".join(f"{escape(name)}: <code>{escape(str(digest))}</code>"
                        for name, digest in (m.get("artifact_sha256") or {}).items()),
            f"<code>{escape(str(m.get('source', '')))}</code><br>"
            f"sha256 <code>{escape(str(m.get('source_sha256', '')))}</code>",
            escape(str(m.get("licence", ""))), escape(str(m.get("training_data", ""))),
        )) + "</tr>"
        for m in metadata.get("models", [])
    )
    options = metadata.get("options") or {}
    option_rows = "".join(f"<tr><th>{escape(str(k))}</th><td><code>{escape(json.dumps(v))}</code></td></tr>"
                          for k, v in sorted(options.items()))
    return (
        "<h2>The run</h2>"
        f"<table>{rows}</table>"
        "<h3>Models</h3><table><tr><th>role</th><th>id</th><th>artifact sha256</th><th>source</th>"
        f"<th>licence</th><th>training data</th></tr>{models}</table>"
        f"<details><summary>Options ({len(options)})</summary><table>{option_rows}</table></details>"
    )


def _failures(corpus: Corpus) -> str:
    problems = corpus.failed + corpus.damaged
    if not problems:
        return ""
    rows = "".join(
        f'<tr><td><code>{escape(v.path)}</code></td><td>{"failed" if v.failed else "damaged"}</td>'
        f'<td class="err">{"<br>".join(escape(e) for e in v.errors)}</td></tr>'
        for v in problems[:TABLE_ROWS]
    )
    more = f"<p>… and {len(problems) - TABLE_ROWS:,} more in the <code>error</code> column.</p>" \
        if len(problems) > TABLE_ROWS else ""
    return (f"<h2>Failed and damaged videos ({len(problems):,})</h2>"
            f"<table><tr><th>video</th><th>status</th><th>error</th></tr>{rows}</table>{more}")


def _corpus_views(metadata: dict, corpus: Corpus, figures: Figures) -> str:
    if not corpus.faces:
        return "<h2>The corpus</h2><p>No face was found in any sampled frame: there is nothing to plot.</p>"
    images = [f'<img src="{uri}" alt="{alt}">' for uri, alt in (
        (figures.expressions, "expression distribution"), (figures.valence_arousal, "valence/arousal density"),
        (figures.faces_per_frame, "faces per frame"), (figures.coverage, "coverage per video"),
        (figures.detector_scores, "detector score histogram")) if uri]
    return (f"<h2>The corpus</h2>{_va_note(metadata, corpus)}"
            f'<div class="charts">{"".join(images)}</div>')


def _va_note(metadata: dict, corpus: Corpus) -> str:
    """Say plainly when valence/arousal are missing, and why, instead of drawing an empty chart."""
    if corpus.va_faces:
        return ""
    scorer = next((m for m in metadata.get("models", []) if m.get("role") == "scorer"), {})
    name = escape(str(scorer.get("name", "the scorer")))
    said = scorer.get("valence_arousal")
    why = f" (its record says: {escape(str(said))})" if said else ""
    return (f'<p class="note"><b>Valence and arousal were not predicted</b> by the model used, '
            f"<code>{name}</code>{why}: the <code>valence</code> and <code>arousal</code> columns are null, "
            "so this report shows no valence/arousal density or curves.</p>")


def _videos(corpus: Corpus, sections: list[VideoSection]) -> str:
    linked = {s.video.path: n for n, s in enumerate(sections)}
    rows = []
    for video in corpus.videos[:TABLE_ROWS]:
        name = f"<code>{escape(video.path)}</code>"
        if video.path in linked:
            name = f'<a href="#video-{linked[video.path]}">{name}</a>'
        status = "failed" if video.failed else "damaged" if video.damaged else "ok"
        rows.append(
            f'<tr><td>{name}</td><td class="n">{video.length_s:,.1f}</td><td class="n">{video.frames:,}</td>'
            f'<td class="n">{video.faces:,}</td><td class="n">{video.tracks:,}</td>'
            f'<td class="n">{_percent(video.frames_with_face, video.frames)}</td>'
            f'<td class="{"err" if video.errors else ""}">{status}</td></tr>'
        )
    more = (f"<p>… and {len(corpus.videos) - TABLE_ROWS:,} shorter videos, not listed.</p>"
            if len(corpus.videos) > TABLE_ROWS else "")
    return (f"<h2>Videos ({len(corpus.videos):,}, longest first)</h2>"
            '<table><tr><th>video</th><th class="n">length (s)</th><th class="n">frames</th>'
            '<th class="n">faces</th><th class="n">tracks</th><th class="n">with a face</th><th>status</th></tr>'
            f"{''.join(rows)}</table>{more}")


def _timelines(sections: list[VideoSection], smooth_s: float) -> str:
    if not sections:
        return ""
    blocks = [f"<h2>Timelines of the {len(sections)} longest videos</h2>"
              f"<p>Per track, smoothed over {smooth_s:g} s; the x axis is the presentation time (pts) "
              "of the video.</p>"]
    for n, section in enumerate(sections):
        video = section.video
        shown = (f"the {section.tracks_shown} tracks with the most faces of {section.tracks_total}"
                 if section.tracks_total > section.tracks_shown else f"{section.tracks_total} track(s)")
        body = (f'<img src="{section.figure}" alt="timeline of {escape(video.path)}">' if section.figure
                else "<p>No face in this video.</p>")
        blocks.append(f'<section class="video" id="video-{n}"><h3><code>{escape(video.path)}</code></h3>'
                      f"<p>{video.length_s:,.1f} s, {video.frames:,} sampled frames, {video.faces:,} faces; "
                      f"{shown}.</p>{body}</section>")
    return "".join(blocks)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "–"

"""matplotlib figures of the reduced result, each returned as an SVG data URI for an ``<img>``.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state, no GUI backend), so the
report runs on a headless server and in threads. SVG keeps lines sharp at any zoom; text is
drawn as paths, so the page looks the same without the fonts installed; and an ``<img>`` with a
data URI keeps each figure's internal ids apart from the others'.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from annotator.report.aggregate import MAX_FACES_SHOWN, Corpus, TrackTimeline, VideoStats
from engines.registry import EXPRESSIONS

#: One colour per expression, the same in every chart (matplotlib's tab10, neutral in grey).
EXPRESSION_COLOURS = dict(zip(EXPRESSIONS, ("#7f7f7f", "#d62728", "#8c564b", "#9467bd", "#2ca02c", "#1f77b4",
                                             "#ff7f0e")))
#: Above this many videos, coverage is a histogram over videos instead of one bar per video.
COVERAGE_BARS = 30
_WIDTH = 6.4  # inches: two charts side by side fill a laptop screen at 100 dpi


def to_data_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def expressions(corpus: Corpus) -> str:
    """Share of faces by top expression beside the mean probability: a sharp and a hedging model differ."""
    figure = Figure(figsize=(_WIDTH, 3.2))
    axes = figure.subplots()
    x = np.arange(len(EXPRESSIONS))
    share = corpus.expression_counts / max(corpus.faces, 1)
    colours = [EXPRESSION_COLOURS[e] for e in EXPRESSIONS]
    axes.bar(x - 0.2, share, 0.4, color=colours, label="share of faces (top expression)")
    axes.bar(x + 0.2, corpus.mean_probabilities, 0.4, color=colours, alpha=0.45, hatch="//",
             label="mean probability")
    axes.set_xticks(x, EXPRESSIONS, rotation=20)
    axes.set_ylabel("fraction of faces")
    axes.set_ylim(0, max(1e-3, float(max(share.max(), corpus.mean_probabilities.max()))) * 1.15)
    axes.legend(frameon=False, fontsize="small")
    axes.set_title(f"Expressions over {corpus.faces:,} faces")
    return to_data_uri(figure)


def valence_arousal(corpus: Corpus) -> str:
    """Density of (valence, arousal), log colour scale: the dense centre would hide the rest."""
    figure = Figure(figsize=(4.6, 4.0))
    axes = figure.subplots()
    edges = corpus.va_edges
    counts = np.ma.masked_equal(corpus.va_counts.T, 0)
    image = axes.pcolormesh(edges, edges, counts, norm=LogNorm(vmin=1, vmax=max(2, int(counts.max()))),
                            cmap="viridis")
    figure.colorbar(image, ax=axes, label="faces")
    axes.axhline(0, color="0.6", lw=0.6)
    axes.axvline(0, color="0.6", lw=0.6)
    axes.set(xlim=(-1, 1), ylim=(-1, 1), xlabel="valence", ylabel="arousal", aspect="equal",
             title=f"Valence/arousal over {corpus.va_faces:,} faces")
    return to_data_uri(figure)


def faces_per_frame(corpus: Corpus) -> str:
    figure = Figure(figsize=(_WIDTH, 3.0))
    axes = figure.subplots()
    counts = corpus.faces_per_frame
    labels = [str(k) for k in range(MAX_FACES_SHOWN)] + [f"{MAX_FACES_SHOWN}+"]
    axes.bar(np.arange(len(counts)), counts / max(corpus.frames, 1), color="#1f77b4")
    axes.set_xticks(np.arange(len(counts)), labels)
    axes.set(xlabel="faces in the frame", ylabel="share of sampled frames",
             title=f"Faces per frame over {corpus.frames:,} sampled frames")
    return to_data_uri(figure)


def coverage(corpus: Corpus) -> str:
    """Share of sampled frames with a face: one bar per video, or a histogram for a large corpus."""
    videos = [v for v in corpus.videos if v.frames]
    if len(videos) <= COVERAGE_BARS:
        figure = Figure(figsize=(_WIDTH, 0.8 + 0.28 * max(len(videos), 1)))
        axes = figure.subplots()
        y = np.arange(len(videos))
        axes.barh(y, [v.coverage for v in videos], color="#2ca02c")
        axes.set_yticks(y, [_short(v.path) for v in videos], fontsize="small")
        axes.invert_yaxis()
        axes.set(xlim=(0, 1), xlabel="share of sampled frames with a face", title="Coverage per video")
    else:
        figure = Figure(figsize=(_WIDTH, 3.0))
        axes = figure.subplots()
        axes.hist([v.coverage for v in videos], bins=np.linspace(0, 1, 21), color="#2ca02c")
        axes.set(xlim=(0, 1), xlabel="share of sampled frames with a face", ylabel="videos",
                 title=f"Coverage over {len(videos):,} videos")
    return to_data_uri(figure)


def detector_scores(corpus: Corpus) -> str:
    figure = Figure(figsize=(_WIDTH, 3.0))
    axes = figure.subplots()
    edges = corpus.score_edges
    axes.stairs(corpus.score_counts, edges, fill=True, color="#9467bd")
    filled = corpus.score_counts[corpus.score_counts > 0]
    if len(filled) > 1 and filled.max() > 100 * filled.min():
        axes.set_yscale("log")  # true faces pile up near 1: a linear axis would hide the tail
    axes.set(xlim=(edges[0], edges[-1]), xlabel="detector score", ylabel="faces",
             title="Detector scores (from the run's threshold to 1)")
    return to_data_uri(figure)


def timeline(video: VideoStats, tracks: list[TrackTimeline]) -> str:
    """Per track: the 7 smoothed probabilities, and valence/arousal below them when predicted."""
    with_va = any(t.valence is not None for t in tracks)
    rows = len(tracks) * (2 if with_va else 1)
    heights = [2.2, 1.2] * len(tracks) if with_va else [2.2] * len(tracks)
    figure = Figure(figsize=(2 * _WIDTH * 0.8, sum(heights) + 0.6), layout="constrained")
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False, height_ratios=heights)[:, 0]
    for n, track in enumerate(tracks):
        top = axes[2 * n if with_va else n]
        for k, name in enumerate(EXPRESSIONS):
            top.plot(track.times_s, track.probabilities[:, k], color=EXPRESSION_COLOURS[name], lw=1.2, label=name)
        top.set(ylim=(0, 1), ylabel="probability")
        top.set_title(f"track {track.track_id} ({track.faces:,} faces)", loc="left", fontsize="medium")
        if with_va:
            bottom = axes[2 * n + 1]
            if track.valence is not None:
                bottom.plot(track.times_s, track.valence, color="#17becf", lw=1.2, label="valence")
                bottom.plot(track.times_s, track.arousal, color="#bcbd22", lw=1.2, label="arousal")
            bottom.axhline(0, color="0.7", lw=0.6)
            bottom.set(ylim=(-1, 1), ylabel="V / A")
            if n == 0:
                bottom.legend(loc="upper right", ncols=2, fontsize="small", frameon=False)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)
    axes[-1].set_xlabel("pts (s)")
    figure.suptitle(_short(video.path, 80), fontsize="medium")
    return to_data_uri(figure)


def _short(path: str, limit: int = 40) -> str:
    return path if len(path) <= limit else "…" + path[-(limit - 1):]

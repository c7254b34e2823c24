"""Sampled decoding leaves undecoded the frames that sampling drops and nothing refers to, and
gives exactly what decoding every frame gives: the same frames, indices, times and pixels.

The reference in each test is the same decode with the plan switched off (every frame decoded,
as before :mod:`engines.decoders.skipping`).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from engines.decoders import DecodeReport, Sampling
from engines.decoders import pyav as pyav_decoder
from engines.decoders import skipping
from engines.decoders.segments import Segment, plan_segments
from faults import (carphone_frames, overwrite_packets, start_inside_a_gop, trim_by_edit_list, write_clip,
                    write_interlaced_clip, write_joined_ts)

SAMPLINGS = [Sampling(fps=5.0), Sampling(every_n=3), Sampling(fps=12.0)]
IDS = ["5-fps", "every-3rd", "12-fps"]


@pytest.fixture(scope="module")
def frames(carphone: Path) -> list[np.ndarray]:
    return carphone_frames(carphone)


@pytest.fixture(scope="module")
def clip(frames: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """x264's defaults: B-frames, most of them referred to by no other frame; a keyframe every 60."""
    return write_clip(tmp_path_factory.mktemp("skip") / "clip.mp4", frames, 240, keyint=60)


class Plans:
    """Records the plans the decoder makes; ``off()`` makes it decode every frame instead."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made: list[skipping.SkipPlan | None] = []
        self.monkeypatch = monkeypatch
        make = skipping.SkipPlan.for_decode.__func__

        def recorded(cls, *args):
            plan = make(cls, *args)
            self.made.append(plan)
            return plan

        monkeypatch.setattr(skipping.SkipPlan, "for_decode", classmethod(recorded))

    def off(self) -> None:
        self.monkeypatch.setattr(skipping.SkipPlan, "for_decode", classmethod(lambda cls, *args: None))


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> Plans:
    return Plans(monkeypatch)


def _decode(path: Path, sampling: Sampling, segment: Segment | None = None) -> tuple[dict, DecodeReport]:
    report = DecodeReport()
    batches = list(pyav_decoder.decode(path, sampling, 8, report=report, segment=segment))
    return {"index": np.concatenate([b.frame_index for b in batches]).tolist(),
            "pts_s": np.concatenate([b.pts_s for b in batches]),
            "pixels": np.concatenate([b.frames.numpy() for b in batches])}, report


def _assert_same(ours: dict, reference: dict) -> None:
    assert ours["index"] == reference["index"]
    np.testing.assert_array_equal(ours["pts_s"], reference["pts_s"])
    np.testing.assert_array_equal(ours["pixels"], reference["pixels"])


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=IDS)
def test_unreferenced_frames_are_skipped_and_the_kept_frames_are_the_same(clip, sampling, plans):
    ours, report = _decode(clip, sampling)
    (plan,) = plans.made
    plans.off()
    reference, full = _decode(clip, sampling)
    _assert_same(ours, reference)
    assert plan.skipped_count >= 60  # x264's unreferenced B-frames: about half of 240
    # Frames left undecoded on purpose are neither decoded nor lost, as a full decode counts them.
    assert report.frames_decoded == full.frames_decoded == 240 and not report.damaged


def test_every_frame_kept_skips_nothing(clip, plans):
    _decode(clip, Sampling())
    assert plans.made == [None]


@pytest.mark.parametrize("sampling", SAMPLINGS[:2], ids=IDS[:2])
def test_segments_keep_what_the_whole_video_keeps(clip, sampling, plans):
    pieces = plan_segments(clip, 3)
    assert len(pieces) == 3
    decoded = [_decode(clip, sampling, piece) for piece in pieces]
    parts = [part for part, _ in decoded]
    assert all(plan is not None and plan.skipped_count for plan in plans.made)
    # A segment reads the packet headers of its own stretch, not the whole file's.
    assert all(len(plan.times) < 240 for plan in plans.made)
    # Each segment accounts for its own frames only (not those decoded past its end).
    assert sum(report.frames_decoded for _, report in decoded) == 240
    assert not any(report.damaged for _, report in decoded)
    plans.off()
    whole, _ = _decode(clip, sampling)
    assert sum((part["index"] for part in parts), []) == whole["index"]
    np.testing.assert_array_equal(np.concatenate([part["pixels"] for part in parts]), whole["pixels"])


def test_variable_frame_rate(frames, tmp_path, plans):
    """Irregular times: the plan samples by each frame's own time, as the decode does."""
    path = tmp_path / "vfr.mp4"
    time_base = Fraction(1, 1000)
    rng = np.random.default_rng(3)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 176, 144, "yuv420p"
        stream.codec_context.time_base = time_base
        pts = np.cumsum(rng.integers(15, 70, 150))
        for i, t in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(frames[i % len(frames)], format="rgb24")
            frame.pts, frame.time_base = int(t), time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    ours, _ = _decode(path, Sampling(fps=4.0))
    assert plans.made[0].skipped_count
    plans.off()
    _assert_same(ours, _decode(path, Sampling(fps=4.0))[0])


@pytest.mark.parametrize("make", ["inside-a-gop", "edit-list", "interlaced"])
def test_odd_starts_and_interlaced_video_give_the_same_frames(frames, tmp_path, make, plans):
    if make == "inside-a-gop":  # a capture's first frames cannot be decoded: numbering starts after them
        path = start_inside_a_gop(write_clip(tmp_path / "k.mp4", frames, 150, keyint=30), tmp_path / "gop.mp4", 5)
    elif make == "edit-list":  # a phone's trim: hidden frames are decoded for their references, never shown
        path = trim_by_edit_list(write_clip(tmp_path / "w.mp4", frames, 150), tmp_path / "trim.mp4", 10)
    else:  # bwdif reads each frame's neighbours: nothing is skipped, and the deinterlacer's clock is its own
        path = write_interlaced_clip(tmp_path / "i.ts", frames, 120)
    ours, report = _decode(path, Sampling(fps=5.0))
    plans.off()
    reference, full = _decode(path, Sampling(fps=5.0))
    _assert_same(ours, reference)
    assert (report.frames_decoded, report.frames_lost) == (full.frames_decoded, full.frames_lost)


def test_damage_stops_skipping_and_is_reported(clip, tmp_path, plans):
    damaged = overwrite_packets(clip, tmp_path / "damaged.mp4", (150, 151))
    ours, report = _decode(damaged, Sampling(fps=5.0))
    (plan,) = plans.made
    assert not plan.skipping and plan.skipped_count  # skipped before the damage, not after
    assert report.damaged and report.bad_packets == 2
    plans.off()
    reference, _ = _decode(damaged, Sampling(fps=5.0))
    # Before the damage, the same frames. After it, frame_index is the frame's position in the
    # video (as pts_s says), where a full decode counts the frames that decoded.
    before = [i for i in reference["index"] if i < 140]
    assert ours["index"][:len(before)] == before
    np.testing.assert_allclose(np.asarray(ours["index"]) / 30, ours["pts_s"] - ours["pts_s"][0], atol=1e-3)


def test_a_joined_recording_is_decoded_whole(frames, tmp_path, plans):
    """Times that go back cannot say which frame is which: every frame is decoded."""
    joined = write_joined_ts(tmp_path / "joined.ts", [(frames[:60], 60), (frames[60:], 60)])
    _decode(joined, Sampling(fps=5.0))
    assert plans.made == [None]

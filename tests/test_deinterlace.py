"""Interlaced video (broadcast 1080i/576i) is made progressive before faces are looked for."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from annotator.config import RunConfig
from annotator.run import run
from engines.decoders import DecodeReport, Sampling
from engines.decoders.choice import choose_decoder
from engines.decoders.pyav import decode
from engines.decoders.probe import probe
from engines.decoders.segments import plan_segments
from faults import carphone_frames, combing, write_interlaced_clip, write_joined_ts


@pytest.fixture(scope="module")
def interlaced(carphone, tmp_path_factory):
    return write_interlaced_clip(tmp_path_factory.mktemp("interlaced") / "tv.mp4", carphone_frames(carphone), 60)


def _decoded(path, **kwargs):
    report = DecodeReport()
    batches = list(decode(path, Sampling(), 8, report=report, **kwargs))
    frames = [frame for b in batches for frame in b.frames.numpy()]  # frames of a video may differ in size
    return frames, np.concatenate([b.frame_index for b in batches]), np.concatenate([b.pts_s for b in batches]), report


def test_interlaced_frames_are_made_progressive_one_for_one(interlaced):
    """Combing (rows unlike their neighbours, where the two fields were taken 1/60 s apart) drops
    by half; every frame comes out once, with its own index and time."""
    woven, index, pts, report = _decoded(interlaced, deinterlace=False)
    progressive, index2, pts2, report2 = _decoded(interlaced)
    assert len(progressive) == len(woven) == 60 and index2.tolist() == index.tolist() == list(range(60))
    assert pts2 == pytest.approx(pts) and not report.damaged and not report2.damaged
    before, after = np.mean([combing(f) for f in woven]), np.mean([combing(f) for f in progressive])
    assert after < 0.6 * before, (before, after)


def test_a_joined_broadcast_recording_is_deinterlaced_through_its_size_change(carphone, tmp_path):
    """An SD and an HD interlaced recording joined into one file: the filter takes one size, and
    at the first frame of the other FFmpeg failed (EPERM), so the whole video failed and lost its
    rows. Each size now gets a filter of its own: every frame once, combing halved in both."""
    frames = carphone_frames(carphone)
    video = write_joined_ts(tmp_path / "sd_then_hd.ts", [([cv2.resize(f, (352, 288)) for f in frames], 30),
                                                         ([cv2.resize(f, (704, 576)) for f in frames], 30)],
                            interlaced=True)
    woven, index, pts, report = _decoded(video, deinterlace=False)
    progressive, index2, pts2, report2 = _decoded(video)
    assert index2.tolist() == index.tolist() == list(range(60)) and pts2.tolist() == pts.tolist()
    assert report2.size_changes == report.size_changes == [[30, 704, 576]] and not report2.damaged
    for piece in (slice(0, 30), slice(30, 60)):
        before = np.mean([combing(f) for f in woven[piece]])
        after = np.mean([combing(f) for f in progressive[piece]])
        assert after < 0.6 * before, (piece, before, after)


def test_an_interlaced_piece_after_a_progressive_one_is_deinterlaced(carphone, tmp_path):
    """A recording joined from a progressive piece and an interlaced one (an advert, then the
    programme): the filter was chosen by the first frame alone, and the programme stayed combed."""
    frames = [cv2.resize(f, (352, 288)) for f in carphone_frames(carphone)]
    video = write_joined_ts(tmp_path / "progressive_then_interlaced.ts", [(frames, 30)], continuous=True)
    interlaced = write_joined_ts(tmp_path / "interlaced.ts", [(frames, 30)], interlaced=True)
    video.write_bytes(video.read_bytes() + interlaced.read_bytes())
    woven, index, _, _ = _decoded(video, deinterlace=False)
    progressive, index2, _, _ = _decoded(video)
    assert index2.tolist() == index.tolist() == list(range(60))
    assert all(np.array_equal(a, b) for a, b in zip(progressive[:30], woven[:30]))  # untouched
    before, after = np.mean([combing(f) for f in woven[30:]]), np.mean([combing(f) for f in progressive[30:]])
    assert after < 0.6 * before, (before, after)


def test_progressive_video_is_decoded_exactly_as_without_deinterlacing(carphone):
    assert np.array_equal(_decoded(carphone)[0], _decoded(carphone, deinterlace=False)[0])


def test_segments_of_an_interlaced_video_are_deinterlaced_too(carphone, tmp_path):
    clip = write_interlaced_clip(tmp_path / "long.ts", carphone_frames(carphone), 240)
    whole = _decoded(clip)
    plan = plan_segments(clip, 2)
    pieces = [list(decode(clip, Sampling(), 8, segment=s)) for s in plan]
    frames = np.concatenate([b.frames.numpy() for p in pieces for b in p])
    index = np.concatenate([b.frame_index for p in pieces for b in p])
    assert len(plan) == 2 and index.tolist() == whole[1].tolist()
    assert np.mean([combing(f) for f in frames]) == pytest.approx(np.mean([combing(f) for f in whole[0]]), rel=0.05)


def test_a_gpu_sends_interlaced_files_to_pyav_unless_told_not_to_deinterlace(interlaced, carphone, tmp_path):
    info = probe(interlaced)
    assert info.interlaced and not probe(carphone).interlaced
    choice = choose_decoder(info, "auto", "cuda", "NVIDIA H100 80GB HBM3", dali_installed=True)
    assert choice.kind == "pyav" and choice.reason.startswith("interlaced")
    kept = choose_decoder(info, "auto", "cuda", "NVIDIA H100 80GB HBM3", dali_installed=True, deinterlace=False)
    assert kept.kind == "dali-gpu"


def test_a_run_records_deinterlacing_and_keeps_it_apart_on_resume(interlaced, tmp_path):
    """The option is part of the output's fingerprint: rows made with and without it never mix."""
    from annotator.config import ConfigError
    from annotator.writer import read_metadata

    out = tmp_path / "out"
    summary = run(RunConfig(inputs=(interlaced,), out=out, workers=0), progress=False)
    assert summary.frames == 60 and summary.faces == 60 and summary.exit_code == 0
    meta = read_metadata(next(out.glob("part-*.parquet")))
    assert meta["options"]["deinterlace"] is True and meta["fingerprint"]["deinterlace"] is True
    with pytest.raises(ConfigError, match=r"other models or options \(deinterlace; pass the same options"):
        run(RunConfig(inputs=(interlaced,), out=out, workers=0, deinterlace=False), progress=False)


def test_parts_from_before_the_option_count_as_made_without_it():
    import json

    from annotator.run import comparable_fingerprint

    old = json.dumps({"models": ["a", "b"], "det_size": 640}, sort_keys=True)
    assert json.loads(comparable_fingerprint(old)) == {"models": ["a", "b"], "det_size": 640, "deinterlace": False}
    new = json.dumps({"models": ["a"], "deinterlace": True}, sort_keys=True)
    assert comparable_fingerprint(new) == new


def test_the_overlay_draws_on_deinterlaced_frames(interlaced, tmp_path):
    from annotator.overlay import write_overlay

    out = tmp_path / "out.parquet"
    run(RunConfig(inputs=(interlaced,), out=out, workers=0), progress=False)
    summary = write_overlay(interlaced, out, tmp_path / "overlay.mp4")
    assert summary.frames == 60 and summary.annotated == 60  # every frame's face matched by its time
    drawn, _, _, _ = _decoded(tmp_path / "overlay.mp4", deinterlace=False)
    stored, _, _, _ = _decoded(interlaced, deinterlace=False)
    assert np.mean([combing(f) for f in drawn]) < 0.6 * np.mean([combing(f) for f in stored])

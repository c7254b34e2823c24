"""A file DALI fails on part-way: PyAV decodes the rest, the rows so far stay, no frame comes twice.

NVDEC rejects a damaged stretch of a file that FFmpeg decodes around (skipping the damaged
packets). Before, the whole video then failed: its rows so far were dropped and it became an
error row, where the CPU path kept every frame that decodes and said what was lost.

DALI is not in CI's install (its wheel is ~0.8 GB), so the router's hand-over is tested there
with a decoder that hands on PyAV's own batches of the file and then raises where DALI would;
where DALI is installed, its CPU reader (VP9) fails for real on a damaged file.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.decoders import DecodeError, DecodeReport, FrameBatch, Sampling
from engines.decoders import pyav as pyav_decoder
from engines.decoders import routed
from engines.decoders.choice import DecoderChoice
from faults import carphone_frames, overwrite_packets, truncate, write_clip

HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
FRAMES = 90
SAMPLINGS = [Sampling(), Sampling(every_n=7), Sampling(fps=4.0)]
needs_dali = pytest.mark.skipif(
    not HAS_DALI, reason="NVIDIA DALI not installed (pip install nvidia-dali-cuda120; .[test] has it on x86-64 Linux)")


@pytest.fixture(scope="module")
def frames(carphone: Path) -> list[np.ndarray]:
    return carphone_frames(carphone)


@pytest.fixture(scope="module")
def clean(frames: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 frames of H.264, a keyframe every 30 (so the rest starts at a seek, not at the start)."""
    return write_clip(tmp_path_factory.mktemp("handover") / "clean.mp4", frames, FRAMES, keyint=30)


class FailingPartWay:
    """Hands on the file's batches up to ``fail_at`` (its frame index), then raises as DALI does.

    The batches are PyAV's own, so the frames on both sides of the hand-over can be compared
    with a PyAV decode of the whole file; DALI numbers frames in presentation order as PyAV does.
    """

    def __init__(self, fail_at: int, then_remove: bool = False) -> None:
        self.fail_at, self.then_remove = fail_at, then_remove

    def decode(self, path: Path, sampling: Sampling, *, report: DecodeReport, info: object) -> Iterator[FrameBatch]:
        report.frames_expected = FRAMES  # DALI's: the packets the file holds
        found = DecodeReport()
        for batch in pyav_decoder.decode(path, sampling, 8, report=found):
            if batch.frame_index[-1] >= self.fail_at:
                if self.then_remove:  # the file goes (a network share drops, a copy is moved away)
                    path.unlink()
                raise DecodeError(f"{path}: DALI decode failed (Failed to send packet to decoder)")
            report.frames_decoded = int(batch.frame_index[-1]) + 1
            yield batch
        if found.damaged:  # fewer frames than packets: DALI's own check raises
            raise DecodeError(f"{path}: DALI decoded {found.frames_decoded} frames where the container has {FRAMES}")


def _routed_through(monkeypatch: pytest.MonkeyPatch, dali: object) -> routed.RoutedDecoder:
    monkeypatch.setattr(routed, "choose_decoder", lambda *args, **kw: DecoderChoice("dali-gpu", "test"))
    decoder = routed.RoutedDecoder("dali", "cpu")
    monkeypatch.setattr(decoder, "_dali_decoder", lambda kind, batch_size: dali)
    return decoder


def _decoded(decoder, path: Path, sampling: Sampling) -> tuple[list[FrameBatch], DecodeReport]:
    report = DecodeReport()
    return list(decoder(path, sampling, 8, report=report)), report


def _frames_of(batches: list[FrameBatch]) -> tuple[list[int], np.ndarray, np.ndarray]:
    index = np.concatenate([b.frame_index for b in batches])
    return index.tolist(), np.concatenate([b.pts_s for b in batches]), torch.cat([b.frames for b in batches]).numpy()


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["every-frame", "every-7th", "4-fps"])
def test_the_rest_of_a_file_dali_fails_on_is_decoded_by_pyav(clean: Path, sampling: Sampling,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    decoder = _routed_through(monkeypatch, FailingPartWay(fail_at=70))
    with caplog.at_level(logging.WARNING):
        batches, report = _decoded(decoder, clean, sampling)
    expected = pyav_decoder.decode(clean, sampling, 8)
    index, pts, pixels = _frames_of(batches)
    want_index, want_pts, want_pixels = _frames_of(list(expected))
    assert index == want_index  # every sampled frame once, in order, across the hand-over
    np.testing.assert_allclose(pts, want_pts)
    np.testing.assert_array_equal(pixels, want_pixels)  # the same frames, not their neighbours
    assert report.frames_decoded == FRAMES and report.frames_expected == FRAMES and not report.damaged
    # The frame after the last batch handed on.
    resume = {Sampling(): 64, Sampling(every_n=7): 50, Sampling(fps=4.0): 54}[sampling]
    assert decoder.last_choice.reason.startswith(f"DALI stopped at frame {resume}: DALI decode failed")
    assert f"{clean}: DALI stopped at frame {resume}" in caplog.text


def test_damage_after_the_hand_over_is_reported_as_pyav_reports_it(clean: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    damaged = overwrite_packets(clean, tmp_path / "damaged.mp4", (60, 61))
    batches, report = _decoded(_routed_through(monkeypatch, FailingPartWay(fail_at=56)), damaged, Sampling())
    reference = DecodeReport()
    want = list(pyav_decoder.decode(damaged, Sampling(), 8, report=reference))
    assert _frames_of(batches)[0] == _frames_of(want)[0]
    assert (report.frames_decoded, report.frames_lost, report.bad_packets) == (
        reference.frames_decoded, reference.frames_lost, reference.bad_packets)
    assert report.damaged and report.first_bad_s == pytest.approx(reference.first_bad_s)


def test_a_file_that_decodes_no_further_keeps_its_head_and_says_what_was_lost(
        clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ruined = overwrite_packets(clean, tmp_path / "ruined.mp4", tuple(range(40, FRAMES)))
    batches, report = _decoded(_routed_through(monkeypatch, FailingPartWay(fail_at=40)), ruined, Sampling())
    want = list(pyav_decoder.decode(ruined, Sampling(), 8))
    head = _frames_of(batches)[0]
    assert head == _frames_of(want)[0] and len(head) >= 32  # (B-frames stored after frame 40 go with it)
    assert report.damaged and report.frames_decoded == len(head) and report.frames_lost == FRAMES - len(head)


def test_a_file_gone_when_dali_fails_keeps_what_dali_handed_on(clean: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "copy.mp4"
    copy.write_bytes(clean.read_bytes())
    batches, report = _decoded(_routed_through(monkeypatch, FailingPartWay(fail_at=40, then_remove=True)), copy,
                               Sampling())
    assert _frames_of(batches)[0] == list(range(40))
    assert report.damaged and report.stopped_early.startswith("DALI decode failed")
    assert (report.frames_decoded, report.frames_lost) == (40, FRAMES - 40)


@needs_dali
@pytest.mark.parametrize("sampling", SAMPLINGS[:2], ids=["every-frame", "every-7th"])
def test_dalis_cpu_reader_fails_on_a_damaged_vp9_file_and_pyav_decodes_the_rest(
        frames: list[np.ndarray], tmp_path: Path, sampling: Sampling) -> None:
    clean = write_clip(tmp_path / "clean.webm", frames, FRAMES, codec="libvpx-vp9", keyint=30)
    damaged = overwrite_packets(clean, tmp_path / "damaged.webm", (60, 61))
    decoder = routed.RoutedDecoder("dali", "cpu")
    batches, report = _decoded(decoder, damaged, sampling)
    reference = DecodeReport()
    want = list(pyav_decoder.decode(damaged, sampling, 8, report=reference))
    assert "DALI stopped at frame" in decoder.last_choice.reason  # DALI really failed part-way
    index, pts, pixels = _frames_of(batches)
    want_index, want_pts, want_pixels = _frames_of(want)
    assert index == want_index
    np.testing.assert_allclose(pts, want_pts, atol=1e-3)
    assert np.abs(pixels.astype(np.int16) - want_pixels).mean() < 3.0  # two YUV→RGB conversions
    assert (report.frames_decoded, report.frames_lost, report.bad_packets) == (
        reference.frames_decoded, reference.frames_lost, reference.bad_packets)


@needs_dali
def test_dali_says_a_cut_off_webm_download_was_cut(frames: list[np.ndarray], tmp_path: Path) -> None:
    whole = write_clip(tmp_path / "whole.webm", frames, FRAMES, codec="libvpx-vp9")
    cut = truncate(whole, tmp_path / "cut.webm", 0.6)
    decoder = routed.RoutedDecoder("dali", "cpu")
    batches, report = _decoded(decoder, cut, Sampling())
    reference = DecodeReport()
    want = list(pyav_decoder.decode(cut, Sampling(), 8, report=reference))
    assert decoder.last_choice.kind == "dali-cpu"
    assert _frames_of(batches)[0] == _frames_of(want)[0]
    assert report.stopped_early == reference.stopped_early and report.stopped_early.startswith("the last frame is at")
    assert report.frames_lost == reference.frames_lost == FRAMES - len(_frames_of(want)[0])

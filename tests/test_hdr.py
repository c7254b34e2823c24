"""HDR video (PQ, HLG; BT.2020) is shown as SDR BT.709 before faces are found and scored
(engines/decoders/tonemap.py). Clips are made here from carphone the way an HDR camera stores
them: FFmpeg's scaler takes the SDR frames to PQ or HLG with BT.2020 primaries, 10-bit HEVC."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from engines.decoders import DecodeReport, Sampling
from engines.decoders.probe import probe
from engines.decoders.pyav import decode
from engines.decoders.tonemap import sdr_conversion
from faults import carphone_frames

tonemap = pytest.importorskip("av.video.reformatter")
if not hasattr(tonemap, "ColorTrc"):
    pytest.skip("this PyAV has no colour management (PyAV >= 17)", allow_module_level=True)
if "libx265" not in av.codecs_available:
    pytest.skip("this PyAV's FFmpeg has no HEVC encoder to make the clips", allow_module_level=True)
from av.video.reformatter import ColorPrimaries, ColorTrc, Colorspace, VideoReformatter  # noqa: E402

SIZE = (352, 288)


def _clip(path: Path, frames: list[np.ndarray], transfer: ColorTrc) -> Path:
    """``frames`` (SDR BT.709) stored as 10-bit HEVC in ``transfer`` with BT.2020 primaries."""
    reformatter = VideoReformatter()
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx265", rate=30)
        stream.width, stream.height, stream.pix_fmt = *SIZE, "yuv420p10le"
        stream.codec_context.color_trc = int(transfer)
        stream.codec_context.color_primaries = int(ColorPrimaries.BT2020)
        stream.codec_context.colorspace = int(Colorspace.BT2020)
        stream.options = {"x265-params": "log-level=error"}
        for rgb in frames:
            sdr = av.VideoFrame.from_ndarray(cv2.resize(rgb, SIZE, interpolation=cv2.INTER_CUBIC), format="rgb24")
            sdr.color_trc, sdr.color_primaries = int(ColorTrc.BT709), int(ColorPrimaries.BT709)
            hdr = reformatter.reformat(sdr, format="yuv420p10le", dst_colorspace=Colorspace.BT2020,
                                       dst_color_trc=transfer, dst_color_primaries=ColorPrimaries.BT2020,
                                       dst_color_range="MPEG")
            out.mux(stream.encode(hdr))
        out.mux(stream.encode())
    return path


def _decoded(path: Path, **options: object) -> tuple[np.ndarray, DecodeReport]:
    report = DecodeReport()
    batches = list(decode(path, Sampling(), 8, report=report, **options))
    return np.concatenate([b.frames.numpy() for b in batches]).astype(np.float32), report


@pytest.mark.parametrize("transfer, label, plain_error", [(ColorTrc.SMPTE2084, "PQ", 15.0),
                                                         (ColorTrc.ARIB_STD_B67, "HLG", 10.0)])
def test_hdr_frames_come_out_as_their_sdr_original(carphone: Path, tmp_path: Path, transfer: ColorTrc, label: str,
                                                   plain_error: float) -> None:
    originals = carphone_frames(carphone)[:24]
    sdr = np.stack([cv2.resize(f, SIZE, interpolation=cv2.INTER_CUBIC) for f in originals]).astype(np.float32)
    clip = _clip(tmp_path / f"{label}.mp4", originals, transfer)
    frames, report = _decoded(clip)
    assert report.tone_mapped == probe(clip).hdr == f"{label} BT.2020 mapped to SDR BT.709"
    mapped_error = np.abs(frames - sdr).mean()
    # Read as if SDR, as before: far darker and flatter than the original.
    with av.open(str(clip)) as container:
        plain = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float32)
    assert np.abs(plain - sdr).mean() > plain_error and mapped_error < 5  # measured: 24.4 / 16.6 against 4.5 / 3.7
    assert abs(frames.mean() - sdr.mean()) < 3  # the same brightness


def test_sdr_video_is_converted_as_before(carphone: Path) -> None:
    with av.open(str(carphone)) as container:
        first = next(container.decode(video=0))
    assert sdr_conversion(first) == ({}, None) and probe(carphone).hdr is None
    frames, report = _decoded(carphone, square_pixels=False)  # as stored, to compare pixel for pixel
    with av.open(str(carphone)) as container:
        plain = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert report.tone_mapped is None and np.array_equal(frames.astype(np.uint8), plain)

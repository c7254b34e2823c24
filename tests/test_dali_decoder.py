"""The DALI decoder against the PyAV reference: same frames, indices, timestamps and sampling.

Without a GPU the graph runs on DALI's CPU backend, which reads only VP8/VP9/MJPEG, so the clips
here are VP9 made with PyAV, with the frame number burned in as a grey level. The H.264 path
(NVDEC) is covered by the ``gpu`` test on the carphone clip. ``.[test]`` installs DALI on x86-64
Linux, so CI runs this module; elsewhere it skips with that reason.
"""

from __future__ import annotations

import dataclasses
import fractions
import importlib.util
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from engines.decoders import DecodeError, FrameBatch, Sampling
from engines.decoders import pyav as pyav_decoder
from engines.decoders.probe import probe

if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
    pytest.skip(
        "DALI not installed (pip install nvidia-dali-cuda120); the GPU decode path needs an NVIDIA GPU",
        allow_module_level=True,
    )

from engines.decoders import dali as dali_decoder  # noqa: E402  (after the skip, on purpose)

CLIP_FRAMES = 24
CLIP_FPS = 25
CLIP_SIZE = (64, 48)  # width, height: small, and a multiple of 16 so VP9 needs no padding
GREY_STEP = 10  # frame i is filled with grey 10 * i: 24 frames span 0..230, inside uint8
# Irregular presentation times (ms) for the variable-frame-rate clip: gaps of 10 to 240 ms.
VFR_PTS_MS = (0, 40, 80, 200, 240, 250, 260, 500, 540, 580)
PTS_ATOL_S = 1e-3
# Both decoders convert YUV 4:2:0 to RGB with their own FFmpeg/swscale builds; on these flat
# frames they differ by at most 1 grey level, on the textured carphone clip by ~1 on average.
PIXEL_MEAN_ABS_DIFF = 3.0


def _write_vp9(path: Path, levels: list[int], pts_ms: list[int] | None = None) -> Path:
    """A VP9 WebM whose frame i is a flat grey ``levels[i]`` (flat areas survive lossy coding)."""
    width, height = CLIP_SIZE
    time_base = fractions.Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=CLIP_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = time_base
        for i, level in enumerate(levels):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), level, np.uint8), format="rgb24")
            frame.pts = pts_ms[i] if pts_ms is not None else round(i * 1000 / CLIP_FPS)
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def numbered_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 frames of 64x48 VP9 at 25 fps; frame i is grey 10 * i."""
    levels = [GREY_STEP * i for i in range(CLIP_FRAMES)]
    return _write_vp9(tmp_path_factory.mktemp("dali") / "numbered.webm", levels)


@pytest.fixture(scope="module")
def vfr_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 VP9 frames at irregular times (``VFR_PTS_MS``); frame i is grey 20 * i."""
    levels = [2 * GREY_STEP * i for i in range(len(VFR_PTS_MS))]
    return _write_vp9(tmp_path_factory.mktemp("dali") / "vfr.webm", levels, list(VFR_PTS_MS))


def _burned_in_number(frames: np.ndarray, step: int = GREY_STEP) -> np.ndarray:
    return np.rint(frames.reshape(len(frames), -1).mean(axis=1) / step).astype(np.int64)


def _assert_same_batches(dali: list[FrameBatch], reference: list[FrameBatch]) -> None:
    assert [len(b) for b in dali] == [len(b) for b in reference]
    for ours, theirs in zip(dali, reference):
        frames, expected = ours.frames.cpu().numpy(), theirs.frames.numpy()
        assert frames.dtype == np.uint8 and frames.shape == expected.shape
        assert ours.frame_index.dtype == np.int64 and ours.pts_s.dtype == np.float64
        np.testing.assert_array_equal(ours.frame_index, theirs.frame_index)
        np.testing.assert_allclose(ours.pts_s, theirs.pts_s, atol=PTS_ATOL_S)
        assert np.abs(frames.astype(np.int16) - expected).mean() < PIXEL_MEAN_ABS_DIFF


def test_cpu_graph_matches_pyav_frame_for_frame(numbered_clip: Path) -> None:
    # batch 5 does not divide 24: the last sequence is padded by DALI and must be trimmed.
    dali = list(dali_decoder.decode_cpu(numbered_clip, Sampling(), batch_size=5))
    _assert_same_batches(dali, list(pyav_decoder.decode(numbered_clip, Sampling(), 5)))
    index = np.concatenate([b.frame_index for b in dali])
    assert index.tolist() == list(range(CLIP_FRAMES))
    np.testing.assert_allclose(np.concatenate([b.pts_s for b in dali]), index / CLIP_FPS, atol=PTS_ATOL_S)
    # Every batch was kept alive until now: DALI must not have reused the memory behind them.
    np.testing.assert_array_equal(_burned_in_number(torch.cat([b.frames for b in dali]).cpu().numpy()), index)


@pytest.mark.parametrize("batch_size", [3, 8, 64])
def test_every_n_uses_the_reader_stride(numbered_clip: Path, batch_size: int) -> None:
    dali = list(dali_decoder.decode_cpu(numbered_clip, Sampling(every_n=3), batch_size))
    index = np.concatenate([b.frame_index for b in dali])
    assert index.tolist() == list(range(0, CLIP_FRAMES, 3))
    np.testing.assert_array_equal(_burned_in_number(torch.cat([b.frames for b in dali]).cpu().numpy()), index)
    _assert_same_batches(dali, list(pyav_decoder.decode(numbered_clip, Sampling(every_n=3), batch_size)))


@pytest.mark.parametrize("fps", [7.0, 10.0, 25.0, 100.0])
def test_sample_fps_selects_what_pyav_selects(numbered_clip: Path, fps: float) -> None:
    # batch 4 < frames per sequence kept at most fps: selections are regrouped into full batches.
    dali = list(dali_decoder.decode_cpu(numbered_clip, Sampling(fps=fps), batch_size=4))
    _assert_same_batches(dali, list(pyav_decoder.decode(numbered_clip, Sampling(fps=fps), 4)))
    assert all(len(b) == 4 for b in dali[:-1])
    index = np.concatenate([b.frame_index for b in dali])
    np.testing.assert_array_equal(_burned_in_number(torch.cat([b.frames for b in dali]).cpu().numpy()), index)


def test_variable_frame_rate_keeps_true_timestamps(vfr_clip: Path) -> None:
    dali = list(dali_decoder.decode_cpu(vfr_clip, Sampling(), batch_size=4))
    np.testing.assert_allclose(np.concatenate([b.pts_s for b in dali]), np.array(VFR_PTS_MS) / 1000, atol=PTS_ATOL_S)
    sampled = list(dali_decoder.decode_cpu(vfr_clip, Sampling(fps=10.0), batch_size=2))
    reference = list(pyav_decoder.decode(vfr_clip, Sampling(fps=10.0), 2))
    _assert_same_batches(sampled, reference)
    index = np.concatenate([b.frame_index for b in sampled])
    assert index.tolist() == [0, 3, 7]  # 0.0 s, then the first frames at/after 0.1 s and 0.3 s
    np.testing.assert_array_equal(_burned_in_number(torch.cat([b.frames for b in sampled]).cpu().numpy(), 2 * GREY_STEP), index)


def test_codec_outside_the_cpu_reader_is_a_one_line_error(carphone: Path) -> None:
    with pytest.raises(DecodeError) as err:
        next(dali_decoder.decode_cpu(carphone, Sampling(), 8))
    message = str(err.value)
    assert message.startswith(f"{carphone}: codec h264") and "\n" not in message


def test_dali_decode_failure_names_the_file_and_dalis_reason(carphone: Path) -> None:
    # Bypass the codec check: DALI's CPU reader itself refuses H.264 when it runs.
    info = dataclasses.replace(probe(carphone), codec="vp9")
    with pytest.raises(DecodeError) as err:
        next(dali_decoder.DaliVideoDecoder("cpu", 8).decode(carphone, Sampling(), info=info))
    message = str(err.value)
    assert message.startswith(f"{carphone}: DALI decode failed (") and "video decoder" in message
    assert "\n" not in message


def test_one_pipeline_is_fed_file_after_file(numbered_clip: Path, vfr_clip: Path) -> None:
    decoder = dali_decoder.DaliVideoDecoder("cpu", 5)
    for clip, sampling in [(numbered_clip, Sampling()), (vfr_clip, Sampling(fps=10.0)), (numbered_clip, Sampling(every_n=4))]:
        _assert_same_batches(list(decoder.decode(clip, sampling)), list(pyav_decoder.decode(clip, sampling, 5)))
    assert decoder.files_fed == 3 and decoder._pipe is not None


@pytest.mark.parametrize("content", [None, b"this is not a video"])
def test_missing_or_garbage_file_is_a_decode_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "clip.webm"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DecodeError, match=r"^" + str(path).replace("\\", "\\\\") + r": "):
        next(dali_decoder.decode_cpu(path, Sampling(), 8))


def test_missing_dali_says_how_to_install(numbered_clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    with pytest.raises(RuntimeError, match="pip install 'nvidia-dali-cuda120>=1.44'"):
        next(dali_decoder.decode_cpu(numbered_clip, Sampling(), 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NVDEC) for DALI's GPU reader")
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(every_n=7), Sampling(fps=10.0)], ids=str)
def test_gpu_decode_of_h264_matches_pyav(carphone: Path, sampling: Sampling) -> None:
    dali = list(dali_decoder.decode(carphone, sampling, batch_size=16))
    assert all(b.frames.is_cuda and b.frames.dtype == torch.uint8 and b.frames.shape[1:] == (144, 176, 3) for b in dali)
    _assert_same_batches(dali, list(pyav_decoder.decode(carphone, sampling, 16)))

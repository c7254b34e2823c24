"""PyAV decoding and frame sampling on the real carphone clip."""

from __future__ import annotations

import numpy as np
import torch
import pytest

from engines.decoders import DecodeError, Sampling
from engines.decoders.pyav import decode

CARPHONE_FPS = 30000 / 1001


def _decoded(path, sampling, batch_size=16):
    batches = list(decode(path, sampling, batch_size))
    return (np.concatenate([b.frame_index for b in batches]), np.concatenate([b.pts_s for b in batches]),
            [b.frames for b in batches])


def test_every_frame_decoded_with_increasing_timestamps(carphone):
    index, pts, frames = _decoded(carphone, Sampling())
    assert index.tolist() == list(range(120))
    assert np.all(np.diff(pts) > 0)
    np.testing.assert_allclose(pts, index / CARPHONE_FPS, atol=1e-6)
    # 176x144 stored, shown 192x144: carphone's pixels are 128:117 (engines.decoders.sample_aspect)
    assert frames[0].dtype == torch.uint8 and frames[0].shape[1:] == (144, 192, 3)
    assert [len(f) for f in frames] == [16] * 7 + [8]


def test_every_n(carphone):
    index, _, _ = _decoded(carphone, Sampling(every_n=7))
    assert index.tolist() == list(range(0, 120, 7))


@pytest.mark.parametrize("fps, expected_step", [(10.0, 3), (5.0, 6), (29.97, 1), (100.0, 1)])
def test_sample_fps_picks_first_frame_at_each_tick(carphone, fps, expected_step):
    index, pts, _ = _decoded(carphone, Sampling(fps=fps))
    # At 29.97 fps, ticks every 1/fps seconds land on every (30/fps)-th frame.
    assert index.tolist() == list(range(0, 120, expected_step))


def test_sample_fps_on_variable_frame_rate():
    selector = Sampling(fps=2.0).selector()
    times = [0.0, 0.1, 0.45, 0.52, 0.9, 1.3, 1.31, 2.6]  # irregular, with a gap
    kept = [t for i, t in enumerate(times) if selector.keep(i, t)]
    assert kept == [0.0, 0.52, 1.3, 2.6]


def test_bad_sampling_values():
    with pytest.raises(ValueError):
        Sampling(every_n=0)
    with pytest.raises(ValueError):
        Sampling(fps=-1.0)


def test_not_a_video_is_a_one_line_error(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video")
    with pytest.raises(DecodeError) as err:
        list(decode(bad, Sampling(), 8))
    message = str(err.value)
    assert str(bad) in message and "\n" not in message


@pytest.mark.parametrize("max_pixels", [None, 192 * 144 // 2])  # as displayed, and scaled down to a budget
def test_a_workers_thread_share_gives_the_same_pixels(carphone, max_pixels):
    """Conversions stay on the worker's share of the cores (``threads``, also passed to PyAV 17's
    multithreaded reformatter) and give the very pixels of FFmpeg's own choice of threads."""
    def frames(threads: int) -> np.ndarray:
        return np.concatenate([b.frames.numpy() for b in decode(carphone, Sampling(), 8, max_pixels=max_pixels,
                                                                     threads=threads)])

    one, auto = frames(1), frames(0)
    assert one.shape == auto.shape and len(one) == 120
    if max_pixels is not None:
        assert one.shape[1:3] == (100, 134)  # scaled to the budget (engines.decoders.batch_shape)
    np.testing.assert_array_equal(one, auto)


def test_one_conversion_context_per_video_with_the_pixels_of_a_fresh_one_per_frame(carphone, monkeypatch):
    """FFmpeg's scaler (and its pool of threads) is set up once per video, not once per frame,
    and its frames are those a fresh conversion of each frame gives."""
    import av

    from engines.decoders import pyav

    made: list[object] = []
    real = pyav.VideoReformatter

    class Counting:
        def __init__(self) -> None:
            self.inner, self.calls = real(), 0
            made.append(self)

        def reformat(self, frame, **options):
            self.calls += 1
            return self.inner.reformat(frame, **options)

    monkeypatch.setattr(pyav, "VideoReformatter", Counting)
    frames = np.concatenate([b.frames.numpy() for b in decode(carphone, Sampling(every_n=2), 8, threads=2)])
    assert len(made) == 1 and made[0].calls == 60
    with av.open(str(carphone)) as container:
        # Shown 192 wide (128:117 pixels): one conversion stretches and converts, as here.
        fresh = [f.to_ndarray(format="rgb24", width=192, height=144)
                 for i, f in enumerate(container.decode(video=0)) if i % 2 == 0]
    np.testing.assert_array_equal(frames, np.stack(fresh))

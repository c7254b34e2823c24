"""The device-resident path (frames as torch tensors, as DALI delivers them on a GPU).

Run here on CPU tensors: the same code moves to CUDA unchanged, and must agree with the numpy
path that the parity fixtures pin.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from annotator.align import warp_crops, warp_crops_tensor
from annotator.config import RunConfig
from annotator.pipeline import VideoPipeline
from engines.decoders import Sampling
from engines.decoders.pyav import decode
from engines.factory import create_detector, create_scorer


@pytest.fixture(scope="module")
def frames(carphone) -> np.ndarray:
    return next(iter(decode(carphone, Sampling(every_n=10), 12))).frames


def test_detector_tensor_path_matches_numpy(frames):
    detector, _ = create_detector("retinaface-mnv2", backend="torch", det_size=128)  # 176x144 shrinks
    on_host = detector.detect(frames)
    on_device = detector.detect(torch.from_numpy(frames))
    for a, b in zip(on_host, on_device, strict=True):
        assert len(a.scores) == len(b.scores) == 1
        # Bilinear resize in torch vs OpenCV differs by rounding only.
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1.0)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-3)


def test_tensor_warp_matches_opencv(frames):
    rng = np.random.default_rng(0)
    landmarks = np.array([[[60, 60], [100, 58], [80, 80], [65, 100], [98, 99]]], np.float32)
    landmarks = landmarks + rng.normal(0, 3, (6, 5, 2)).astype(np.float32)  # 6 faces, some near edges
    landmarks[5] -= 55
    owner = np.array([0, 1, 2, 3, 4, 5]) % len(frames)
    reference, _ = warp_crops(frames, owner, landmarks)
    crops = warp_crops_tensor(torch.from_numpy(frames), owner, landmarks)
    assert crops.shape == (6, 3, 112, 112)
    diff = np.abs(crops.permute(0, 2, 3, 1).numpy() - reference.astype(np.float32))
    # OpenCV interpolates in 5-bit fixed point: mean error well under one grey level.
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 2.0
    assert warp_crops_tensor(torch.from_numpy(frames), np.zeros(0, int), np.zeros((0, 5, 2))).shape == (0, 3, 112, 112)


def test_scorer_tensor_path_matches_numpy(frames):
    scorer = create_scorer("fer-minixception", backend="torch")
    landmarks = np.array([[[60, 60], [100, 58], [80, 80], [65, 100], [98, 99]]] * 3, np.float32)
    crops, _ = warp_crops(frames, np.arange(3), landmarks)
    expected, _ = scorer.predict(crops)
    probs, va = scorer.predict_tensor(torch.from_numpy(crops).permute(0, 3, 1, 2).float())
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert va is None


def test_pipeline_rows_agree_on_tensor_frames(carphone, monkeypatch):
    config = RunConfig(inputs=(carphone,), out=carphone.with_suffix(".unused.parquet"), workers=0,
                       backend="torch", sampling=Sampling(every_n=20), det_size=128)
    pipeline = VideoPipeline(config)
    on_host = [b.to_pydict() for b in pipeline.annotate(carphone)]

    def tensor_decode(path, sampling, batch_size, report):
        for batch in decode(path, sampling, batch_size, report=report):
            yield dataclasses.replace(batch, frames=torch.from_numpy(batch.frames))

    monkeypatch.setattr(pipeline, "_decode", tensor_decode)
    on_device = [b.to_pydict() for b in pipeline.annotate(carphone)]
    for a, b in zip(on_host, on_device, strict=True):
        assert a["frame_index"] == b["frame_index"] and a["face_index"] == b["face_index"]
        np.testing.assert_allclose(np.array(a["x1"], float), np.array(b["x1"], float), atol=1.0)
        np.testing.assert_allclose(np.array(a["p_happiness"], float), np.array(b["p_happiness"], float), atol=0.05)

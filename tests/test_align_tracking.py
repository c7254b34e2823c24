"""Alignment maths and the one warp (against OpenCV as the oracle), and the face tracker on real video."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from annotator.tracking import FaceTracker, associate, iou_matrix
from engines.align import TEMPLATE_112, _warp_on_device, align_faces, similarity_matrices, square_matrices, warp
from engines.decoders import Sampling
from engines.decoders.pyav import decode
from engines.factory import create_detector


def _apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_template_maps_to_itself():
    m = similarity_matrices(TEMPLATE_112[None])[0]
    np.testing.assert_allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-5)


def test_recovers_a_known_similarity():
    angle, scale, shift = np.deg2rad(25.0), 2.5, np.array([300.0, -40.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    # Landmarks = template moved by the inverse map; alignment must undo it exactly.
    landmarks = (TEMPLATE_112 - 0) @ np.linalg.inv(rot).T + shift
    m = similarity_matrices(landmarks[None].astype(np.float32))[0]
    np.testing.assert_allclose(_apply(m, landmarks), TEMPLATE_112, atol=1e-3)


@pytest.fixture(scope="module")
def textured() -> np.ndarray:
    image = skimage.data.astronaut()
    return np.stack([image, image[::-1].copy()])


@pytest.mark.parametrize("path", [
    "host", "device",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs a CUDA GPU")]),
])
def test_warp_matches_opencv_inside_and_off_the_frame_at_any_scale(textured, path):
    """Frames in host memory go through OpenCV itself; the torch path that frames on a GPU take
    (``device``: run on the CPU; ``cuda``: on a GPU) samples the same points, also where a crop
    shrinks its region 6x."""
    rng = np.random.default_rng(0)
    landmarks = (TEMPLATE_112 * 1.5 + np.array([150, 60]))[None] + rng.normal(0, 4, (7, 5, 2))
    landmarks[4] -= 200  # mostly off the frame, top left
    landmarks[5] += 420  # mostly off the frame, bottom right
    landmarks[6] = TEMPLATE_112 * 6 + np.array([20, 10])  # a face 6x the template's: a strong shrink
    landmarks = landmarks.astype(np.float32)
    owner = np.array([0, 1, 0, 1, 0, 1, 0])
    matrices = similarity_matrices(landmarks)
    frames = torch.from_numpy(textured)
    if path == "host":
        crops = align_faces(frames, owner, landmarks)
    elif path == "device":
        crops = _warp_on_device(frames, owner, matrices, 112)
    else:
        crops = align_faces(frames.cuda(), owner, landmarks)
        assert crops.is_cuda
        crops = crops.cpu()
    assert crops.shape == (7, 3, 112, 112) and crops.dtype == torch.float32 and crops.is_contiguous()
    for crop, frame, matrix in zip(crops, owner, matrices):
        expected = cv2.warpAffine(textured[frame], matrix, (112, 112), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT).astype(np.float32)
        diff = np.abs(crop.permute(1, 2, 0).numpy() - expected)
        # OpenCV interpolates in 5-bit fixed point and rounds to uint8: half a grey level at most.
        assert diff.max() <= (0.0 if path == "host" else 1.0) and diff.mean() < 0.3
    empty = np.zeros(0, int), np.zeros((0, 2, 3), np.float32), 112
    assert warp(frames, *empty).shape == _warp_on_device(frames, *empty).shape == (0, 3, 112, 112)


def test_square_crops_cut_exactly_the_square(textured):
    matrices = square_matrices(np.array([[200.0, 150.0]]), np.array([96.0]), 96)
    crop = warp(torch.from_numpy(textured), np.array([1]), matrices, 96)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(crop, textured[1, 102:198, 152:248], atol=0.01)  # float32 rounding


def test_iou_and_association():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(iou_matrix(a, b), [[1.0, 50 / 150, 0.0]], atol=1e-6)
    previous = np.array([[0, 0, 10, 10], [50, 0, 60, 10]], np.float32)
    # Listed in the other order and slightly moved: each continues its own previous box.
    assert associate(previous, np.array([[51, 0, 61, 10], [1, 0, 11, 10], [90, 90, 99, 99]], np.float32)).tolist() == [1, 0, -1]
    assert associate(previous, np.zeros((0, 4), np.float32)).tolist() == []


@pytest.fixture(scope="module")
def carphone_frames(carphone) -> torch.Tensor:
    return torch.cat([b.frames for b in decode(carphone, Sampling(), 32)])


@pytest.fixture(scope="module")
def detector():
    detector, _ = create_detector("retinaface-mnv2", "onnxrt", threshold=0.9)
    return detector


def _track(detector, frames: torch.Tensor, every: int) -> list:
    tracker = FaceTracker(detector, detect_every=every)
    tracker.start(det_size=176, min_face=20)
    return [face for start in range(0, len(frames), 8) for face in tracker(frames[start:start + 8])], tracker


def test_tracking_between_keyframes_follows_full_detection(detector, carphone_frames):
    full, _ = _track(detector, carphone_frames, 1)
    fast, tracker = _track(detector, carphone_frames, 10)
    assert all(f.keyframe for f in full)
    assert tracker.keyframes == 12 == sum(f.keyframe for f in fast)  # 120 frames, no track lost
    assert tracker.cuts == 0  # one shot
    assert all(len(f.scores) == 1 for f in fast) and all(len(f.scores) == 1 for f in full)
    assert {int(f.track_ids[0]) for f in fast} == {0}  # one person, one id for the whole clip
    boxes = np.stack([f.boxes[0] for f in fast]) - np.stack([f.boxes[0] for f in full])
    landmarks = np.stack([f.landmarks[0] for f in fast]) - np.stack([f.landmarks[0] for f in full])
    assert np.median(np.abs(boxes)) < 1.5 and np.abs(landmarks).max() < 3  # a 45-pixel face
    # Both paths re-find the face in the same snapped window (engines.refind) wherever the face
    # moved less than a grid cell since the last frame: the same landmarks, to the bit, on nearly
    # every frame (measured 119 of 120), so the tracked path gives per-frame detection's crops.
    assert np.mean(np.abs(landmarks).max(axis=(1, 2)) == 0) >= 0.9


def test_a_lost_face_brings_the_next_keyframe_forward(detector, carphone_frames):
    frames = carphone_frames[:12].clone()
    x1, y1, x2, y2 = _track(detector, frames[4:5], 1)[0][0].boxes[0].round().astype(int).tolist()
    frames[4, max(0, y1 - 10):y2 + 10, max(0, x1 - 10):x2 + 10] = 128  # the face is gone for one frame
    tracker = FaceTracker(detector, detect_every=10)
    tracker.start(det_size=176, min_face=20)
    faces = tracker(frames)
    assert [f.keyframe for f in faces] == [True, False, False, False, False, True] + [False] * 6
    assert len(faces[4].scores) == 0 and len(faces[5].scores) == 1
    assert faces[5].track_ids[0] == 1  # it came back: a new id
    assert tracker.cuts == 0  # a face hidden is not a new shot


def _shot(image: np.ndarray, frames: int, height: int, width: int) -> torch.Tensor:
    """``frames`` frames of a still photograph, cut to the clip's aspect and size, drifting 1 px a frame."""
    import cv2

    rows = image.shape[1] * height // width
    still = cv2.resize(image[:rows], (width + frames, height), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.stack([still[:, i:i + width] for i in range(frames)]))


def test_a_cut_ends_every_track_and_finds_the_new_shots_faces_on_its_first_frame(detector, carphone_frames):
    """Carphone, then a cut to scikit-image's astronaut: her face is found on the cut's frame,
    under a new id, though the last keyframe was 5 frames before and the next due 5 after."""
    from skimage import data

    frames = torch.cat([carphone_frames[:15], _shot(data.astronaut(), 10, *carphone_frames.shape[1:3])])
    tracker = FaceTracker(detector, detect_every=10)
    tracker.start(det_size=176, min_face=20)
    faces = [face for start in range(0, len(frames), 8) for face in tracker(frames[start:start + 8])]
    assert tracker.cuts == 1
    assert faces[15].keyframe and len(faces[15].scores) == 1
    assert {int(f.track_ids[0]) for f in faces[:15]} == {0} and {int(f.track_ids[0]) for f in faces[15:]} == {1}
    assert faces[15].boxes[0][0] < 88  # hers: the left half of the frame
    assert [f.keyframe for f in faces] == [True] + [False] * 9 + [True] + [False] * 4 + [True] + [False] * 9

    blind = FaceTracker(detector, detect_every=10, cut_threshold=None)
    blind.start(det_size=176, min_face=20)
    missed = [face for start in range(0, len(frames), 8) for face in blind(frames[start:start + 8])]
    assert blind.cuts == 0 and not missed[15].keyframe  # without: the cut's frame is no keyframe


def test_a_cut_to_a_wide_shot_is_a_scan_so_its_small_face_is_found_at_once(detector, carphone_frames):
    """Carphone, then a cut to a wide shot of the astronaut (her face about 33 px of 352): the
    keyframe's detector side (128) shows it too small, the scan's (352) does not. The cut's frame
    is a scan, so she is found there and tracked on; without, she would wait for the next scan
    (up to ``scan_every`` frames: 300 by default, 10 s at 30 frames/s)."""
    from skimage import data

    carphone = torch.from_numpy(np.stack([cv2.resize(f, (352, 288)) for f in carphone_frames[:15].numpy()]))
    canvas = np.full((1024, 1024, 3), 90, np.uint8)
    canvas[:512, 256:768] = data.astronaut()
    frames = torch.cat([carphone, _shot(canvas, 30, height=288, width=352)])
    tracker = FaceTracker(detector, detect_every=10, scan_every=100)
    tracker.start(det_size=128, min_face=16, scan_size=352)
    faces = [face for start in range(0, len(frames), 8) for face in tracker(frames[start:start + 8])]
    assert tracker.cuts == 1 and tracker.scans == 2  # the first frame, and the cut's
    assert all(len(f.scores) == 1 for f in faces)
    assert 25 < faces[15].boxes[0][2] - faces[15].boxes[0][0] < 45
    assert {int(f.track_ids[0]) for f in faces[15:]} == {1}

    keyframe_only = FaceTracker(detector, detect_every=10, scan_every=100)
    keyframe_only.start(det_size=128, min_face=16)  # no scan side: what a cut without a scan sees
    missed = [face for start in range(0, len(frames), 8) for face in keyframe_only(frames[start:start + 8])]
    assert keyframe_only.cuts == 1 and not any(len(f.scores) for f in missed[15:])


def test_shot_signatures_separate_motion_a_loop_and_a_cut(carphone_frames):
    """Against CUT_THRESHOLD: motion within the carphone shot, and its loop point (frame 119 back
    to 0, the same shot), stay under it; a cut to another shot is far over it."""
    from skimage import data

    from annotator.continuity import shot_changes
    from annotator.tracking import CUT_THRESHOLD, shot_signatures

    def changes(*frames: torch.Tensor) -> np.ndarray:
        return shot_changes(shot_signatures(torch.cat(frames)).numpy())

    assert changes(carphone_frames).max() < 5  # 3.5 measured
    assert changes(carphone_frames[-1:], carphone_frames[:1])[0] < CUT_THRESHOLD
    cut = _shot(data.astronaut(), 1, *carphone_frames.shape[1:3])
    assert changes(carphone_frames[-1:], cut)[0] > 2 * CUT_THRESHOLD  # 67.5 measured


def test_capped_floor_says_what_the_det_size_cap_costs():
    from engines.retinaface import capped_floor

    # 720p at the default cap: shown at 0.5x, so a 32 px face would be 16 network pixels; the
    # smallest the detector sees at its 32 px is a 64 px face, and 1280 would show 32 px faces.
    assert capped_floor(1280, 720, 32, 640) == (64.0, 1280, 32.0)
    assert capped_floor(1920, 1080, 32, 640) == (96.0, 1920, 32.0)
    assert capped_floor(1920, 1080, 64, 640) == (96.0, 960, 64.0)
    assert capped_floor(1280, 720, 20, 640) == (64.0, 1280, 32.0)  # never upscaled: 32 px at best
    assert capped_floor(1280, 720, 64, 640) is None  # the cap does not bind
    assert capped_floor(176, 144, 32, 640) is None  # a small video is seen at full size


def test_a_min_face_the_cap_cannot_show_is_warned_once(carphone_720p, caplog):
    """--min-face 20 at 720p with --det-size 640 and no scans: one warning naming the size that
    would find them; with scans (at 1280, the frame's own size) nothing is hidden, and the default
    --min-face (a floor the README says the cap bounds) warns on nothing."""
    import logging
    from pathlib import Path

    from annotator import pipeline
    from annotator.config import RunConfig

    def warnings_of(**options) -> list[str]:
        pipeline._warned.clear()
        caplog.clear()
        config = RunConfig(inputs=(carphone_720p,), out=Path("unused.parquet"), workers=0, **options)
        runner = pipeline.VideoPipeline(config, threads=1)
        with caplog.at_level(logging.WARNING, logger="annotator.pipeline"):
            for _ in range(2):
                for _ in runner.annotate(carphone_720p):
                    pass
        return [r.getMessage() for r in caplog.records if r.name == "annotator.pipeline"]

    warnings = warnings_of(min_face=20, scan_every=0)
    assert len(warnings) == 1, warnings
    assert "faces under 64 px may be missed" in warnings[0] and "--det-size 1280 would show faces down to 32 px" in warnings[0]
    assert "--scan-every 0" in warnings[0] and str(carphone_720p) in warnings[0]
    assert warnings_of(min_face=20) == []
    assert warnings_of() == []


def test_a_scan_finds_a_face_the_keyframe_detector_shows_too_small(detector):
    """A 48 px face (the astronaut's, with a little hair and collar around it, as in the bench's
    multi-face clip) in a 1280x720 frame: at the 640 keyframe size it is 24 px and goes unseen;
    the first keyframe is a scan at 1280, which finds it, and the crops then follow it at 64 px."""
    import cv2
    import skimage.data

    image = skimage.data.astronaut()
    [found] = detector.detect(torch.from_numpy(image)[None])
    x1, y1, x2, y2 = found.boxes[0].astype(int)
    margin = int(0.45 * (y2 - y1))
    patch = image[max(0, y1 - margin):y2 + margin, max(0, x1 - margin):x2 + margin]
    scale = 48 / (y2 - y1)
    small = cv2.resize(patch, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    frames = np.full((30, 720, 1280, 3), 90, np.uint8)
    for i in range(30):  # drifting right by a pixel a frame
        frames[i, 300:300 + small.shape[0], 900 + i:900 + i + small.shape[1]] = small
    frames = torch.from_numpy(frames)
    centre_x = 900 + np.arange(30) + (min(x1, margin) + (x2 - x1) / 2) * scale

    def track(scan_every: int) -> tuple[list, FaceTracker]:
        tracker = FaceTracker(detector, detect_every=10, scan_every=scan_every)
        tracker.start(det_size=640, min_face=32, scan_size=1280)
        return [f for start in range(0, 30, 8) for f in tracker(frames[start:start + 8])], tracker

    plain, _ = track(0)
    assert all(len(f.boxes) == 0 for f in plain)  # the keyframe detector alone never sees it
    scanned, tracker = track(160)
    assert tracker.scans == 1 and tracker.keyframes == 3  # one scan (the first keyframe) in 30 frames
    assert all(len(f.boxes) == 1 for f in scanned) and {int(f.track_ids[0]) for f in scanned} == {0}
    np.testing.assert_allclose([(f.boxes[0][0] + f.boxes[0][2]) / 2 for f in scanned], centre_x, atol=4)

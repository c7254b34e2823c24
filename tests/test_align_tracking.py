"""Alignment maths and the IoU tracker."""

from __future__ import annotations

import numpy as np

from annotator.align import TEMPLATE_112, similarity_matrices, warp_crops
from annotator.tracking import IouTracker, iou_matrix


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


def test_warp_crops_follow_the_face():
    frames = np.zeros((2, 300, 400, 3), np.uint8)
    frames[1, 150:160, 200:210] = 255  # a bright patch where frame 1's nose is
    nose_at = np.array([205.0, 155.0])
    landmarks = (TEMPLATE_112 - TEMPLATE_112[2] + nose_at)[None]
    crops, matrices = warp_crops(frames, np.array([1]), landmarks)
    assert crops.shape == (1, 112, 112, 3) and crops.dtype == np.uint8
    y, x = np.round(TEMPLATE_112[2]).astype(int)[::-1]
    assert crops[0, y, x].min() == 255 and crops[0, 5, 5].max() == 0


def test_iou_matrix():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], np.float32)
    np.testing.assert_allclose(iou_matrix(a, b), [[1.0, 50 / 150, 0.0]], atol=1e-6)


def test_tracker_keeps_ids_and_opens_new_ones():
    tracker = IouTracker()
    left, right = [0, 0, 10, 10], [50, 0, 60, 10]
    assert tracker.update(np.array([left, right], np.float32)).tolist() == [0, 1]
    # Same faces, listed in the other order and slightly moved: ids follow the boxes.
    assert tracker.update(np.array([[51, 0, 61, 10], [1, 0, 11, 10]], np.float32)).tolist() == [1, 0]
    assert tracker.update(np.zeros((0, 4), np.float32)).tolist() == []
    # After a frame without faces the face is new again.
    assert tracker.update(np.array([left], np.float32)).tolist() == [2]

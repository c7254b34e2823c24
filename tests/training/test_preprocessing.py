"""One preprocessing from every training database to ``annotate run``: the deployment's aligned crop.

The central check: for the same real face, the tensor an exported student receives from the
training evaluation path (a ``Sample`` with a face box, through ``make_eval_loader``) and the
tensor it receives in ``annotate run`` (the pipeline's stages on the same frame) are equal
element for element (``torch.equal`` on the float32 tensors: both are the output of one function
on the same pixels and landmarks, so no tolerance is needed and none is allowed).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from annotator.config import RunConfig
from annotator.pipeline import VideoPipeline
from engines.align import CROP_SIZE, TEMPLATE_112, align_faces, apply, similarity_matrices
from engines.decoders import Sampling
from engines.factory import create_detector, lookup
from engines.models.student import PREPROCESSING, build_student
from training import checkpoint
from training.config import DEPLOYED_CROP, ConfigError, TrainConfig, load_config
from training.datasets import alignment
from training.datasets.alignment import box_landmarks, five_from_68, with_landmarks
from training.datasets.images import MAX_SCALE, MAX_SHIFT, FaceDataset, jitter_matrix
from training.export import export_student
from training.labels import Sample
from training.loaders import make_eval_loader


@pytest.fixture(scope="module")
def exported_student(tmp_path_factory) -> Path:
    """A tiny student (random weights) exported exactly as ``annotate export`` does."""
    root = tmp_path_factory.mktemp("student")
    torch.manual_seed(0)
    checkpoint.save_atomic({"arch": {"backbone": "tiny"}, "model": build_student("tiny").state_dict(), "metrics": {}},
                           root / "best.pt")
    export_student(root / "best.pt", root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def detector():
    return create_detector(alignment.DETECTOR, "onnxrt")[0]


class _Recorder:
    """Wraps a callable and keeps what it was called with (a runtime's input, a stage's batch)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def __call__(self, value):
        self.calls.append(value)
        return self.inner(value)

    def __getattr__(self, name):  # a runtime's output_names, for the scorer's has_va
        return getattr(self.inner, name)


def test_eval_input_equals_annotate_run_input(carphone, exported_student, tmp_path):
    # annotate run on the carphone clip with the exported student; every sampled frame a keyframe.
    config = RunConfig(inputs=(carphone,), out=tmp_path / "out.parquet", workers=0, device="cpu",
                       scorer=str(exported_student), sampling=Sampling(every_n=30), detect_every=1)
    pipeline = VideoPipeline(config)
    pipeline.scorer.runtime = runtime = _Recorder(pipeline.scorer.runtime)
    pipeline.score = stage = _Recorder(pipeline.score)
    for _ in pipeline.annotate(carphone):
        pass
    received = torch.cat([call for call in runtime.calls])  # what the student got in annotate run
    faces = stage.calls

    # The same frames as image files (PNG: lossless), each face given by its box only, as ExpW or
    # AffectNet give them; training re-finds the landmarks itself.
    samples = []
    for batch, found in enumerate(faces):
        for face, frame in enumerate(found.frame_of_face):
            path = tmp_path / f"{batch}-{frame}.png"
            Image.fromarray(found.frames.frames[frame].numpy()).save(path)
            box = tuple(int(round(float(v))) for v in found.boxes[face])
            samples.append(Sample(path, expr=0, box=box))
    assert len(samples) == len(received) >= 4
    loader = make_eval_loader(samples, TrainConfig(backbone="tiny", num_workers=0, batch_size=len(samples)))
    [(evaluated, _, _)] = list(loader)

    assert evaluated.dtype == received.dtype == torch.float32 and evaluated.shape == (len(samples), 3, 112, 112)
    assert torch.equal(evaluated, received)


def test_aligned_crops_from_another_aligner_are_redetected(detector, tmp_path):
    """Aff-Wild2 ships crops cut by its own aligner: the face is found again and re-aligned."""
    import skimage.data

    frame = torch.from_numpy(skimage.data.astronaut())
    [found] = detector.detect(frame[None])
    # A crop of the astronaut zoomed out 1.25x (another aligner's geometry), as a JPEG release frame.
    matrices = similarity_matrices(found.landmarks[:1])
    zoom = np.array([[0.8, 0, 0.2 * 55.5], [0, 0.8, 0.2 * 55.5], [0, 0, 1]])
    other = (zoom @ np.vstack([matrices[0], [0, 0, 1]]))[None, :2].astype(np.float32)
    from engines.align import warp

    crop = warp(frame[None], np.zeros(1, np.int64), other, CROP_SIZE)[0]
    path = tmp_path / "00001.jpg"
    Image.fromarray(crop.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(path, quality=95)
    [sample] = with_landmarks([Sample(path, expr=4)], detector_factory=lambda: detector)
    # Its landmarks are the astronaut's (refined in the crop window, as annotate run aligns every
    # face), as seen in the crop: aligning on them undoes the zoom.
    from engines.refind import refind

    refined, _ = refind(detector, frame[None], np.zeros(1, np.int64), found.boxes[:1])
    expected = apply(other.astype(np.float64), refined.landmarks[:1].astype(np.float64))[0]
    # Both re-found at the crop window's scale (the face ~64 px) in two different images (one a
    # resampled JPEG): within 3 px of 112 at every point (measured 2.4 at a mouth corner).
    assert np.abs(np.asarray(sample.landmarks) - expected).max() < 3.0
    realigned = FaceDataset([sample], train=False)[0][0]
    reference = align_faces(frame[None], np.zeros(1, np.int64), refined.landmarks[:1])[0]
    # Grey levels: JPEG, two resamplings and landmarks re-found at the crop window's scale in two
    # different images apart (measured 14.4; the same face's crops from full-frame and from re-found
    # landmarks differ by 17), while the foreign crop is far off.
    assert (realigned - reference).abs().mean() < 16
    assert (crop - reference).abs().mean() > 2 * float((realigned - reference).abs().mean())


def test_box_fallback_places_faces_as_retinaface_does(carphone, detector):
    """Faces RetinaFace misses are aligned from their box; on faces it finds, that lands close."""
    from engines.decoders.pyav import decode

    frames = torch.cat([b.frames for b in decode(carphone, Sampling(every_n=10), 16)])
    found = [d for d in detector.detect(frames) if len(d)]
    assert len(found) >= 10
    truth = np.stack([d.landmarks[0] for d in found])
    guess = np.stack([box_landmarks(d.boxes[0]) for d in found])
    # The crop's scale: the same on average (the box says nothing of the head's roll, so single
    # points still move: under 10 px of the 112 crop, measured 7.9 on this tilted head).
    truth_scale, guess_scale = (np.sqrt(np.abs(np.linalg.det(similarity_matrices(p)[:, :, :2]))) for p in (truth, guess))
    assert abs(float(np.mean(guess_scale / truth_scale)) - 1) < 0.02
    matrices = similarity_matrices(truth)
    error = np.linalg.norm(apply(matrices, guess) - apply(matrices, truth), axis=-1)
    assert error.mean() < 10.0, error.mean(axis=0)
    # Taking the box for the whole crop (what cropping a box and resizing does) zooms faces in.
    naive = np.stack([d.boxes[0, :2] + TEMPLATE_112 / CROP_SIZE * (d.boxes[0, 2:] - d.boxes[0, :2]) for d in found])
    naive_scale = np.sqrt(np.abs(np.linalg.det(similarity_matrices(naive.astype(np.float32))[:, :, :2])))
    assert float(np.mean(naive_scale / truth_scale)) > 1.1


def test_landmarks_are_detected_once_and_cached(detector, tmp_path, caplog):
    import skimage.data

    image = tmp_path / "photos" / "astronaut.png"
    image.parent.mkdir()
    Image.fromarray(skimage.data.astronaut()).save(image)
    noise = tmp_path / "photos" / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(noise)
    samples = [Sample(image, expr=4, box=(170, 50, 280, 190)), Sample(noise, expr=0, box=(10, 10, 50, 60))]
    built = []

    def factory():
        built.append(1)
        return detector

    with caplog.at_level(logging.WARNING):
        first = with_landmarks(samples, cache_dir=tmp_path / "cache", detector_factory=factory)
    from engines.refind import refind

    frame = torch.from_numpy(skimage.data.astronaut())[None]
    [found] = detector.detect(frame)
    expected, _ = refind(detector, frame, np.zeros(1, np.int64), found.boxes[:1])  # refined, as annotate run does
    assert np.allclose(first[0].landmarks, expected.landmarks[0], atol=1e-3)
    assert np.allclose(first[1].landmarks, box_landmarks((10, 10, 50, 60)))  # no face in noise: its box
    assert "1 of 2 samples had no face" in caplog.text
    assert with_landmarks(samples, cache_dir=tmp_path / "cache", detector_factory=factory) == first
    assert len(built) == 1  # the second pass read the cache
    os.utime(image, ns=(0, 0))  # a replaced file is detected again
    with_landmarks(samples, cache_dir=tmp_path / "cache", detector_factory=factory)
    assert len(built) == 2
    shipped = Sample(image, landmarks=tuple(map(tuple, TEMPLATE_112.tolist())))
    assert with_landmarks([shipped], detector_factory=lambda: pytest.fail("shipped landmarks need no detector")) == [shipped]


def test_five_from_68_takes_eye_centres_nose_tip_and_mouth_corners():
    points = np.arange(136, dtype=float).reshape(68, 2)
    five = five_from_68(points)
    assert five.tolist() == [[77.0, 78.0], [89.0, 90.0], [60.0, 61.0], [96.0, 97.0], [108.0, 109.0]]
    with pytest.raises(ValueError, match="68"):
        five_from_68(points[:5])


def test_training_jitter_keeps_the_deployed_scale_and_position_on_average():
    generator = torch.Generator().manual_seed(0)
    matrices = np.stack([jitter_matrix(generator) for _ in range(4000)])
    scale = matrices[:, 0, 0]
    centre = (CROP_SIZE - 1) / 2
    shift = matrices[:, :2, 2] - (1 - scale)[:, None] * centre  # translation of the crop's centre
    assert abs(scale.mean() - 1) < 0.002 and np.abs(scale - 1).max() <= MAX_SCALE
    assert np.abs(shift.mean(axis=0)).max() < 0.25 and np.abs(shift).max() <= MAX_SHIFT
    assert np.allclose(matrices[:, 0, 1], 0) and np.allclose(matrices[:, 1, 0], 0)  # no rotation or skew


def test_train_and_eval_differ_only_by_the_augmentation(tmp_path):
    import skimage.data

    path = tmp_path / "a.png"
    Image.fromarray(skimage.data.astronaut()).save(path)
    lmk = box_landmarks((177, 60, 270, 181))
    sample = Sample(path, expr=4, landmarks=tuple(map(tuple, lmk.tolist())))
    evaluated = FaceDataset([sample], train=False)[0][0]
    assert torch.equal(evaluated, align_faces(torch.from_numpy(skimage.data.astronaut())[None],
                                              np.zeros(1, np.int64), lmk[None])[0])
    torch.manual_seed(0)
    trained = torch.stack([FaceDataset([sample], train=True)[0][0] for _ in range(64)])
    assert not torch.equal(trained[0], evaluated)
    # Averaged over draws (flips undone by symmetry of the mean), the face stays where eval puts it:
    # the mean training crop correlates best with the eval crop at zero offset, not zoomed.
    mean = trained.mean(0).mean(0)
    target = (evaluated.mean(0) + evaluated.mean(0).flip(-1)) / 2
    zoomed = torch.nn.functional.interpolate(target[None, None], size=134, mode="bilinear")[0, 0, 11:123, 11:123]
    assert (mean - target).abs().mean() < (mean - zoomed).abs().mean()


def test_config_ignores_resize_size_and_fixes_the_crop(tmp_path, caplog):
    assert DEPLOYED_CROP == CROP_SIZE == PREPROCESSING["crop_size"]
    path = tmp_path / "old.toml"
    path.write_text("image_size = 112\nresize_size = 134\n")
    with caplog.at_level(logging.WARNING):
        config = load_config(path)
    assert config.image_size == 112 and not hasattr(config, "resize_size")
    assert f"{path}: 'resize_size' is ignored" in caplog.text
    path.write_text("image_size = 48\n")
    with pytest.raises(ConfigError, match=rf"^{path}: 'image_size' must be 112"):
        load_config(path)


def test_model_card_records_the_preprocessing_and_loading_checks_it(exported_student, tmp_path, caplog):
    card = json.loads((exported_student / "model_card.json").read_text())
    assert card["input"]["preprocessing"] == PREPROCESSING and card["input"]["shape"] == [3, 112, 112]
    lookup(str(exported_student), "scorer")
    other = tmp_path / "zoomed"
    other.mkdir()
    (other / "student.pt").write_bytes((exported_student / "student.pt").read_bytes())
    card["artifacts"] = {"torch": "student.pt"}
    card["input"]["preprocessing"] = {**PREPROCESSING, "resize": [134, 112]}
    (other / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r'"input.preprocessing" must be'):
        lookup(str(other), "scorer")
    del card["input"]["preprocessing"]  # an export from before the record: loads, with a warning
    (other / "model_card.json").write_text(json.dumps(card))
    with caplog.at_level(logging.WARNING):
        assert lookup(str(other), "scorer").architecture == "student"
    assert "zoomed 1.2x" in caplog.text

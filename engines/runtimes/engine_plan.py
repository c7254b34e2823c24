"""What a TensorRT engine is built for, and how calls fit it: profile shapes, chunks, memory.

Pure arithmetic (no TensorRT, no GPU), so every number here is tested on any machine.

An engine's optimisation profile fixes the largest input it accepts, and with TensorRT's
default (static) allocation each execution context reserves the activations of that largest
input up front. A profile sized for "anything" (256 frames of 1280x1280) reserves ~20 GiB for
the detector's first expand convolution alone; so the profile follows the run: ``opt`` is the
run's own batch at its detector size, ``max`` the batch rounded up to a power of two (a bucket,
so nearby batch sizes share one cached engine) within :data:`DETECTOR_ACTIVATION_BUDGET`.
Larger calls (a crowd's faces, the crops of many tracks, a batch beyond the budget) are cut
into chunks the profile accepts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Shape = tuple[int, int, int, int]

#: RetinaFace needs sides in multiples of 32 (its coarsest stride).
SIDE_MULTIPLE = 32
#: The scorer's input: aligned 112x112 crops.
CROP_SIDE = 112
#: Largest face batch of a scorer engine: a crowd's faces are scored in chunks of this many.
#: A crop's activations are ~2.5 MB in FP16, so 256 crops cost ~0.6 GiB.
SCORER_MAX_BATCH = 256
#: Detector activations one engine may reserve; more frames than fit are run in chunks.
DETECTOR_ACTIVATION_BUDGET = 4 << 30
#: Detector engine memory per input pixel (FP16): MobileNetV2's stem (32 channels) and first
#: expand convolution (96 channels) at half resolution are live together, 128 * 1/4 values of
#: 2 bytes = 64 B per input pixel, plus the FP16 input and the float32 letterboxed batch it is
#: cast from (6 + 12 B), rounded up.
DETECTOR_BYTES_PER_PIXEL = 96
#: Scorer engine memory per crop (FP16 activations of a 112x112 MobileNet-class student).
SCORER_BYTES_PER_CROP = int(2.5 * 2**20)
#: A worker's fixed GPU cost: CUDA context, torch's allocator slack, cuDNN/TensorRT runtime.
ACTOR_BASE_BYTES = int(0.75 * 2**30)
#: Frames the decoder holds per batch: DALI's sequence and the batch the stages work on.
DECODED_BATCHES_HELD = 2


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def batch_bucket(batch: int) -> int:
    """The smallest power of two >= ``batch``: one cached engine serves a range of batch sizes."""
    return 1 << max(0, math.ceil(math.log2(max(1, batch))))


@dataclass(frozen=True)
class EngineShapes:
    """One optimisation profile: ``min``, ``opt`` and ``max`` NCHW input shapes."""

    min: Shape
    opt: Shape
    max: Shape

    @property
    def max_batch(self) -> int:
        return self.max[0]

    @property
    def key(self) -> str:
        """Part of the engine's cache file name: an engine is valid for exactly these shapes."""
        return f"b{self.opt[0]}-{self.max[0]}-{self.opt[2]}x{self.opt[3]}-{self.max[2]}x{self.max[3]}"

    def check(self, shape: tuple[int, ...]) -> None:
        """Raise one line when an input's height or width falls outside the profile (batch is chunked)."""
        low, high = self.min[2:], self.max[2:]
        if not all(lo <= s <= hi for s, lo, hi in zip(shape[2:], low, high)):
            raise ValueError(f"input {'x'.join(map(str, shape))} is outside the engine's profile "
                             f"({low[0]}x{low[1]} to {high[0]}x{high[1]}); it was built for another --det-size")


def detector_side_cap(det_size: int) -> int:
    """The padded long side of every detector input of a run with ``--det-size det_size``."""
    return round_up(det_size, SIDE_MULTIPLE)


def detector_shapes(batch_size: int, det_size: int, budget: int = DETECTOR_ACTIVATION_BUDGET) -> EngineShapes:
    """The detector's profile for a run: ``opt`` = the run's batch of 16:9 frames at ``det_size``.

    ``max`` is square (portrait and landscape videos share the engine) with the batch's bucket,
    cut to what ``budget`` holds at that side (at least one frame: --det-size 4096 gets 2).
    """
    side = detector_side_cap(det_size)
    per_frame = DETECTOR_BYTES_PER_PIXEL * side * side
    max_batch = max(1, min(batch_bucket(batch_size), budget // per_frame))
    opt_batch = min(batch_size, max_batch)
    opt_height = max(SIDE_MULTIPLE, round_up(side * 9 // 16, SIDE_MULTIPLE))
    return EngineShapes(min=(1, 3, SIDE_MULTIPLE, SIDE_MULTIPLE), opt=(opt_batch, 3, opt_height, side),
                        max=(max_batch, 3, side, side))


def scorer_shapes(batch_size: int) -> EngineShapes:
    """The scorer's profile: ``opt`` one face per frame of the run's batch, ``max`` a fixed chunk."""
    opt = min(batch_bucket(batch_size), SCORER_MAX_BATCH)
    return EngineShapes(min=(1, 3, CROP_SIDE, CROP_SIDE), opt=(opt, 3, CROP_SIDE, CROP_SIDE),
                        max=(SCORER_MAX_BATCH, 3, CROP_SIDE, CROP_SIDE))


def activation_bytes(kind: str, shapes: EngineShapes) -> int:
    """Estimated device memory of one execution context sized for ``shapes.max``."""
    batch, _, height, width = shapes.max
    if kind == "detector":
        return DETECTOR_BYTES_PER_PIXEL * batch * height * width
    return SCORER_BYTES_PER_CROP * batch


@dataclass(frozen=True)
class ActorMemory:
    """Estimated peak GPU memory of one worker (one decode pipeline plus its engines), in bytes."""

    base: int
    frames: int
    detector: int
    scorer: int

    @property
    def total(self) -> int:
        return self.base + self.frames + self.detector + self.scorer

    def describe(self) -> str:
        gib = 2**30
        return (f"~{self.total / gib:.1f} GiB per actor (frames {self.frames / gib:.2f}, detector "
                f"{self.detector / gib:.2f}, scorer {self.scorer / gib:.2f}, runtime {self.base / gib:.2f})")


def actor_memory(batch_size: int, det_size: int, frame_pixels: int = 1920 * 1080) -> ActorMemory:
    """GPU memory of one actor at the run's options, for ``frame_pixels``-pixel video (1080p default).

    ``det_size``: the longest side the detector is called with (a scan's, twice --det-size, when
    the run scans), which sizes its engine's profile."""
    detector = detector_shapes(batch_size, det_size)
    return ActorMemory(
        base=ACTOR_BASE_BYTES,
        frames=DECODED_BATCHES_HELD * batch_size * frame_pixels * 3,
        detector=activation_bytes("detector", detector),
        scorer=activation_bytes("scorer", scorer_shapes(batch_size)),
    )


def run_in_chunks(call: Callable[[torch.Tensor], dict[str, torch.Tensor]], batch: torch.Tensor,
                  max_batch: int) -> dict[str, torch.Tensor]:
    """``call`` on slices of at most ``max_batch`` along dim 0, outputs concatenated in order."""
    if len(batch) <= max_batch:
        return call(batch)
    import torch

    parts = [call(batch[start:start + max_batch]) for start in range(0, len(batch), max_batch)]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

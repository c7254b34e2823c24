"""Which decoder reads which file: DALI (NVDEC, or its CPU reader) where it can, PyAV otherwise.

A pure decision over a :class:`~engines.decoders.probe.StreamInfo`, so the whole table is tested
without a GPU. What DALI can decode depends on the GPU: NVDEC hardware differs by generation
(the A100's and H100's have no AV1, an L4's has), and NVDEC outputs 8-bit 4:2:0 for DALI's RGB
conversion. What it cannot decode, PyAV (FFmpeg on the CPU) decodes, so a file is never refused
for its codec; the reason is logged.

Sources: NVIDIA's Video Codec SDK support matrix (NVDEC engines and codecs per GPU) and DALI's
video operator documentation (DALI 2.4: the CPU backend decodes VP8, VP9 and MJPEG only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from engines.decoders.probe import StreamInfo

DecoderKind = Literal["pyav", "dali-gpu", "dali-cpu"]


@dataclass(frozen=True)
class GpuVideo:
    """One GPU family's video hardware: NVDEC engines, AV1 support, memory (GiB, smallest model)."""

    nvdec: int
    av1: bool
    memory_gib: int


#: Data-centre GPUs by the family name in ``torch.cuda.get_device_name`` / Ray's
#: ``accelerator_type``; longest names first so "L40S" is not read as "L4".
GPU_VIDEO: dict[str, GpuVideo] = {
    "H200": GpuVideo(nvdec=7, av1=False, memory_gib=141),
    "H100": GpuVideo(nvdec=7, av1=False, memory_gib=80),
    "A100": GpuVideo(nvdec=5, av1=False, memory_gib=40),
    "L40S": GpuVideo(nvdec=3, av1=True, memory_gib=48),
    "A10G": GpuVideo(nvdec=1, av1=True, memory_gib=24),
    "L40": GpuVideo(nvdec=3, av1=True, memory_gib=48),
    "A30": GpuVideo(nvdec=4, av1=False, memory_gib=24),
    "A10": GpuVideo(nvdec=2, av1=True, memory_gib=24),
    "L4": GpuVideo(nvdec=4, av1=True, memory_gib=24),
    "T4": GpuVideo(nvdec=2, av1=False, memory_gib=16),
}

#: Codecs NVDEC decodes for DALI on every GPU listed (AV1 only where :class:`GpuVideo` says).
NVDEC_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "mpeg4", "mjpeg"})
#: DALI's CPU video decoder (2.4): these three only.
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
#: Demuxers DALI's video operators are documented and tested with; a transport stream, FLV,
#: MPEG-PS or Y4M goes to PyAV rather than risk a half-read file.
DALI_CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi"})


def gpu_family(name: str | None) -> str | None:
    """The :data:`GPU_VIDEO` key in a GPU or accelerator name ("NVIDIA H100 80GB HBM3" → H100)."""
    if not name:
        return None
    upper = name.upper()
    for family in GPU_VIDEO:  # insertion order: longest names first
        if re.search(rf"(?<![A-Z0-9]){family}(?![A-Z0-9])", upper):
            return family
    return None


@dataclass(frozen=True)
class DecoderChoice:
    """The decoder for one file and why (logged, so a user sees why a file went to the CPU)."""

    kind: DecoderKind
    reason: str


def choose_decoder(info: StreamInfo, requested: str, device: str, gpu_name: str | None,
                   dali_installed: bool, deinterlace: bool = True) -> DecoderChoice:
    """Pick the decoder of one file.

    Args:
        info: the file's probe.
        requested: ``--decoder``: ``auto``, ``pyav`` or ``dali``.
        device: the worker's device, ``cpu`` or ``cuda[:N]``.
        gpu_name: the CUDA device's name (None on a CPU, or unknown).
        dali_installed: whether ``nvidia.dali`` imports.
        deinterlace: ``--deinterlace``: interlaced video is made progressive, which only PyAV does.

    ``auto`` on a CPU keeps PyAV (DALI's CPU reader is no faster and reads three codecs);
    ``dali`` on a CPU uses DALI's CPU reader for those three, so its graph runs on any machine.
    """
    if requested == "pyav":
        return DecoderChoice("pyav", "--decoder pyav")
    on_gpu = device.startswith("cuda")
    if not on_gpu and requested != "dali":
        return DecoderChoice("pyav", "no GPU: PyAV decodes on the CPU")
    if not dali_installed:
        return DecoderChoice("pyav", "NVIDIA DALI is not installed (pip install 'video-annotator[gpu]')")
    where = "DALI's CPU reader"
    if on_gpu:
        family = gpu_family(gpu_name)
        where = f"NVDEC on {gpu_name or 'this GPU'}"
        codecs = NVDEC_CODECS | ({"av1"} if family is None or GPU_VIDEO[family].av1 else set())
    else:
        codecs = DALI_CPU_CODECS
    if info.codec not in codecs:
        return DecoderChoice("pyav", f"{where} has no {info.codec} decoder")
    if info.container not in DALI_CONTAINERS:
        return DecoderChoice("pyav", f"container {info.container.split(',')[0]} is not one DALI reads (mp4/mov, mkv/webm, avi)")
    if info.bit_depth != 8 or info.chroma != "420":
        return DecoderChoice("pyav", f"{info.bit_depth}-bit {info.chroma}: DALI decodes 8-bit 4:2:0 only")
    if info.hdr:
        return DecoderChoice("pyav", f"HDR: PyAV shows it as SDR ({info.hdr}), DALI cannot")
    if deinterlace and info.interlaced:
        return DecoderChoice("pyav", "interlaced: PyAV makes it progressive (bwdif), DALI cannot "
                                     "(--no-deinterlace: DALI)")
    if info.sample_aspect != 1.0:
        return DecoderChoice("pyav", f"non-square pixels (sample aspect {info.sample_aspect:.3g}): PyAV shows them "
                                     "square, DALI decodes them as stored")
    return DecoderChoice("dali-gpu" if on_gpu else "dali-cpu", f"{info.describe()}: {where}")


def pipelines_per_gpu(accelerator: str | None, requested: int | None, actor_bytes: int) -> int:
    """Decode pipelines (actors) per GPU: ``--pipelines-per-gpu``, else one per NVDEC engine.

    One NVDEC engine decodes one stream at a time; an H100 has 7, so one pipeline uses a
    seventh of its decoders. The default is the engine count where the GPU is known (1
    otherwise), capped so the actors' estimated memory (``actor_bytes`` each) fits in 90 %
    of the GPU's.
    """
    if requested is not None:
        return requested
    family = gpu_family(accelerator)
    if family is None:
        return 1
    video = GPU_VIDEO[family]
    by_memory = int(0.9 * video.memory_gib * 2**30 // max(actor_bytes, 1))
    return max(1, min(video.nvdec, by_memory))

"""Probing a video file through PyAV (FFmpeg's demuxers and decoders): content hash, size, frame rate, frame count
and duration, without decoding every frame.

The file is read once through one descriptor (a FIFO or device is refused before any read, as for images): hashed,
then handed to PyAV. The container's header gives size, rate and duration; the packets are then demuxed (read, not
decoded) to count the frames really present, so a file cut short is caught even when its header promises every
frame; only the first frame is decoded, to prove the codec reads it. A file FFmpeg cannot open, without a video
stream, or holding fewer frames than its header states is skipped with the reason.
"""

from __future__ import annotations

import hashlib
import os
import stat as statmod
from fractions import Fraction

from .scan import MAX_IMAGE_PIXELS, Probe
from .walk import FileStat, printable, special_kind

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"})
_CHUNK = 1 << 20


def is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def _rate(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(Fraction(container.duration, 1_000_000))
    return 0.0


def _corrupt(base: dict, exc: Exception) -> Probe:
    return Probe(**base, error="corrupt_video", detail=f"{type(exc).__name__}: {exc}")


def probe_video(stat: FileStat) -> Probe:
    """Hash and inspect one video file. Never raises for a bad file: the result carries the skip reason."""
    base = {"path": stat.path, "size": stat.size, "mtime_ns": stat.mtime_ns}
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(stat.path, flags)
    except OSError as exc:
        return Probe(**base, error="unreadable", detail=f"{type(exc).__name__}: {exc.strerror or exc}")
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not statmod.S_ISREG(info.st_mode):
            kind = special_kind(info.st_mode) or "a folder"
            return Probe(**base, error="special_file", detail=f"{printable(stat.path)} is {kind}, not a regular file")
        digest, size = hashlib.sha256(), 0
        try:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
            handle.seek(0)
        except OSError as exc:
            return Probe(**base, error="unreadable", detail=f"{type(exc).__name__}: {exc.strerror or exc}")
        if not size:
            return Probe(**base, error="empty_file", detail="the file has zero bytes")
        base.update(size=size, sha256=digest.hexdigest())
        return _inspect(handle, base)


def _inspect(handle, base: dict) -> Probe:
    import av

    try:
        container = av.open(handle, mode="r")
    except (av.FFmpegError, ValueError, OSError) as exc:
        return Probe(**base, error="corrupt_video", detail=f"FFmpeg cannot read it (damaged, or not a video): {exc}")
    with container:
        if not container.streams.video:
            return Probe(**base, error="not_a_video", detail="the file holds no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            return Probe(**base, error="corrupt_video", detail=f"the stream states a frame size of {width}x{height}")
        if width * height > MAX_IMAGE_PIXELS:
            return Probe(**base, error="decompression_bomb", detail=f"{width}x{height} is over {MAX_IMAGE_PIXELS} "
                                                                    "pixels per frame")  # fmt: skip
        stated, fps, duration = stream.frames, _rate(stream), _duration(container, stream)
        try:
            packets, first = _count_packets(container, stream)
        except (av.FFmpegError, ValueError, OSError, EOFError) as exc:
            return _corrupt(base, exc)
        if stated and packets < stated:
            return Probe(**base, error="truncated_video",
                         detail=f"the header states {stated} frames but only {packets} are in the file (cut short?)"
                                + (f"; the first frame does not decode: {first}" if first else ""))  # fmt: skip
        if first is not None:
            return Probe(**base, error="corrupt_video", detail=f"the first frame does not decode: {first}")
        if packets == 0:
            return Probe(**base, error="corrupt_video", detail="the video stream holds no frames")
        fmt = f"video/{stream.codec_context.name}"
    return Probe(**base, width=width, height=height, format=fmt, frames=packets, fps=fps,
                 duration=duration or (packets / fps if fps else 0.0))  # fmt: skip


def _count_packets(container, stream) -> tuple[int, str | None]:
    """Frames in the stream, counted by demuxing (no decoding), and why the first frame failed to decode (None when
    it decodes)."""
    packets, problem, decoded = 0, None, False
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream marker
            continue
        packets += 1
        if not decoded and problem is None:
            try:
                decoded = bool(stream.codec_context.decode(packet))
            except Exception as exc:  # noqa: BLE001 - any decoder failure makes the video unusable
                problem = f"{type(exc).__name__}: {exc}"
    if not decoded and problem is None and packets:
        try:  # the decoder may hold the first frame until it is flushed
            decoded = bool(stream.codec_context.decode(None))
        except Exception as exc:  # noqa: BLE001
            problem = f"{type(exc).__name__}: {exc}"
        if not decoded and problem is None:
            problem = "the decoder returned no frame"
    return packets, problem

"""Find image files and probe them: content hash, size after EXIF orientation, and integrity, from headers only.

Probing reads each file once: the bytes are hashed (the sample id is the sha256 of the image bytes) and PIL parses
the header from memory. Integrity is checked without decoding pixels: a JPEG must end with its EOI marker, a PNG with
its IEND chunk, a WebP's RIFF size must match the file. Only files that fail those cheap checks (or formats without
one) are decoded to decide. Work is spread over processes; a previous scan index lets unchanged files (same path, size
and mtime) skip the probe entirely.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .walk import FileStat, Listing, NotRegularFile, read_regular_file, walk

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
# PIL's own threshold for decompression-bomb warnings (about 89 megapixels); larger images are skipped.
MAX_IMAGE_PIXELS = 89_478_485
_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_INLINE_LIMIT = 64  # below this many files a process pool costs more than it saves


@dataclass(frozen=True)
class Probe:
    """What prepare needs to know about one file; `error` is a skip reason when the file is unusable."""

    path: str
    size: int
    mtime_ns: int
    sha256: str = ""
    width: int = 0
    height: int = 0
    orientation: int = 1
    format: str = ""
    error: str = ""
    detail: str = ""
    # Videos only (`video_probe`): frames in the file, frames per second, seconds.
    frames: int = 0
    fps: float = 0.0
    duration: float = 0.0


def list_files(root: Path, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> Listing:
    """Files under `root` whose suffix is in `extensions`, sorted, and the entries left out with their reasons
    (hidden entries are ignored; see `walk` for links, loops and special files)."""
    return walk(root, extensions)


def _intact(data: bytes, fmt: str) -> bool | None:
    """Cheap end-of-stream checks; None when the format has none."""
    if fmt == "JPEG":
        return data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if fmt == "PNG":
        return data.endswith(b"IEND\xaeB`\x82")
    if fmt == "WEBP":
        return len(data) >= 12 and struct.unpack("<I", data[4:8])[0] + 8 <= len(data)
    return None


def probe_file(stat: FileStat) -> Probe:
    """Hash and inspect one image (or video) file. Never raises for a bad file: the result carries the skip
    reason."""
    from PIL import Image, UnidentifiedImageError

    from .video_probe import is_video, probe_video

    if is_video(stat.path):
        return probe_video(stat)

    base = {"path": stat.path, "size": stat.size, "mtime_ns": stat.mtime_ns}
    try:
        data = read_regular_file(stat.path)
    except NotRegularFile as exc:
        return Probe(**base, error="special_file", detail=str(exc))
    except OSError as exc:
        return Probe(**base, error="unreadable", detail=f"{type(exc).__name__}: {exc.strerror or exc}")
    if not data:
        return Probe(**base, error="empty_file", detail="the file has zero bytes")
    digest = hashlib.sha256(data).hexdigest()
    base.update(size=len(data), sha256=digest)
    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit below; PIL's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            width, height, fmt = img.size[0], img.size[1], img.format or ""
            if width * height > MAX_IMAGE_PIXELS:
                return Probe(
                    **base,
                    error="decompression_bomb",
                    detail=f"{width}x{height} is over {MAX_IMAGE_PIXELS} pixels",
                )
            orientation = 1
            if fmt in ("JPEG", "WEBP", "TIFF", "PNG", "MPO"):
                orientation = int(img.getexif().get(_ORIENTATION_TAG, 1) or 1)
            intact = _intact(data, "JPEG" if fmt == "MPO" else fmt)
            if not intact:
                # No cheap check says it is whole: decode it to find out.
                img.load()
    except Image.DecompressionBombError as exc:
        return Probe(**base, error="decompression_bomb", detail=str(exc))
    except UnidentifiedImageError:
        return Probe(**base, error="not_an_image", detail="not a readable image despite its extension")
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as exc:
        return Probe(**base, error="corrupt_image", detail=f"{type(exc).__name__}: {exc}")
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return Probe(**base, width=width, height=height, orientation=orientation, format=fmt)


def _probe_chunk(stats: list[FileStat]) -> list[Probe]:
    return [probe_file(s) for s in stats]


def probe_files(
    stats: list[FileStat], workers: int | None = None, progress: Callable[[int], None] | None = None
) -> list[Probe]:
    """Probe many files in parallel processes; results in input order."""
    if not stats:
        return []
    workers = max(1, workers or os.cpu_count() or 1)
    if workers == 1 or len(stats) < _INLINE_LIMIT:
        results = []
        for s in stats:
            results.append(probe_file(s))
            if progress:
                progress(1)
        return results
    chunk = max(16, min(256, len(stats) // (workers * 8) or 16))
    chunks = [stats[i : i + chunk] for i in range(0, len(stats), chunk)]
    import multiprocessing

    results = []
    context = multiprocessing.get_context("fork") if hasattr(os, "fork") else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for part in pool.map(_probe_chunk, chunks):
            results.extend(part)
            if progress:
                progress(len(part))
    return results

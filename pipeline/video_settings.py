"""The `video` block of a `dataset_type: video` entry, read as SimpleTuner reads it.

- `num_frames`: frames per training sample; unset, `framerate * 5` (five seconds at the global `framerate`; unset,
  the family's frame rate, `family_framerate`, and 30 for a family without one). The sample's frame window is the
  video's first `num_frames` frames (SimpleTuner keeps `frames[:num_frames]`; it neither strides nor resamples by
  frame rate).
- `min_frames`: shorter videos are skipped; unset, `num_frames`; it may not be below `num_frames`.
- `max_frames`: longer videos are skipped; unset, no limit.
- `is_i2v`: image-to-video training on this dataset, read by the video families' training; unset, true for
  model_family ltxvideo, forced true for Wan's `i2v-*` flavours, false otherwise.
- `bucket_strategy`: `aspect_ratio` (buckets `WxH@num_frames`) or `resolution_frames` (buckets `WxH@F`, F the video's
  frame count rounded down to `frame_interval`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .config import suggest
from .errors import ConfigError

VIDEO_KEYS = ("num_frames", "min_frames", "max_frames", "is_i2v", "bucket_strategy", "frame_interval")
BUCKET_STRATEGIES = ("aspect_ratio", "resolution_frames")
DEFAULT_FRAMERATE = 30  # SimpleTuner's data backends' framerate when the model sets none
DEFAULT_SECONDS = 5
# The `framerate` SimpleTuner's check_user_config sets when it is unset (models/ltxvideo, models/wan), before the
# data backends read it: LTXPipeline's frame_rate default, and Wan's.
FAMILY_FRAMERATES = {"ltxvideo": 25, "wan": 15}


def family_framerate(framerate: float | None, model_family: str | None) -> float | None:
    """The run's frame rate: `framerate`, else the family's (FAMILY_FRAMERATES), else None."""
    if framerate is not None:
        return framerate
    return FAMILY_FRAMERATES.get((model_family or "").lower())


@dataclass(frozen=True)
class VideoSettings:
    num_frames: int
    min_frames: int
    max_frames: int | None
    is_i2v: bool
    bucket_strategy: str = "aspect_ratio"
    frame_interval: int | None = None

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def bucket_frames(self, frame_count: int) -> int:
        """The frame count in a video's bucket key."""
        if self.bucket_strategy == "aspect_ratio":
            return self.num_frames
        if self.frame_interval:
            rounded = frame_count // self.frame_interval * self.frame_interval
            return rounded or frame_count
        return frame_count


def _count(block: dict[str, Any], key: str, where: str) -> int | None:
    value = block.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: video.{key} must be a whole number of frames of at least 1, got {value!r}")
    return value


def _default_i2v(model_family: str | None, model_flavour: str | None) -> tuple[bool, bool]:
    """(is_i2v, forced) as SimpleTuner decides it when the block leaves it unset or the flavour forces it."""
    family, flavour = (model_family or "").lower(), (model_flavour or "").lower()
    forced = (family == "wan" and flavour.startswith("i2v-")) or (
        family in ("kandinsky5-video", "kandinsky5_video", "hunyuanvideo") and flavour.startswith("i2v"))
    return forced or family in ("ltxvideo", "ltxvideo2"), forced


def parse_video_block(block: Any, where: str, *, framerate: Any = None, model_family: str | None = None,
                      model_flavour: str | None = None) -> VideoSettings:  # fmt: skip
    """Validate a dataset's `video` block (None: absent) into VideoSettings, every error naming its key."""
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: 'video' must be an object with keys such as num_frames, got {block!r}")
    for key in block:
        if key not in VIDEO_KEYS:
            raise ConfigError(f"{where}: unknown video key '{key}'{suggest(str(key), VIDEO_KEYS)} (video keys: "
                              f"{', '.join(VIDEO_KEYS)})")  # fmt: skip
    rate = family_framerate(framerate, model_family) or DEFAULT_FRAMERATE
    if isinstance(rate, str):  # a .env config spells every value as text
        try:
            rate = float(rate)
        except ValueError:
            pass
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0:
        raise ConfigError(f"option 'framerate' must be a positive number of frames per second, got {framerate!r}")
    num_frames = _count(block, "num_frames", where) or int(rate * DEFAULT_SECONDS)
    min_frames = _count(block, "min_frames", where) or num_frames
    max_frames = _count(block, "max_frames", where)
    if min_frames < num_frames:
        raise ConfigError(f"{where}: video.min_frames ({min_frames}) is below video.num_frames ({num_frames}); a "
                          "video must hold at least the frames a sample takes: raise min_frames or lower num_frames")
    if max_frames is not None and max_frames < min_frames:
        raise ConfigError(f"{where}: video.max_frames ({max_frames}) is below video.min_frames ({min_frames}), so "
                          "every video would be skipped")  # fmt: skip
    strategy = block.get("bucket_strategy") or "aspect_ratio"
    if strategy not in BUCKET_STRATEGIES:
        raise ConfigError(f"{where}: video.bucket_strategy {strategy!r} is not one of {', '.join(BUCKET_STRATEGIES)}"
                          f"{suggest(str(strategy), BUCKET_STRATEGIES)}")  # fmt: skip
    interval = _count(block, "frame_interval", where)
    given_i2v = block.get("is_i2v")
    if given_i2v is not None and not isinstance(given_i2v, bool):
        raise ConfigError(f"{where}: video.is_i2v must be true or false, got {given_i2v!r}")
    default_i2v, forced = _default_i2v(model_family, model_flavour)
    is_i2v = True if forced else (default_i2v if given_i2v is None else given_i2v)
    return VideoSettings(num_frames, min_frames, max_frames, is_i2v, strategy, interval)


def check_crepa_family(crepa_enabled: bool, family: Any) -> None:
    """CREPA (`crepa_enabled`) aligns neighbouring video frames, so it needs a video family; `st check` and
    `st train` both refuse it for an image family before any model loads."""
    if crepa_enabled and not family.video:
        raise ConfigError(f"crepa_enabled is true, but CREPA aligns the hidden states of neighbouring video frames and "
                          f"model_family {family.name} trains images (one frame, no neighbours); CREPA is for the "
                          "video families (wan, ltxvideo): set crepa_enabled false")  # fmt: skip

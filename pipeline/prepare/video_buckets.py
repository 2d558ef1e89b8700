"""A video sample's frame window and bucket: the frame-count rules of the dataset's `video` block on top of the
image aspect-bucket rules (`buckets.plan` gives the frame size), so a video bucket is `WxH@F`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .buckets import Plan, Rejected
from .scan import Probe
from ..video_settings import VideoSettings


@dataclass(frozen=True)
class VideoFacts:
    """What prepare records of a video sample: the file's frames, rate and length, and the frames it trains on
    (`window_frames` frames from `window_start`)."""

    frames: int
    fps: float
    duration: float
    window_start: int
    window_frames: int


def frame_window(settings: VideoSettings, probe: Probe) -> VideoFacts:
    """The frames a sample takes (SimpleTuner's: the first num_frames), or Rejected when the video is outside
    min_frames .. max_frames."""
    if probe.frames < settings.min_frames:
        raise Rejected("too_few_frames", f"{probe.frames} frames, under video.min_frames {settings.min_frames}")
    if settings.max_frames is not None and probe.frames > settings.max_frames:
        raise Rejected("too_many_frames", f"{probe.frames} frames, over video.max_frames {settings.max_frames}")
    return VideoFacts(probe.frames, probe.fps, probe.duration, 0, settings.num_frames)


def video_plan(plan: Plan, settings: VideoSettings, facts: VideoFacts) -> Plan:
    """The image plan of the frames, its bucket extended by the frame count of the bucket strategy."""
    return dataclasses.replace(plan, frames=settings.bucket_frames(facts.frames))

"""A small generated dataset of captioned shapes, for `make demo` and the tests (no downloads needed)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 80, 220), "yellow": (235, 200, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30),
}  # fmt: skip
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}
# (width, height) of the generated images: squares, landscapes and portraits.
SIZES = ((128, 128), (160, 120), (120, 160), (192, 128), (128, 192), (144, 144))


def _draw(shape: str, colour: tuple, background: tuple, size: tuple[int, int], rng: random.Random):
    from PIL import Image, ImageDraw

    width, height = size
    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    r = min(width, height) * rng.uniform(0.25, 0.4)
    cx, cy = width / 2 + rng.uniform(-0.1, 0.1) * width, height / 2 + rng.uniform(-0.1, 0.1) * height
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy), (cx, cy + r), (cx + r, cy)], fill=colour)
    return img


# `st sample-data --conditioning`: the paired datasets it can write beside the images, by conditioning_type.
CONDITIONING_FOLDERS = {"controlnet": "edges", "mask": "masks"}


def write_conditioning(images: list[Path], folder: Path, kind: str) -> None:
    """A conditioning image per picture, as PNG with the picture's stem: "controlnet" writes its edges (white on
    black), "mask" the shape's mask (white where the shape is). Both are found from the pixels, so JPEG pictures get
    slightly ragged ones, as real data does."""
    import numpy as np
    from PIL import Image, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    for path in images:
        with Image.open(path) as opened:
            rgb = np.asarray(opened.convert("RGB"), dtype=np.int16)
        corner = rgb[0, 0]  # the background colour
        shape = (np.abs(rgb - corner).sum(axis=2) > 60).astype(np.uint8) * 255
        mask = Image.fromarray(shape, mode="L")
        if kind == "controlnet":
            mask = mask.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 64 else 0)
        mask.convert("RGB").save(folder / f"{path.stem}.png", format="PNG")


def write_images(folder: Path, images: int, seed: int = 0) -> list[Path]:
    """Write `images` captioned shape pictures (JPEG and PNG, several aspect ratios) with `.txt` captions."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(images):
        shape = SHAPES[i % len(SHAPES)]
        colour_name = list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)]
        bg_name = rng.choice(list(BACKGROUNDS))
        size = SIZES[i % len(SIZES)]
        img = _draw(shape, COLOURS[colour_name], BACKGROUNDS[bg_name], size, rng)
        ext = ".png" if i % 3 == 0 else ".jpg"
        path = folder / f"{i:04d}_{colour_name}_{shape}{ext}"
        if ext == ".png":
            img.save(path, format="PNG")
        else:
            img.save(path, format="JPEG", quality=92)
        path.with_suffix(".txt").write_text(f"a {colour_name} {shape} on a {bg_name} background\n")
        written.append(path)
    return written


# `st sample-data --video`: clips of a shape moving across the frame, (width, height) by clip, and their frame rate.
VIDEO_SIZES = ((64, 64), (64, 64), (128, 64))
VIDEO_RESOLUTION = 64  # the video dataset's own resolution (pixel_area): the clips' size, no upscaling
VIDEO_FRAMES = 16
VIDEO_FPS = 12
VIDEO_BLOCK = {"num_frames": 8, "min_frames": 8}  # the sample config's `video` block
SHORT_VIDEO_FRAMES = 4  # under min_frames: st prepare skips it
VIDEO_FOLDER = "videos"


def write_video(path: Path, frames: list, fps: int, faststart: bool = False) -> None:
    """Encode RGB frames (numpy arrays of one size) as an H.264 MP4 (MPEG-4 Part 2 where the library lacks x264)."""
    import av

    height, width = frames[0].shape[:2]
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", format="mp4", options=options) as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _moving_shape(shape: str, colour: tuple, background: tuple, size: tuple[int, int], count: int,
                  rng: random.Random) -> list:  # fmt: skip
    """`count` frames of `shape` sliding from the left edge to the right."""
    import numpy as np
    from PIL import Image

    still = _draw(shape, colour, background, size, rng)
    width = size[0]
    frames = []
    for i in range(count):
        canvas = Image.new("RGB", size, background)
        canvas.paste(still, (round((i / max(count - 1, 1) - 0.5) * width * 0.5), 0))
        frames.append(np.asarray(canvas))
    return frames


def write_videos(folder: Path, videos: int, seed: int = 0) -> list[Path]:
    """`videos` captioned clips of VIDEO_FRAMES frames, plus one too short for VIDEO_BLOCK's min_frames
    (`short_*.mp4`) and one cut off halfway (`truncated_*.mp4`), each with a `.txt` caption."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(videos + 2):
        shape = SHAPES[i % len(SHAPES)]
        colour_name = list(COLOURS)[(i // len(SHAPES)) % len(COLOURS)]
        bg_name = rng.choice(list(BACKGROUNDS))
        size = VIDEO_SIZES[i % len(VIDEO_SIZES)]
        kind = "short_" if i == videos else "truncated_" if i == videos + 1 else ""
        count = SHORT_VIDEO_FRAMES if kind == "short_" else VIDEO_FRAMES
        frames = _moving_shape(shape, COLOURS[colour_name], BACKGROUNDS[bg_name], size, count, rng)
        path = folder / f"{kind}{i:04d}_{colour_name}_{shape}.mp4"
        write_video(path, frames, VIDEO_FPS, faststart=kind == "truncated_")
        if kind == "truncated_":  # the header still promises every frame; half the data is gone
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        path.with_suffix(".txt").write_text(f"a {colour_name} {shape} moving right on a {bg_name} background\n")
        written.append(path)
    return written


def write_sample_dataset(
    out_dir: Path,
    images: int = 24,
    seed: int = 0,
    resolution: int = 128,
    family: str | None = None,
    model: Path | None = None,
    conditioning: tuple[str, ...] = (),
    videos: int = 0,
) -> Path:
    """Images under `out_dir/images`, plus `config.json` and `multidatabackend.json`; returns the config path.

    With `family` and `model` the config also names the model (its path relative to the config file). `conditioning`
    (conditioning_types of CONDITIONING_FOLDERS) adds paired datasets: edges/ for "controlnet", masks/ for "mask".
    `videos` writes a video dataset (`write_videos`, under videos/) instead of the images."""
    out_dir = Path(out_dir)
    if videos:
        write_videos(out_dir / VIDEO_FOLDER, videos, seed)
    pictures = write_images(out_dir / "images", images, seed) if not videos else []
    for kind in conditioning:
        write_conditioning(pictures, out_dir / CONDITIONING_FOLDERS[kind], kind)
    datasets = [
        {
            "id": "shapes",
            "type": "local",
            "instance_data_dir": "images",
            "caption_strategy": "textfile",
            "crop": False,
            "cache_dir_vae": "cache/vae/shapes",
        },
        *({"id": CONDITIONING_FOLDERS[kind], "type": "local", "dataset_type": "conditioning",
           "conditioning_type": kind, "instance_data_dir": CONDITIONING_FOLDERS[kind]} for kind in conditioning),
        {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "type": "local",
         "cache_dir": "cache/text"},
    ]  # fmt: skip
    if videos:
        datasets[0] = {"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": VIDEO_FOLDER,
                       "caption_strategy": "textfile", "crop": False, "resolution": VIDEO_RESOLUTION,
                       "resolution_type": "pixel_area", "video": dict(VIDEO_BLOCK)}  # fmt: skip
    if conditioning:
        datasets[0]["conditioning_data"] = [CONDITIONING_FOLDERS[kind] for kind in conditioning]
    (out_dir / "multidatabackend.json").write_text(json.dumps(datasets, indent=2) + "\n")
    config = {
        "--data_backend_config": "multidatabackend.json",
        "--resolution": resolution,
        "--resolution_type": "pixel_area",
        "--aspect_bucket_alignment": 32,
        "--train_batch_size": 2,
        "--seed": seed,
        # A tiny model on a CPU: memory is no concern, time is (SimpleTuner's default recomputes activations).
        "--gradient_checkpointing": False,
    }
    if family:
        config["--model_family"] = family
        # A short LoRA run that shows learning on a CPU in about a minute, with validation and checkpoints (and an
        # evaluation loss at 5 schedule points per sample: SimpleTuner's 28 would make each evaluation 5.6x longer).
        config.update({
            "--model_type": "lora", "--lora_rank": 8, "--learning_rate": 1e-3, "--max_train_steps": 30,
            "--checkpoint_step_interval": 10, "--checkpoints_total_limit": 2, "--eval_steps_interval": 10,
            "--num_eval_images": 4, "--eval_timesteps": 5, "--validation_prompt": "a red circle on a white background",
            "--validation_negative_prompt": "", "--validation_resolution": "96", "--validation_step_interval": 15,
            "--validation_num_inference_steps": 4, "--validation_guidance": 3.0, "--num_validation_images": 1,
        })  # fmt: skip
        if family == "z_image":  # its default flavour, turbo-ostris-v2, trains over an assistant LoRA from the hub
            config["--model_flavour"] = "base"
    if model is not None:
        config["--pretrained_model_name_or_path"] = os.path.relpath(Path(model).resolve(), out_dir.resolve())
    config_path = out_dir / "config.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return config_path

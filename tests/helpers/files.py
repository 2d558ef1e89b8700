"""Image files and st config files written for a test."""

from __future__ import annotations

import json
from pathlib import Path


def make_image(path: Path, size=(128, 96), colour=(200, 30, 30), fmt: str | None = None, exif_orientation=None) -> Path:
    """Write a real image file; the colour makes its bytes (and so its sample id) distinct."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    fmt = fmt or ("PNG" if path.suffix.lower() == ".png" else "JPEG")
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    img.save(path, format=fmt, **kwargs)
    return path


# What these tests' configs rely on unless they set it: one sample per step and no recomputed activations (tiny
# models on a CPU), where SimpleTuner's defaults are 4 and true.
TEST_DEFAULTS = {"train_batch_size": 1, "gradient_checkpointing": False}


def write_config(folder: Path, datasets: list[dict], **options) -> Path:
    """Write multidatabackend.json and config.json into `folder`; returns the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "multidatabackend.json").write_text(json.dumps(datasets))
    config = {"data_backend_config": "multidatabackend.json", **TEST_DEFAULTS, **options}
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


def split_sample_dataset(data: Path, groups: dict[str, int]) -> list[dict]:
    """Move the images (and caption files) of a `write_sample_dataset` folder, in name order, into one folder per
    group (`{"early": 4, "late": 4}`), and return a square-cropped local dataset entry per group (id = folder name),
    for tests that need several datasets of one prepared sample set."""
    import shutil

    images = sorted(p for p in (data / "images").iterdir() if p.suffix != ".txt")
    bounds, start = [], 0
    for name, count in groups.items():
        bounds.append((name, start, start + count))
        start += count
    for i, image in enumerate(images):
        name = next((n for n, lo, hi in bounds if lo <= i < hi), None)
        if name is None:
            continue
        folder = data / name
        folder.mkdir(exist_ok=True)
        for path in (image, image.with_suffix(".txt")):
            shutil.move(path, folder / path.name)
    common = {"type": "local", "caption_strategy": "textfile", "crop": True, "crop_aspect": "square"}
    return [{"id": name, "instance_data_dir": name, **common} for name in groups]


# SimpleTuner's Wan / LTX-Video example configs and their dataset lists, as tests/data keeps them.
VIDEO_EXAMPLES = json.loads((Path(__file__).resolve().parents[1] / "data" / "simpletuner_video_examples.json")
                            .read_text())


def write_video_examples(root: Path, configs: str = "configs") -> Path:
    """Lay out VIDEO_EXAMPLES[configs] and the dataset lists under `root` as in SimpleTuner's repository (configs name
    their lists relative to its root, so run from `root`); returns `root`."""
    for relative, content in {**VIDEO_EXAMPLES[configs], **VIDEO_EXAMPLES["lists"]}.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(json.dumps(content))
    return root

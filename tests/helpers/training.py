"""A prepared and cached sample dataset, a quick `st train` on it (in this process or as its own `st` process), and
the denoiser prediction tests compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.config import load_config

QUICK = [
    "validation_disable=true", "disable_benchmark=true", "report_to=\"none\"", "dataloader_prefetch=false",
    "max_train_steps=2", "train_batch_size=1", "gradient_checkpointing=false",
]  # fmt: skip


def cached_dataset(root: Path, family: str, model: Path, images: int = 8, conditioning: tuple[str, ...] = (),
                   datasets: dict[str, tuple[int, dict]] | None = None, **extra) -> Path:  # fmt: skip
    """A sample dataset for the tiny `family` model at `model` (the `tiny_model` fixture's), its prepare and its cache
    under `root` (data/, prepare/, cache/); `conditioning`: paired datasets as `st sample-data --conditioning` writes
    them ("controlnet": edges/, "mask": masks/); `datasets`: the images split, in name order, into square-cropped
    datasets {id: (image count, extra dataset keys)} instead of one (`files.split_sample_dataset`); `extra` updates
    the config (SimpleTuner's `--name` keys). Returns the config path."""
    from pipeline.cache.stage import run_cache
    from pipeline.prepare.stage import run_prepare
    from pipeline.sampledata import write_sample_dataset

    config = write_sample_dataset(root / "data", images=images, family=family, model=model, resolution=96,
                                  conditioning=conditioning)  # fmt: skip
    if datasets:
        from tests.helpers.files import split_sample_dataset

        listing = root / "data" / "multidatabackend.json"
        entries = json.loads(listing.read_text())
        split = split_sample_dataset(root / "data", {name: count for name, (count, _) in datasets.items()})
        entries[0:1] = [{**entry, **datasets[entry["id"]][1]} for entry in split]
        listing.write_text(json.dumps(entries))
    data = json.loads(config.read_text())
    data.update({"--validation_prompt": "a red circle on a white background", "--train_batch_size": 1,
                 "--num_validation_images": 1, **extra})  # fmt: skip
    config.write_text(json.dumps(data))
    loaded = load_config(config)
    run_prepare(loaded, root / "prepare")
    run_cache(loaded, root / "prepare", root / "cache")
    return config


def train(config: Path, cache: Path, out: Path, *sets: str):
    """`run_train` with the QUICK options, then `sets`."""
    from pipeline.train.stage import run_train

    return run_train(load_config(config, [*QUICK, *sets]), cache, out)


ST = str(Path(sys.executable).with_name("st"))  # the console script of this environment
WEIGHTS = Path("final") / "pytorch_lora_weights.safetensors"


def st_env() -> dict[str, str]:
    """The environment of an `st` process: the test process pins OMP_NUM_THREADS=1, the runs use the default count."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    return env


def st_train_args(setup: tuple[Path, Path], out: Path, *sets: str, flags: tuple[str, ...] = ()) -> list[str]:
    """`st train` on `setup` (root, config: `cached_dataset`'s) into `out`, each of `sets` as a `--set`."""
    root, config = setup
    options = [item for s in sets for item in ("--set", s)]
    return [ST, "train", "-c", str(config), "-i", str(root / "cache"), "-o", str(out), *options, *flags]


def run_st_train(setup: tuple[Path, Path], out: Path, *sets: str, flags: tuple[str, ...] = ()):
    """`st train` as its own process; the CompletedProcess (output captured)."""
    return subprocess.run(st_train_args(setup, out, *sets, flags=flags), env=st_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def losses(out: Path) -> dict[int, float]:
    """step -> training loss of a train output's metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def denoise(family_name: str, denoiser, root: Path):
    """The denoiser's prediction for fixed latents, timestep and the cached validation prompt of `root`'s cache."""
    import torch

    from pipeline.cache_reader import CacheReader
    from pipeline.families import get_family

    family = get_family(family_name)
    text = CacheReader(root / "cache").prompt("a red circle on a white background")
    latents = torch.randn(1, family.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    meta = [{"original_size": [64, 64], "crop_top_left": [0, 0], "target_size": [64, 64]}]
    with torch.no_grad():
        return family.denoiser_forward(denoiser, latents, torch.tensor([500.0]), family.collate_text([text]), meta)

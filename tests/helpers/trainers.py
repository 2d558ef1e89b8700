"""A `Trainer` built in this process on a `cached(family)` sample cache, and training batches built by hand, for
tests of what one forward pass computes (masked loss, regularisation, evaluation)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.training import QUICK

# The options these tests rely on, stated rather than left to SimpleTuner's defaults.
STATED = ["mixed_precision=\"no\"", "lora_dropout=0.0", "caption_dropout_probability=0.0", "learning_rate=1e-3",
          "lora_rank=4", "seed=0"]  # fmt: skip


def build_trainer(setup: tuple[Path, Path], out: Path, *sets: str):
    """A Trainer on `setup` (root, config: the `cached` fixture's) writing to `out`, with QUICK, STATED, `sets`."""
    from pipeline.cache_reader import CacheReader
    from pipeline.config import load_config
    from pipeline.families import get_family
    from pipeline.families.identity import model_sources
    from pipeline.train.trainer import Trainer

    root, config_path = setup
    loaded = load_config(config_path, [*QUICK, *STATED, *sets])
    config = loaded.config
    reader = CacheReader(root / "cache")
    shared = reader.shared_embeds()
    sources = model_sources(loaded)
    by_text = {text: shared[k] for k, text in reader.manifest["embeds"]["prompts"].items()}
    return Trainer(config=config, family=get_family(config.model_family), source=sources.model,
                   vae_source=sources.vae, cache_root=reader.root, cache_manifest=reader.manifest,
                   shared_embeds=shared, prompts_by_text=by_text, out_dir=out,
                   base_dir=loaded.base_dir)  # fmt: skip


def first_batch(trainer, size: int = 1):
    """A training batch of the first bucket that holds `size` samples, read as the loader reads them (the trainer's
    train_batch_size must be `size`)."""
    from pipeline.train.data import PlannedBatch, SampleReader

    (dataset_id, bucket), keys = next((g, k) for g, k in sorted(trainer.index.groups.items()) if len(k) >= size)
    reader = SampleReader()
    try:
        return trainer.loader.load(PlannedBatch(dataset_id, bucket, tuple(keys[:size])), 0, 0, reader)
    finally:
        reader.close()


def randomise_lora(trainer, seed: int = 0, scale: float = 0.3) -> None:
    """Give every LoRA B matrix random values, so that the adapter changes the denoiser's output."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in trainer.unwrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)

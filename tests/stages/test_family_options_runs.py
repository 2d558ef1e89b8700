"""SimpleTuner's family options reach a training step: one Trainer per family on the shared sample cache, the same
batch, noise and timesteps, and the option on or off (pipeline/train/family_options.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pipeline.train.family_options import FamilyText
from tests.helpers.trainers import build_trainer, first_batch


def step_loss(trainer, batch) -> float:
    """The training loss of `batch` with the generator reset, so that only the trainer's settings differ."""
    trainer.generator.manual_seed(0)
    with torch.no_grad():
        return float(trainer._forward_loss(batch, 0))


def test_flux_masked_training_masks_the_text_of_the_training_step(cached, tmp_path):
    trainer = build_trainer(cached("flux"), tmp_path / "out", "flux_attention_masked_training=true")
    assert trainer.family_text.attention_mask
    assert "attention_mask" in next(iter(trainer.shared.values()))  # st cache stored T5's mask
    batch = first_batch(trainer)
    masked = step_loss(trainer, batch)
    trainer.family_text = dataclasses.replace(trainer.family_text, attention_mask=False)
    unmasked = step_loss(trainer, batch)
    assert masked != unmasked


def test_sd3_caption_dropout_trains_on_zeros_when_asked(cached, tmp_path):
    trainer = build_trainer(cached("sd3"), tmp_path / "out", "sd3_clip_uncond_behaviour=\"zero\"")
    assert (trainer.family_text.clip_uncond, trainer.family_text.t5_uncond) == ("zero", "zero")
    batch = first_batch(trainer)
    dropped = dataclasses.replace(batch, texts=[trainer.shared[trainer.loader.empty_key]], dropped=[True])
    zeros = step_loss(trainer, dropped)
    kept = step_loss(trainer, dataclasses.replace(dropped, dropped=[False]))  # the same text, not a dropped caption
    trainer.family_text = FamilyText(attention_mask=False, clip_uncond="empty_string", t5_uncond="empty_string")
    empty = step_loss(trainer, dropped)
    assert zeros != empty and kept == empty  # only dropped captions change, and only with "zero"


def test_hidream_load_balancing_loss_is_added_to_the_training_loss(cached, tmp_path):
    trainer = build_trainer(cached("hidream"), tmp_path / "out", "hidream_use_load_balancing_loss=true",
                            "hidream_load_balancing_loss_weight=0.1")  # fmt: skip
    batch = first_batch(trainer)
    balanced = step_loss(trainer, batch)
    added = float(trainer.balance.weight * torch.stack(trainer.balance.collected or [torch.zeros(())]).sum())
    balance, trainer.balance = trainer.balance, None
    plain = step_loss(trainer, batch)
    assert balanced > plain and added == 0.0  # taken: nothing left over after the step
    trainer.balance = balance
    assert abs(step_loss(trainer, batch) - balanced) < 1e-6


def test_a_unet_from_another_folder_is_the_one_trained_and_a_resume_needs_the_same(cached, tiny_model, tmp_path):
    from safetensors.torch import load_file

    from pipeline.train.resume import ResumeMismatch
    from tests.helpers.training import train

    root, config = cached("sd1x")
    other = tiny_model("sd1x", seed=1)  # another random UNet of the same architecture, read from its folder itself
    trainer = build_trainer((root, config), tmp_path / "out", f'pretrained_unet_model_name_or_path="{other / "unet"}"',
                            'pretrained_unet_subfolder="none"')  # fmt: skip
    theirs = load_file(other / "unet" / "diffusion_pytorch_model.safetensors")
    ours = {n.replace(".base_layer", ""): p for n, p in trainer.unwrapped.named_parameters() if "lora_" not in n}
    name = "conv_in.weight"
    assert torch.equal(ours[name], theirs[name])
    base = load_file(tiny_model("sd1x") / "unet" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(base[name], theirs[name])

    sets = ["checkpoint_step_interval=1", "max_train_steps=1", "lora_rank=4", 'mixed_precision="no"']
    train(config, root / "cache", tmp_path / "a", *sets, f'pretrained_unet_model_name_or_path="{other}"')
    (checkpoint,) = (tmp_path / "a" / "checkpoints").iterdir()
    with pytest.raises(ResumeMismatch, match="pretrained_unet_model_name_or_path"):
        train(config, root / "cache", tmp_path / "a", *sets, "max_train_steps=2",
              f'resume_from_checkpoint="{checkpoint}"')  # fmt: skip


def test_a_transformer_folder_is_the_one_trained_and_a_resume_needs_the_same(cached, tiny_model, tmp_path):
    """pretrained_transformer_model_name_or_path: a diffusers folder (not only a .gguf file), with its subfolder."""
    from safetensors.torch import load_file

    from pipeline.train.resume import ResumeMismatch
    from tests.helpers.training import train

    root, config = cached("flux")
    other = tiny_model("flux", seed=1)
    trainer = build_trainer((root, config), tmp_path / "out", f'pretrained_transformer_model_name_or_path="{other}"')
    theirs = load_file(other / "transformer" / "diffusion_pytorch_model.safetensors")
    ours = {n.replace(".base_layer", ""): p for n, p in trainer.unwrapped.named_parameters() if "lora_" not in n}
    name = "x_embedder.weight"
    assert torch.equal(ours[name], theirs[name])
    assert not torch.equal(load_file(tiny_model("flux") / "transformer" / "diffusion_pytorch_model.safetensors")[name],
                           theirs[name])  # fmt: skip

    sets = ["checkpoint_step_interval=1", "max_train_steps=1", "lora_rank=4", 'mixed_precision="no"']
    train(config, root / "cache", tmp_path / "a", *sets, f'pretrained_transformer_model_name_or_path="{other}"',
          'pretrained_transformer_subfolder="transformer"')  # fmt: skip
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert (manifest["model"]["denoiser"]["source"], manifest["model"]["denoiser"]["subfolder"]) == (str(other),
                                                                                                  "transformer")
    (checkpoint,) = (tmp_path / "a" / "checkpoints").iterdir()
    with pytest.raises(ResumeMismatch, match="denoiser changed"):
        train(config, root / "cache", tmp_path / "a", *sets, "max_train_steps=2",
              f'resume_from_checkpoint="{checkpoint}"')  # fmt: skip


def test_flux_masked_training_renders_validation_with_the_t5_mask(cached, tmp_path):
    """As SimpleTuner, validation of a masked run passes the prompt's T5 mask to every joint attention."""
    import numpy as np
    from PIL import Image

    from pipeline.cache_reader import CacheReader
    from pipeline.prompts import ValidationPrompt
    from pipeline.train.validation import Validator

    root, config = cached("flux")
    trainer = build_trainer((root, config), tmp_path / "out", "flux_attention_masked_training=true",
                            "validation_num_inference_steps=1", 'validation_resolution="64"')  # fmt: skip
    text = "a red circle on a white background"
    embeds = {text: CacheReader(root / "cache").prompt(text)}

    def render(family_text, folder: str) -> np.ndarray:
        validator = Validator(trainer.family, trainer.validation_options, source=trainer.source, vae_source=None,
                              denoiser=trainer.unwrapped, prompts=[ValidationPrompt("p", text)],
                              embeds=embeds, out_dir=tmp_path / folder, device="cpu",
                              family_text=family_text)  # fmt: skip
        paths = validator.render(0, "step")
        return np.asarray(Image.open(paths[0]), dtype=np.float32)

    masked = render(trainer.family_text, "masked")
    unmasked = render(dataclasses.replace(trainer.family_text, attention_mask=False), "plain")
    assert np.abs(masked - unmasked).max() > 0

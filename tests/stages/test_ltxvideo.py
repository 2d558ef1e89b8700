"""The LTX-Video chain on generated video: `st sample-data --video` clips of 9 frames (two latent frames) -> prepare ->
cache -> a 2-step LoRA run (exact resume, validation MP4 + frame grid) -> publish (diffusers and ComfyUI layouts) ->
the LoRA changes LTXPipeline's videos; the first-frame conditioning of ltx_train_mode i2v changes training and
resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.families import ltxvideo
from pipeline.publish.stage import run_publish
from tests.helpers.training import losses, train

FRAMES = 9  # clip and validation length: 1 + 8 frames, two latent frames
SETS = (f"validation_num_video_frames={FRAMES}", 'validation_resolution="32"', "validation_num_inference_steps=2",
        "checkpoint_step_interval=1", "learning_rate=0.01", "lora_dropout=0.0", "caption_dropout_probability=0.0",
        'mixed_precision="no"', 'ltx_train_mode="t2v"')  # fmt: skip


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model):
    """Three generated 9-frame clips prepared and cached for the tiny LTX-Video model, and a 2-step LoRA run over
    them that validates at step 2 (root, config, run folder)."""
    from pipeline.cache.stage import run_cache
    from pipeline.prepare.stage import run_prepare
    from pipeline.sampledata import write_sample_dataset

    root = tmp_path_factory.mktemp("ltxvideo-chain")
    config = write_sample_dataset(root / "data", family="ltxvideo", model=tiny_model("ltxvideo"), videos=3)
    datasets = json.loads((root / "data" / "multidatabackend.json").read_text())
    datasets[0]["video"] = {"num_frames": FRAMES, "min_frames": FRAMES}
    (root / "data" / "multidatabackend.json").write_text(json.dumps(datasets))
    loaded = load_config(config)
    run_prepare(loaded, root / "prepare")
    run_cache(loaded, root / "prepare", root / "cache")
    run = root / "straight"
    train(config, root / "cache", run, *SETS, "validation_disable=false", "validation_step_interval=2")
    return root, config, run


def test_cached_latents_keep_two_latent_frames(chain):
    root, _, _ = chain
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    assert manifest["family"] == "ltxvideo"
    from pipeline.train.data import CacheIndex, SampleReader

    index = CacheIndex(root / "cache", manifest)
    reader = SampleReader()
    try:
        latent = reader.latent(next(iter(index.samples.values())))
    finally:
        reader.close()
    assert latent.shape[:2] == (128, 2)  # C x f x h x w: 9 frames -> 2 latent frames


def test_lora_resumes_exactly(chain, tmp_path):
    root, config, straight = chain
    resumed = tmp_path / "resumed"
    train(config, root / "cache", resumed, *SETS, "max_train_steps=1")
    train(config, root / "cache", resumed, *SETS, 'resume_from_checkpoint="latest"')
    assert losses(resumed) == losses(straight)
    final = Path("final") / "pytorch_lora_weights.safetensors"
    assert (resumed / final).read_bytes() == (straight / final).read_bytes()


def test_validation_writes_mp4_and_frame_grid(chain):
    import av

    _, _, run = chain
    folder = run / "validation" / "step-2"
    with av.open(str(folder / "validation-32x32-0.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        rate = container.streams.video[0].average_rate
    assert len(frames) == FRAMES and frames[0].shape == (32, 32, 3)
    assert rate == 25  # framerate unset: LTX-Video's 25, as SimpleTuner sets it
    assert (folder / "validation-32x32-0.png").is_file()


def test_framerate_changes_training_and_the_validation_videos_rate(chain, tmp_path):
    """framerate 24: the RoPE time scale 8/24 changes the first step's loss, LTXPipeline renders at frame_rate 24 and
    the MP4 plays at 24 frames per second."""
    import av

    root, config, straight = chain
    run = tmp_path / "fps24"
    train(config, root / "cache", run, *SETS, "framerate=24", "max_train_steps=1", "validation_disable=false",
          "validation_step_interval=1")  # fmt: skip
    assert losses(run)[1] != losses(straight)[1]
    with av.open(str(run / "validation" / "step-1" / "validation-32x32-0.mp4")) as container:
        assert container.streams.video[0].average_rate == 24
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["framerate"] == 24


def test_validation_renders_at_the_framerate_training_used(chain, tmp_path):
    """LTXPipeline gets frame_rate=framerate, so each validation transformer call has the RoPE scale of training."""
    from pipeline.cache_reader import CacheReader
    from pipeline.prompts import ValidationPrompt
    from pipeline.train.validation import Validator
    from tests.helpers.trainers import build_trainer

    root, config, _ = chain
    trainer = build_trainer((root, config), tmp_path / "out", *SETS, "framerate=24")
    text, reader = load_config(config).config.validation_prompt, CacheReader(root / "cache")
    validator = Validator(trainer.family, trainer.validation_options, source=trainer.source, vae_source=None,
                          denoiser=trainer.unwrapped, prompts=[ValidationPrompt("p", text)],
                          embeds={t: reader.prompt(t) for t in (text, "")}, out_dir=tmp_path / "v",
                          device="cpu", family_text=trainer.family_text)  # fmt: skip
    scales = []
    handle = trainer.unwrapped.register_forward_pre_hook(
        lambda module, args, kwargs: scales.append(kwargs["rope_interpolation_scale"]), with_kwargs=True)
    try:
        validator.render(0, "step")
    finally:
        handle.remove()
    assert scales and set(scales) == {ltxvideo.rope_scale(24)}


def _render(model: Path, lora: Path | None = None) -> np.ndarray:
    from diffusers import LTXPipeline

    pipe = LTXPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    out = pipe("a red circle", height=32, width=32, num_frames=FRAMES, num_inference_steps=2, output_type="np",
               guidance_scale=1.0, generator=torch.Generator().manual_seed(0))  # fmt: skip
    return out.frames


def test_published_lora_changes_ltxpipeline_videos(chain, tmp_path, tiny_model):
    from safetensors import safe_open

    root, config, run = chain
    diffusers_out, comfy_out = tmp_path / "diffusers", tmp_path / "comfyui"
    run_publish(load_config(config), run, diffusers_out)
    run_publish(load_config(config, ['lora_format="comfyui"']), run, comfy_out)
    base = _render(tiny_model("ltxvideo"))
    with_lora = _render(tiny_model("ltxvideo"), diffusers_out / "pytorch_lora_weights.safetensors")
    assert np.abs(with_lora - base).max() > 1e-4
    # ComfyUI's LTXV model names its blocks as diffusers does, under `diffusion_model.` (comfy/lora.py's generic keys)
    with safe_open(str(comfy_out / "pytorch_lora_weights_comfyui.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("diffusion_model.transformer_blocks.") for k in keys)
    assert any(k.endswith(".attn1.to_q.lora_A.weight") for k in keys)


def test_first_frame_conditioning_changes_training_and_resumes_exactly(chain, tmp_path):
    root, config, t2v = chain
    i2v = [*SETS, 'ltx_train_mode="i2v"']  # the clips' video.is_i2v is true: st prepare's default for ltxvideo
    partial, resumed, protected = tmp_path / "partial", tmp_path / "resumed", tmp_path / "protected"
    train(config, root / "cache", partial, *i2v, "ltx_i2v_prob=1.0", "ltx_partial_noise_fraction=0.5")
    train(config, root / "cache", resumed, *i2v, "ltx_i2v_prob=1.0", "ltx_partial_noise_fraction=0.5",
          "max_train_steps=1")  # fmt: skip
    train(config, root / "cache", resumed, *i2v, "ltx_i2v_prob=1.0", "ltx_partial_noise_fraction=0.5",
          'resume_from_checkpoint="latest"')  # fmt: skip
    train(config, root / "cache", protected, *i2v, "ltx_protect_first_frame=true")
    assert losses(resumed) == losses(partial)
    assert losses(partial) != losses(t2v) and losses(protected) not in (losses(t2v), losses(partial))

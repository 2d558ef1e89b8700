"""DeepFloyd IF stage II (super-resolution, IFSuperResolutionPipeline): `st tiny-model deepfloyd --flavour ii` ->
cache (the images themselves, T5 as stage I) -> a LoRA trained as SimpleTuner trains stage II (the noisy image
concatenated with itself, the timesteps as class labels), validated through the pipeline from a cached image at its
64-pixel input size, resumed exactly -> published, loading into IFSuperResolutionPipeline; and a full fine-tune."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.errors import ConfigError, InputError
from pipeline.families import deepfloyd, get_family
from tests.helpers.training import WEIGHTS, cached_dataset, losses, train

SETS = ["learning_rate=1e-2", "lora_dropout=0", "caption_dropout_probability=0", 'mixed_precision="no"',
        "lora_rank=4", "lora_alpha=8", "checkpoint_step_interval=1", "validation_disable=false",
        "validation_step_interval=2", "validation_num_inference_steps=2", 'validation_resolution="64"']  # fmt: skip


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The tiny stage II model written by `st tiny-model`, two cached images, and an uninterrupted 2-step LoRA run
    that validates at step 2: (root, config, model folder, train output)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    root = tmp_path_factory.mktemp("deepfloyd-ii")
    model = root / "model"
    result = CliRunner().invoke(app, ["tiny-model", "deepfloyd", str(model), "--flavour", "ii"])
    assert result.exit_code == 0, result.output
    config = cached_dataset(root, "deepfloyd", model, images=2)
    out = root / "straight"
    train(config, root / "cache", out, *SETS)
    return root, config, model, out


def pipeline(model):
    from diffusers import IFSuperResolutionPipeline

    pipe = IFSuperResolutionPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flavours_and_folders_pick_stage_ii(chain, tmp_path):
    _, _, model, _ = chain
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "IFPipeline"}))  # a stage I folder
    family = get_family("deepfloyd")
    assert family.flavour_hub_id("ii-large-1.2b") == "DeepFloyd/IF-II-L-v1.0"
    assert family.for_run("ii-medium-450m", "DeepFloyd/IF-II-M-v1.0") is deepfloyd.STAGE_II
    assert family.for_run(None, str(model)) is deepfloyd.STAGE_II  # model_index.json: IFSuperResolutionPipeline
    assert family.for_run("i-medium-400m", "DeepFloyd/IF-I-M-v1.0") is family
    with pytest.raises(ConfigError, match="ii-medium-450m is DeepFloyd IF stage II .* is a IFPipeline"):
        family.for_run("ii-medium-450m", str(tmp_path))
    unet = pipeline(model).unet
    assert unet.config.in_channels == 6 and unet.config.class_embed_type == "timestep"
    with pytest.raises(InputError, match="trains with model_flavour ii-medium-450m or ii-large-1.2b"):
        family.denoiser_forward(unet, torch.zeros(1, 3, 32, 32), 500, {"prompt_embeds": torch.zeros(1, 77, 32)})


def test_the_unet_call_replays_the_pipelines_and_conditions_as_simpletuner(chain):
    """st's call on the pipeline's own inputs gives its output bit for bit; training conditions on the noisy image
    itself with the timesteps as noise level (SimpleTuner's `_model_predict_single`)."""
    _, _, model, _ = chain
    pipe = pipeline(model)
    seen = []
    handle = pipe.unet.register_forward_hook(
        lambda module, args, kwargs, out: seen.append((args[0], args[1], kwargs, out[0])), with_kwargs=True)
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    low = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    pipe(prompt_embeds=embeds, image=low, num_inference_steps=2, height=32, width=32, guidance_scale=1.0,
         output_type="pt", generator=torch.Generator().manual_seed(0))  # fmt: skip
    handle.remove()
    model_input, t, kwargs, out = seen[0]
    assert torch.equal(kwargs["class_labels"], torch.tensor([250]))  # the pipeline's default noise_level
    text = {"prompt_embeds": kwargs["encoder_hidden_states"]}
    with torch.no_grad():
        ours = deepfloyd.stage_ii_call(pipe.unet, model_input[:, :3], model_input[:, 3:], t, kwargs["class_labels"],
                                       text)  # fmt: skip
        assert torch.equal(ours, out[:, :3])  # noise half; the other 3 channels are the learned variance
        noisy, steps = model_input[:, :3], torch.tensor([700])
        trained = deepfloyd.STAGE_II.denoiser_forward(pipe.unet, noisy, steps, text)
        assert torch.equal(trained, deepfloyd.stage_ii_call(pipe.unet, noisy, noisy, steps, steps.float(), text))
        assert not torch.equal(trained, deepfloyd.stage_ii_call(pipe.unet, noisy, model_input[:, 3:], steps,
                                                                steps.float(), text))  # fmt: skip


def test_a_lora_trains_validates_from_a_cached_image_and_resumes_exactly(chain, tmp_path):
    root, config, _, out = chain
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["pipeline"] == "IFSuperResolutionPipeline" and manifest["metrics"]["steps"] == 2
    assert all(0 < loss < 10 for loss in losses(out).values())
    (render,) = (out / "validation").rglob("*-64x64-0.png")
    (control,) = (out / "validation").rglob("*-64x64-control.png")
    assert Image.open(render).size == (64, 64) and np.asarray(Image.open(control)).std() > 1
    resumed = tmp_path / "resumed"
    train(config, root / "cache", resumed, *SETS, "max_train_steps=1")
    result = train(config, root / "cache", resumed, *SETS, 'resume_from_checkpoint="latest"')
    assert result.manifest["metrics"]["steps"] == 2
    assert losses(resumed)[2] == losses(out)[2]
    assert (resumed / WEIGHTS).read_bytes() == (out / WEIGHTS).read_bytes()


def test_the_published_lora_loads_into_the_super_resolution_pipeline_and_changes_its_output(chain, tmp_path):
    from pipeline.publish.stage import run_publish

    _, config, model, out = chain
    run_publish(load_config(config), out, tmp_path / "publish")
    card = (tmp_path / "publish" / "README.md").read_text()
    assert "IFSuperResolutionPipeline" in card and "image=condition" in card
    pipe = pipeline(model)
    low = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1

    def render() -> np.ndarray:
        return pipe(prompt_embeds=torch.ones(1, 77, 32), image=low, num_inference_steps=2, height=32, width=32,
                    guidance_scale=1.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    base = render()
    get_family("deepfloyd").load_lora_into_pipeline(pipe, tmp_path / "publish" / "pytorch_lora_weights.safetensors")
    tuned = render()
    assert np.isfinite(tuned).all() and np.abs(base - tuned).max() > 1e-4


def test_a_full_fine_tune_trains_the_stage_ii_unet(chain, tmp_path):
    from diffusers import UNet2DConditionModel

    root, config, model, _ = chain
    out = tmp_path / "full"
    result = train(config, root / "cache", out, 'model_type="full"', 'mixed_precision="no"', "learning_rate=1e-3")
    assert result.manifest["metrics"]["steps"] == 2
    trained = UNet2DConditionModel.from_pretrained(str(out / "final"), subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(str(model), subfolder="unet")
    assert trained.config.in_channels == 6
    pairs = zip(trained.state_dict().items(), base.state_dict().values())
    changed = [n for (n, a), b in pairs if not torch.equal(a, b)]
    assert any(n.startswith("class_embedding.") for n in changed)

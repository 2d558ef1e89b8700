"""ControlNet training in one process on the tiny models, with hand-built batches: a new ControlNet leaves the base
model's prediction unchanged (its output layers start at zero) and takes every gradient while the base stays frozen;
`controlnet_custom_config` shapes it; what a ControlNet run cannot do is refused before any model loads."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import Config, load_config
from pipeline.errors import ConfigError, InputError, NotSupportedError
from pipeline.families import get_family, load_components
from pipeline.families.controlnet import SPECS
from pipeline.train import controlnet
from pipeline.train.data import Batch

META = {"original_size": [32, 32], "crop_top_left": [0, 0], "target_size": [32, 32]}


def options(**values) -> Config:
    return Config(**{"controlnet": True, "model_type": "full", "gradient_checkpointing": False, **values})


def text_for(family: str, denoiser) -> dict[str, torch.Tensor]:
    config = denoiser.config
    if family == "sd1x":
        return {"prompt_embeds": torch.randn(1, 77, config.cross_attention_dim)}
    if family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return {"prompt_embeds": torch.randn(1, 77, config.cross_attention_dim), "pooled_prompt_embeds":
                torch.randn(1, pooled)}  # fmt: skip
    return {"prompt_embeds": torch.randn(1, 8, config.joint_attention_dim),
            "pooled_prompt_embeds": torch.randn(1, config.pooled_projection_dim)}  # fmt: skip


def controlled(tiny_model, family: str, **values):
    """(ControlNetTraining, trainer model, trainable parameters, base denoiser) for the family's tiny model."""
    spec = get_family(family)
    denoiser = load_components(spec, str(tiny_model(family)), which=("denoiser",))["denoiser"]
    training = controlnet.ControlNetTraining(options(**values), spec, vae_scale=2, base_dir=None, seed=0)
    training.build(denoiser)
    model, params = training.wrap(denoiser, torch.device("cpu"))
    return training, model, params, denoiser


@pytest.mark.parametrize("family", sorted(SPECS))
def test_a_new_controlnet_keeps_the_base_prediction_and_alone_receives_gradients(tiny_model, family):
    torch.manual_seed(0)
    spec = get_family(family)
    training, model, params, denoiser = controlled(tiny_model, family)
    latents = torch.randn(1, spec.latent_channels, 8, 8)
    batch = Batch(latents=latents, texts=[], meta=[META], keys=["k"], dropped=[False], epoch=0, index=0,
                  control_pixels=torch.rand(1, 3, 16, 16) * 2 - 1,
                  control_latents=torch.randn(1, spec.latent_channels, 8, 8))  # fmt: skip
    text, timesteps = text_for(family, denoiser), torch.tensor([500.0])
    prediction = training.predict(model, latents, timesteps, text, [META], None, batch)
    with torch.no_grad():
        base = spec.denoiser_forward(denoiser, latents, timesteps, text, [META])
    torch.testing.assert_close(prediction.detach(), base)  # zero-initialised output layers add nothing yet

    prediction.square().mean().backward()
    assert all(not p.requires_grad for p in denoiser.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("controlnet.") for n in names)
    assert set(controlnet.trainable_state(model)) >= names


def test_the_controlnet_follows_the_pipeline_input_range(tiny_model):
    """A UNet ControlNet takes the image in [0, 1], as the diffusers pipeline's control image processor leaves it."""
    training, *_ = controlled(tiny_model, "sd1x")
    pixels = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    batch = Batch(latents=None, texts=[], meta=[], keys=[], dropped=[], epoch=0, index=0, control_pixels=pixels)
    assert training.control_input(batch).flatten().tolist() == [0.0, 0.5, 1.0]
    empty = Batch(latents=None, texts=[], meta=[], keys=[], dropped=[], epoch=0, index=0, dataset_id="plain")
    with pytest.raises(InputError, match="dataset 'plain'.* needs conditioning_data"):
        training.control_input(empty)


def test_sd3_conditioning_latents_are_encoded_as_its_pipeline_encodes_them(tiny_model):
    """StableDiffusion3ControlNetPipeline leaves the VAE's shift out of the control image's latents when the
    ControlNet forces zero pooled projections (the default): the cached (x - shift) * scale becomes x * scale."""
    training, *_ = controlled(tiny_model, "sd3")
    training.vae_factors = (0.25, 2.0)
    latents = torch.zeros(1, 16, 2, 2)
    batch = Batch(latents=None, texts=[], meta=[], keys=[], dropped=[], epoch=0, index=0, control_latents=latents)
    assert training.controlnet.config.force_zeros_for_pooled_projection
    assert torch.equal(training.control_input(batch), latents + 0.5)


def test_custom_config_shapes_the_controlnet_as_json_text_or_file(tiny_model, tmp_path):
    _, model, *_ = controlled(tiny_model, "flux", controlnet_custom_config='{"num_layers": 1, "num_single_layers": 2}')
    assert (len(model.controlnet.transformer_blocks), len(model.controlnet.single_transformer_blocks)) == (1, 2)
    _, default, *_ = controlled(tiny_model, "flux")
    assert (len(default.controlnet.transformer_blocks), len(default.controlnet.single_transformer_blocks)) == (4, 10)
    path = tmp_path / "controlnet.json"
    path.write_text(json.dumps({"num_single_layers": 3}))
    _, from_file, *_ = controlled(tiny_model, "flux", controlnet_custom_config=str(path))
    assert len(from_file.controlnet.single_transformer_blocks) == 3
    with pytest.raises(ConfigError, match="num_blocks is not a keyword of FluxControlNetModel.from_transformer"):
        controlled(tiny_model, "flux", controlnet_custom_config={"num_blocks": 2})


def test_an_existing_controlnet_is_loaded_from_a_folder(tiny_model, tmp_path):
    _, trained, *_ = controlled(tiny_model, "sd1x")
    with torch.no_grad():
        next(trained.controlnet.parameters()).add_(1.0)
    trained.controlnet.save_pretrained(tmp_path / "start")
    _, loaded, *_ = controlled(tiny_model, "sd1x", controlnet_model_name_or_path=str(tmp_path / "start"))
    torch.testing.assert_close(next(loaded.controlnet.parameters()), next(trained.controlnet.parameters()))
    with pytest.raises(InputError, match="controlnet_model_name_or_path './missing': no such folder"):
        controlled(tiny_model, "sd1x", controlnet_model_name_or_path="./missing")


EDGES = {"id": "edges", "conditioning_type": "controlnet"}
PAIRED = {"datasets": [{"id": "shapes", "conditioning_data": ["edges"]}], "conditioning_datasets": [EDGES]}
HALF_PAIRED = {"datasets": [{"id": "shapes", "conditioning_data": ["edges"]}, {"id": "photos"}],
               "conditioning_datasets": [EDGES]}  # fmt: skip
MASKS_ONLY = {"datasets": [{"id": "shapes", "conditioning_data": ["masks"]}],
              "conditioning_datasets": [{"id": "masks", "conditioning_type": "mask"}]}  # fmt: skip


@pytest.mark.parametrize(("values", "manifest", "error", "message"), [
    ({"model_family": "pixart_sigma"}, PAIRED, NotSupportedError, "not supported for model_family pixart_sigma"),
    ({"model_type": "lora", "lora_type": "lycoris"}, PAIRED, NotSupportedError, "lora_type 'lycoris' with controlnet"),
    ({"train_text_encoder": True}, PAIRED, ConfigError, "train_text_encoder cannot be combined"),
    ({}, {"datasets": [{"id": "shapes"}]}, InputError, "add `\"conditioning_data\": \"<id>\"`.*re-run `st prepare`"),
    ({}, MASKS_ONLY, InputError, "add `\"conditioning_data\": \"<id>\"`"),
    ({}, HALF_PAIRED, InputError, "dataset\\(s\\) photos have none.*mark them `\"dataset_type\": \"eval\"`"),
])  # fmt: skip
def test_what_a_controlnet_run_cannot_do_is_refused_with_the_fix(values, manifest, error, message):
    config = options(**{"model_family": "sd1x", **values})
    with pytest.raises(error, match=message):
        controlnet.check(config, get_family(config.model_family), manifest)


def test_ramtorch_controlnet_streams_the_controlnets_linear_layers_with_ramtorch(tiny_model, monkeypatch):
    """The one call site of `ramtorch_layers.stream_controlnet` (ramtorch's own layer needs CUDA: a CPU stand-in
    marks what would stream)."""
    from pipeline import ramtorch_layers

    class Streamed(torch.nn.Module):
        def __init__(self, layer, device) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)

    monkeypatch.setattr(ramtorch_layers, "_ramtorch_linear", Streamed)
    _, model, _, denoiser = controlled(tiny_model, "sd1x", ramtorch=True, ramtorch_controlnet=True,
                                       ramtorch_target_modules="*.to_q")  # fmt: skip
    streamed = [n for n, m in model.controlnet.named_modules() if isinstance(m, Streamed)]
    assert streamed and all(n.endswith("to_q") for n in streamed)
    assert not any(isinstance(m, Streamed) for m in denoiser.modules())  # the base streams through offload.place
    _, model, *_ = controlled(tiny_model, "sd1x", ramtorch_controlnet=True)  # read only with ramtorch
    assert not any(isinstance(m, Streamed) for m in model.controlnet.modules())


def test_simpletuner_controlnet_and_control_options_load(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"--controlnet": True, "--controlnet_model_name_or_path": "org/controlnet",
                                "--controlnet_custom_config": '{"num_layers": 2}'}))  # fmt: skip
    config = load_config(path).config
    assert (config.controlnet, config.controlnet_model_name_or_path) == (True, "org/controlnet")
    path.write_text(json.dumps({"--control": True}))
    assert load_config(path).config.control  # channel-wise control (tests/stages/test_flux_control.py)


def test_a_plain_run_on_paired_data_warns_that_the_conditioning_images_go_unused(caplog):
    from pipeline.train import reference

    reference.note_unused(get_family("sd1x"), HALF_PAIRED, controlnet=False)
    assert "dataset(s) shapes are paired with conditioning images" in caplog.text
    caplog.clear()
    reference.note_unused(get_family("sd1x"), HALF_PAIRED, controlnet=True)
    reference.note_unused(get_family("sd1x"), MASKS_ONLY, controlnet=False)  # masks weight the loss: they are used
    assert caplog.text == ""

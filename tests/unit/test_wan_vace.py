"""Wan 2.1 VACE (`wan_vace`, the vace-1.3b-2.1 / vace-14b-2.1 flavours) on `st tiny-model wan DIR --flavour vace`:
routing and refusals, the zero-control conditioning and the transformer call replayed against WanVACEPipeline's own
call, and a cached 2-step LoRA run validated through WanVACEPipeline whose published LoRA (VACE blocks included) loads
into the pipeline and changes its video."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, NotSupportedError
from pipeline.families import get_family, wan_vace
from pipeline.manifest import read_manifest
from tests.helpers.wan import (FRAMES, SIZE, VALIDATION, pipeline, pipeline_calls, prompt_inputs, render,
                               run_losses, trained_run, video_frames)  # fmt: skip

FLAVOUR = "vace-1.3b-2.1"
SETS = VALIDATION
WEIGHTS = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def folder(tiny_model) -> Path:
    return tiny_model("wan", flavour="vace")


def _load(folder):
    return pipeline(folder, "WanVACEPipeline")


def _text(pipe, prompt: str = "a red circle"):
    return prompt_inputs(pipe, prompt)


def _render(pipe, text, steps: int = 2) -> np.ndarray:
    return render(pipe, steps, prompt_embeds=text["prompt_embeds"])


def test_the_flavours_and_vace_folders_train_as_vace(folder, tmp_path):
    """The tiny folder is a WanVACEPipeline with VACE blocks; the flavours (hub id or folder) and the folder alone
    train as `wan_vace.FAMILY`; a VACE flavour on a text-to-video folder, and a two-expert VACE folder, are refused."""
    index = json.loads((folder / "model_index.json").read_text())
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert index["_class_name"] == "WanVACEPipeline" and index["transformer"][1] == "WanVACETransformer3DModel"
    assert config["vace_layers"] == [0, 1] and config["vace_in_channels"] == 2 * 16 + 4 * 4
    wan = get_family("wan")
    assert wan.flavour_hub_id(FLAVOUR) == "Wan-AI/Wan2.1-VACE-1.3B-diffusers"
    assert wan.flavour_hub_id("vace-14b-2.1") == "Wan-AI/Wan2.1-VACE-14B-diffusers"
    for flavour, source in ((FLAVOUR, str(folder)), (None, str(folder)), ("vace-14b-2.1", "Wan-AI/Wan2.1-VACE-14B-x")):
        assert wan.for_run(flavour, source) is wan_vace.FAMILY
    family = wan_vace.FAMILY
    assert family.pipeline_class == "WanVACEPipeline" and family.denoiser.class_name == "WanVACETransformer3DModel"
    t2v = tmp_path / "t2v"
    t2v.mkdir()
    (t2v / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    with pytest.raises(ConfigError, match="vace-1.3b-2.1 is Wan 2.1 VACE, but the model at .* is a WanPipeline"):
        wan.for_run(FLAVOUR, str(t2v))
    two = tmp_path / "two"
    two.mkdir()
    (two / "model_index.json").write_text(json.dumps({**index, "transformer_2": index["transformer"]}))
    with pytest.raises(ConfigError, match="two transformers"):
        wan.for_run(None, str(two))


def test_zero_control_and_the_call_are_the_pipelines(folder):
    """The control latents WanVACEPipeline builds without video / mask / reference images equal `zero_control`'s
    (and what the trainer's provider gives a batch of that shape), and the VACE family's call replays the pipeline's
    transformer call exactly; the control branch matters (other control latents change the output)."""
    pipe = _load(folder)
    text = _text(pipe)
    call = pipeline_calls(pipe, prompt_embeds=text["prompt_embeds"])[-1]
    seen = {**call.kwargs, "output": call.output}
    control = wan_vace.zero_control(pipe.vae, pipe.transformer.config.patch_size, FRAMES, SIZE, SIZE)
    assert control.shape == seen["control_hidden_states"].shape == (1, 48, 2, 8, 8)
    assert float((control - seen["control_hidden_states"]).abs().max()) == 0.0
    provider = wan_vace.ZeroControl.for_run(wan_vace.FAMILY, str(folder), None, pipe.transformer, "cpu")
    batch = provider.conditioning(torch.zeros(2, 16, 2, 8, 8))
    assert batch.shape == (2, 48, 2, 8, 8) and torch.equal(batch[1], control[0])
    assert wan_vace.ZeroControl.for_run(get_family("wan"), str(folder), None, pipe.transformer, "cpu") is None
    latents = seen["hidden_states"]
    with torch.no_grad():
        ours = wan_vace.FAMILY.denoiser_forward(pipe.transformer, latents, seen["timestep"],
                                                {**text, wan_vace.CONTROL_KEY: control})  # fmt: skip
        other = wan_vace.FAMILY.denoiser_forward(pipe.transformer, latents, seen["timestep"],
                                                 {**text, wan_vace.CONTROL_KEY: torch.zeros_like(control)})  # fmt: skip
    assert float((ours - seen["output"]).abs().max()) == 0.0
    assert not torch.allclose(ours, other)


def test_a_vace_run_with_paired_image_datasets_or_tread_is_refused(folder):
    from types import SimpleNamespace

    from pipeline.train import reference

    with pytest.raises(ConfigError, match="tread_config with a Wan VACE model"):
        wan_vace.ZeroControl.for_run(wan_vace.FAMILY, str(folder), None, None, "cpu",
                                     SimpleNamespace(tread_config={"routes": []}))  # fmt: skip

    manifest = {"datasets": [{"id": "stills", "dataset_type": "image", "conditioning_data": ["depth"]},
                             {"id": "clips", "dataset_type": "video", "conditioning_data": ["depth"]}],
                "conditioning_datasets": [{"id": "depth", "conditioning_type": "controlnet"}]}  # fmt: skip
    with pytest.raises(NotSupportedError, match="stills link conditioning images.*Wan VACE control training on image"):
        reference.check(wan_vace.FAMILY, manifest)
    reference.check(wan_vace.FAMILY, {**manifest, "datasets": manifest["datasets"][1:]})  # control clips train
    reference.check(wan_vace.FAMILY, {"datasets": [{"id": "clips", "dataset_type": "video"}]})


@pytest.fixture(scope="module")
def chain(tmp_path_factory, folder):
    """Two generated clips cached for the tiny VACE model and a 2-step LoRA run validated at step 2 (root, config,
    run)."""
    root = tmp_path_factory.mktemp("wan-vace-chain")
    config, run = trained_run(root, folder, FLAVOUR, *SETS)
    return root, config, run


def test_the_run_trains_the_vace_transformer_and_validates_through_the_vace_pipeline(chain):
    _, _, run = chain
    manifest = read_manifest(run)
    assert manifest["config"]["pipeline"] == "WanVACEPipeline"
    losses = run_losses(run)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert len(video_frames(run / "validation" / "step-2" / "validation-32x32-0.mp4")) == FRAMES


def test_the_published_lora_covers_the_vace_blocks_and_changes_the_pipelines_video(chain, folder, tmp_path):
    """The LoRA targets the attention of the VACE blocks as well as the base blocks' (SimpleTuner's Wan targets); the
    published file loads into WanVACEPipeline and changes its video, and so does its VACE-block part alone."""
    from safetensors.torch import load_file, save_file

    from pipeline.config import load_config
    from pipeline.publish.stage import run_publish

    _, config, run = chain
    out = tmp_path / "published"
    run_publish(load_config(config), run, out)
    state = load_file(str(out / WEIGHTS))
    assert any(k.startswith("transformer.vace_blocks.1.attn1.to_q.lora_A") for k in state)
    assert any(k.startswith("transformer.blocks.0.attn2.to_out.0.lora_B") for k in state)
    vace_only = tmp_path / "vace"
    vace_only.mkdir()
    save_file({k: v for k, v in state.items() if ".vace_blocks." in k}, str(vace_only / WEIGHTS))
    pipe = _load(folder)
    text = _text(pipe)
    base = _render(pipe, text)
    renders = []
    for weights in (out, vace_only):
        tuned = _load(folder)
        tuned.load_lora_weights(str(weights), weight_name=WEIGHTS)
        renders.append(_render(tuned, text))
    assert base.shape == renders[0].shape == (1, FRAMES, SIZE, SIZE, 3)
    assert np.abs(renders[0] - base).max() > 1e-4 and np.abs(renders[1] - base).max() > 1e-4

"""`st train` and `st publish` on the tiny models of the newer families (AuraFlow, Lumina 2, Sana, ..., DeepFloyd IF): a resumed run
ends byte for byte where an uninterrupted one does; the published LoRA loads into the family's diffusers pipeline and
changes its image; ComfyUI's file is written where ComfyUI has a layout for the family (AuraFlow and HiDream:
diffusers names under `transformer.`; Qwen-Image and Z-Image: the transformer's own module names; Chroma: Flux's
native names) and refused with the fix where it has none."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.families import get_family
from pipeline.publish.stage import run_publish
from tests.helpers.training import WEIGHTS, losses, train

FAMILIES = ("auraflow", "lumina2", "sana", "kolors", "qwen_image", "z_image", "chroma", "hidream", "cosmos2image",
            "deepfloyd", "omnigen")
# ComfyUI loads OmniGen2 (comfy/ldm/omnigen/omnigen2.py), a different model, and has no OmniGen v1 model.
NO_COMFYUI = ("lumina2", "sana", "kolors", "cosmos2image", "deepfloyd", "omnigen")
SETS = ["checkpoint_step_interval=2", "learning_rate=1e-2", "lora_dropout=0", "caption_dropout_probability=0",
        'mixed_precision="no"', "lora_rank=4", "lora_alpha=8"]  # fmt: skip
IMAGE_SIDE = {"qwen_image": 32}  # the others render at 64 px


@pytest.fixture(scope="module")
def straight(cached, tmp_path_factory):
    """`straight(family)`: the output of an uninterrupted 3-step LoRA run, trained on first use."""
    runs = {}

    def get(family: str):
        if family not in runs:
            root, config = cached(family)
            runs[family] = tmp_path_factory.mktemp(f"{family}-straight") / "train"
            train(config, root / "cache", runs[family], *SETS, "max_train_steps=3")
        return runs[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_is_exact(cached, straight, tmp_path, family):
    root, config = cached(family)
    resumed = tmp_path / "resumed"
    train(config, root / "cache", resumed, *SETS, "max_train_steps=2")
    result = train(config, root / "cache", resumed, *SETS, "max_train_steps=3", 'resume_from_checkpoint="latest"')
    assert result.manifest["metrics"]["steps"] == 3
    assert losses(resumed)[3] == losses(straight(family))[3]
    assert (resumed / WEIGHTS).read_bytes() == (straight(family) / WEIGHTS).read_bytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_published_lora_loads_into_the_pipeline_and_changes_its_image(cached, straight, tiny_model, tmp_path, family):
    _, config = cached(family)
    run_publish(load_config(config), straight(family), tmp_path / "publish")
    (lora_file,) = (tmp_path / "publish").rglob("pytorch_lora_weights.safetensors")
    spec, side = get_family(family), IMAGE_SIDE.get(family, 64)

    def image(with_lora: bool) -> np.ndarray:
        pipe = spec.load_pipeline_class().from_pretrained(str(tiny_model(family)))
        pipe.set_progress_bar_config(disable=True)
        if with_lora:
            spec.load_lora_into_pipeline(pipe, lora_file)
        return pipe("a red circle", num_inference_steps=2, height=side, width=side, guidance_scale=1.0,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    base, tuned = image(False), image(True)
    # Same seed on the CPU: the renders are deterministic, so a difference well above float rounding (1e-6) is the
    # LoRA's. Three steps of SimpleTuner's AdamWBF16 move auraflow's tiny render by ~1e-3.
    assert np.isfinite(tuned).all() and np.abs(tuned - base).max() > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_file_is_written_or_refused_with_the_fix(cached, straight, tiny_model, tmp_path, family):
    _, config = cached(family)
    options, out = load_config(config, ['lora_format="comfyui"']), tmp_path / "publish"
    if family in NO_COMFYUI:
        refused = f'no ComfyUI LoRA layout is known for {family}; publish with lora_format = "diffusers"'
        with pytest.raises(UserError, match=refused):
            run_publish(options, straight(family), out)
        return
    run_publish(options, straight(family), out)
    tensors = load_file(str(out / "pytorch_lora_weights_comfyui.safetensors"))
    assert tensors
    if family in ("auraflow", "hidream"):  # HiDream's ComfyUI model keeps diffusers' module names
        assert all(k.startswith("transformer.") for k in tensors)
        assert {k.rsplit(".", 2)[-2] for k in tensors if not k.endswith(".alpha")} == {"lora_A", "lora_B"}
        assert all(v.item() == 8.0 for k, v in tensors.items() if k.endswith(".alpha"))
    elif family == "chroma":  # Flux's native names, which ComfyUI's Chroma model keeps; q/k/v fused
        modules = {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in tensors if k.endswith("lora_A.weight")}
        double = {f"double_blocks.0.{stream}_attn.{layer}" for stream in ("img", "txt") for layer in ("qkv", "proj")}
        assert modules == double | {"single_blocks.0.linear1", "single_blocks.1.linear1"}
    else:  # qwen_image, z_image: `diffusion_model.` + the transformer's module names
        denoiser = get_family(family).denoiser
        transformer = denoiser.load_class().from_pretrained(str(tiny_model(family)), subfolder=denoiser.subfolder)
        names = set(transformer.state_dict())
        modules = {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in tensors if k.endswith("lora_A.weight")}
        assert modules and all(f"{m}.weight" in names for m in modules)

"""Channel-wise control (`control: true`) on the tiny Flux model, from a paired dataset (pictures and their edge images
as control images): two LoRA steps with the widened input layer, a resumed run that ends byte for byte where an
uninterrupted one does, validation through FluxControlPipeline saving each render beside its control image, and a
published LoRA that FluxControlPipeline loads (widening the base's input layer) and whose render follows the control
image. Families and settings it cannot train stop before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError, NotSupportedError
from pipeline.publish.stage import run_publish
from tests.helpers.training import WEIGHTS, losses
from tests.stages.reference_runs import VALIDATION, train_lora

SETS = ["control=true"]


def train_here(setup: tuple[Path, Path], out: Path, *sets: str):
    return train_lora(setup, out, *SETS, *sets)


@pytest.fixture(scope="module")
def straight(paired, tmp_path_factory) -> Path:
    """An uninterrupted 2-step control LoRA run with a validation at its end."""
    out = tmp_path_factory.mktemp("control") / "train"
    train_here(paired("flux"), out, *VALIDATION)
    return out


def test_control_trains_from_pairs_resumes_exactly_and_saves_renders_beside_their_control_image(paired, straight,
                                                                                                tmp_path):  # fmt: skip
    from safetensors.torch import load_file

    manifest = json.loads((straight / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2 and manifest["config"]["pipeline"] == "FluxControlPipeline"
    tensors = load_file(str(straight / WEIGHTS))
    # the input layer's LoRA takes the noisy and the control latents (2 x 64 packed channels)
    assert tensors["transformer.x_embedder.lora_A.weight"].shape[1] == 128
    names = {p.name for p in (straight / "validation" / "step-2").glob("*.png")}
    assert {"validation-64x64-0.png", "validation-64x64-control.png"} <= names

    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "checkpoint-1", resumed / "checkpoints" / "checkpoint-1")
    train_here(paired("flux"), resumed, *VALIDATION, "max_train_steps=2")  # continues from the run's checkpoint-1
    assert json.loads((resumed / "manifest.json").read_text())["stats"]["steps_this_run"] == 1
    assert losses(resumed)[2] == losses(straight)[2]
    assert (resumed / WEIGHTS).read_bytes() == (straight / WEIGHTS).read_bytes()


def test_published_lora_loads_into_flux_control_pipeline_and_follows_the_control_image(paired, straight, tiny_model,
                                                                                      tmp_path):  # fmt: skip
    from diffusers import FluxControlPipeline
    from PIL import Image

    root, config = paired("flux")
    out = tmp_path / "publish"
    run_publish(load_config(config), straight, out)
    card = (out / "README.md").read_text()
    assert "FluxControlPipeline" in card and "control_image=" in card
    pipe = FluxControlPipeline.from_pretrained(str(tiny_model("flux")))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    assert pipe.transformer.config.in_channels == 128
    controls = [Image.open(path).convert("RGB").resize((64, 64))
                for path in sorted((root / "data" / "edges").glob("*.png"))[:2]]  # fmt: skip

    def render(control) -> np.ndarray:
        return pipe(control_image=control, prompt="a red circle on a white background", num_inference_steps=2,
                    height=64, width=64, guidance_scale=1.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip

    first = render(controls[0])
    assert np.isfinite(first).all() and np.abs(render(controls[1]) - first).max() > 1e-4
    comfy = Path(config).with_name("comfyui.json")  # ComfyUI would not widen the base's input layer: refused
    comfy.write_text(json.dumps({**json.loads(Path(config).read_text()), "lora_format": "comfyui"}))
    with pytest.raises(NotSupportedError, match="lora_format comfyui for a `control: true` LoRA"):
        run_publish(load_config(comfy), straight, tmp_path / "comfyui")
    assert not (tmp_path / "comfyui").exists()


@pytest.mark.parametrize(("family", "sets", "error", "match"), [
    ("sd1x", (), NotSupportedError, "control: true .* not supported for model_family sd1x"),
    ("flux", ('model_type="full"',), NotSupportedError, "control: true trains a LoRA"),
    ("flux", ("controlnet=true",), ConfigError, "controlnet and control"),
    ("flux", ('peft_lora_target_modules=["to_q"]',), ConfigError, "x_embedder"),
    ("flux", (), ConfigError, "FluxControlPipeline trains on \\(control image, image\\) pairs"),
])  # fmt: skip
def test_what_control_cannot_train_stops_before_training(cached, tmp_path, family, sets, error, match):
    with pytest.raises(error, match=match) as raised:
        train_here(cached(family), tmp_path / "train", *sets)
    assert raised.value.exit_code == 2
    assert not (tmp_path / "train" / "checkpoints").exists()

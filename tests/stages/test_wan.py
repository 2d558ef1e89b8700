"""The Wan chain on generated video: `st sample-data --video` -> prepare -> cache -> train a LoRA (exact resume,
validation MP4 + frame grid) -> publish (diffusers and ComfyUI layouts) -> the LoRA loads into WanPipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.manifest import read_manifest
from pipeline.publish.stage import run_publish
from tests.helpers.training import WEIGHTS, losses, train
from tests.helpers.wan import FRAMES, SETS, VALIDATE_AT_2, render_lora


@pytest.fixture(scope="module")
def chain(tmp_path_factory, wan_clips):
    """Two generated clips prepared and cached for the tiny Wan model (`wan_clips`), and a 2-step LoRA run over them
    that validates at step 2 (root, config, run folder)."""
    root, config = wan_clips
    run = tmp_path_factory.mktemp("wan-chain") / "straight"
    train(config, root / "cache", run, *SETS, *VALIDATE_AT_2)
    return root, config, run


def test_lora_resumes_exactly(chain, tmp_path):
    root, config, straight = chain
    resumed = tmp_path / "resumed"
    train(config, root / "cache", resumed, *SETS, "max_train_steps=1")
    train(config, root / "cache", resumed, *SETS, 'resume_from_checkpoint="latest"')
    assert losses(resumed) == losses(straight)
    assert (resumed / WEIGHTS).read_bytes() == (straight / WEIGHTS).read_bytes()


def test_block_swap_over_wans_blocks_trains_the_same_lora(chain, tmp_path):
    root, config, straight = chain
    train(config, root / "cache", tmp_path / "swapped", *SETS, "musubi_blocks_to_swap=1")
    assert (tmp_path / "swapped" / WEIGHTS).read_bytes() == (straight / WEIGHTS).read_bytes()


def test_validation_writes_mp4_and_frame_grid(chain):
    import av
    from PIL import Image

    _, _, run = chain
    folder = run / "validation" / "step-2"
    with av.open(str(folder / "validation-32x32-0.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        rate = container.streams.video[0].average_rate
    assert len(frames) == FRAMES and frames[0].shape == (32, 32, 3)
    assert rate == 15  # framerate unset: Wan's 15, as SimpleTuner sets it
    grid = Image.open(folder / "validation-32x32-0.png")
    assert grid.height == 32 + 2 * 2 and grid.width == FRAMES * 32 + (FRAMES + 1) * 2  # one row of 5 frames
    assert (folder / "grid.png").is_file()
    outputs = {o["path"] for o in read_manifest(run)["outputs"]}
    assert "validation/step-2/validation-32x32-0.mp4" in outputs


def _render(model: Path, lora: Path | None = None) -> np.ndarray:
    """WanPipeline's video of the prompt (its own text encoding and default guidance, 5)."""
    return render_lora(model, lora, prompt="a red circle", guidance_scale=5.0)


def test_published_lora_changes_wan_pipeline_output(chain, tmp_path, tiny_model):
    _, config, run = chain
    diffusers_out, comfy_out = tmp_path / "diffusers", tmp_path / "comfyui"
    run_publish(load_config(config), run, diffusers_out)
    run_publish(load_config(config, ['lora_format="comfyui"']), run, comfy_out)
    card = (diffusers_out / "README.md").read_text()
    assert "## Validation videos" in card and "![validation grid](assets/grid.png)" in card
    assert "export_to_video" in card and 'pipeline_tag: "text-to-video"' in card
    assert '"video.mp4", fps=15)' in card  # the rate of the run's validation videos (Wan's 15)
    assert (diffusers_out / "assets" / "validation-32x32-0.mp4").is_file()

    base = _render(tiny_model("wan"))
    with_lora = _render(tiny_model("wan"), diffusers_out / "pytorch_lora_weights.safetensors")
    # ComfyUI's layout: the original Wan names (diffusion_model.blocks.N.self_attn.q, ...), which diffusers'
    # Wan loader converts as ComfyUI reads them
    from safetensors import safe_open

    comfy_file = comfy_out / "pytorch_lora_weights_comfyui.safetensors"
    with safe_open(str(comfy_file), framework="pt") as handle:
        keys = list(handle.keys())
    assert all(k.startswith("diffusion_model.blocks.") for k in keys)
    assert any(".self_attn.q." in k for k in keys)
    with_comfy = _render(tiny_model("wan"), comfy_file)
    assert np.abs(with_lora - base).max() > 1e-4
    np.testing.assert_allclose(with_comfy, with_lora, atol=1e-5)

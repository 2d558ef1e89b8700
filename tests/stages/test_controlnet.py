"""`controlnet: true` on the tiny models, from a generated paired dataset (shapes and their edges): two steps train
the ControlNet only, a resumed run ends byte for byte where an uninterrupted one does (SD 1.x, Flux), validation
saves each render beside its conditioning image, and the published folder is a diffusers ControlNet that the
family's ControlNet pipeline loads and that changes its image when the conditioning image changes (every family st
trains ControlNets for)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.families.controlnet import SPECS
from pipeline.publish.controlnet import COMFYUI_KEYS
from pipeline.publish.stage import run_publish
from tests.helpers.training import QUICK, ST, losses, st_env

FAMILIES = ("sd1x", "flux")
SETS = ["learning_rate=1e-2", "caption_dropout_probability=0", 'mixed_precision="no"', "checkpoint_step_interval=1",
        'model_type="full"', "controlnet=true"]  # fmt: skip
WEIGHTS = Path("final") / "controlnet" / "diffusion_pytorch_model.safetensors"


def write_shapes(root: Path, count: int = 4) -> None:
    """`images/`: a square or a circle per image, with its caption; `edges/`: each image's edges (PIL's FIND_EDGES),
    the conditioning image of the same name."""
    from PIL import Image, ImageDraw, ImageFilter

    (root / "images").mkdir(parents=True)
    (root / "edges").mkdir()
    for i in range(count):
        image = Image.new("RGB", (64, 64), "white")
        draw = ImageDraw.Draw(image)
        shape = "circle" if i % 2 else "square"
        (draw.ellipse if i % 2 else draw.rectangle)((8 + 4 * i, 10, 40 + 4 * i, 50), fill=(200, 40 * i, 30))
        image.save(root / "images" / f"s{i}.png")
        (root / "images" / f"s{i}.txt").write_text(f"a {shape}")
        image.convert("L").filter(ImageFilter.FIND_EDGES).convert("RGB").save(root / "edges" / f"s{i}.png")


def paired_config(root: Path, family: str, model: Path) -> Path:
    """SimpleTuner's ControlNet dataset list (CONTROLNET.md): an image dataset naming its conditioning dataset."""
    write_shapes(root)
    datasets = [{"id": "shapes", "type": "local", "instance_data_dir": "images", "caption_strategy": "textfile",
                 "conditioning_data": "edges"},
                {"id": "edges", "type": "local", "dataset_type": "conditioning", "instance_data_dir": "edges"},
                {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "type": "local"}]  # fmt: skip
    (root / "multidatabackend.json").write_text(json.dumps(datasets))
    config = {"data_backend_config": "multidatabackend.json", "model_family": family,
              "pretrained_model_name_or_path": str(model), "resolution": 64, "resolution_type": "pixel",
              "aspect_bucket_alignment": 32, "train_batch_size": 1, "gradient_checkpointing": False,
              "vae_dtype": "fp32", "validation_prompt": "a circle", "validation_resolution": "64",
              "validation_num_inference_steps": 2, "num_validation_images": 1, "validation_guidance": 1.0, "seed": 3}  # fmt: skip
    (root / "config.json").write_text(json.dumps(config))
    return root / "config.json"


@pytest.fixture(scope="module")
def paired(tmp_path_factory, tiny_model):
    """`paired(family)`: (root, config) of the shapes/edges dataset prepared and cached for the family's tiny model."""
    from pipeline.cache.stage import run_cache
    from pipeline.prepare.stage import run_prepare

    built: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in built:
            root = tmp_path_factory.mktemp(f"paired-{family}")
            config = paired_config(root, family, tiny_model(family))
            loaded = load_config(config)
            run_prepare(loaded, root / "prepare")
            run_cache(loaded, root / "prepare", root / "cache")
            built[family] = (root, config)
        return built[family]

    return get


def train_here(setup: tuple[Path, Path], out: Path, *sets: str):
    """`st train` in this process (one torch thread, see tests/conftest.py)."""
    from pipeline.train.stage import run_train

    root, config = setup
    return run_train(load_config(config, [*QUICK, *SETS, *sets]), root / "cache", out)


def st_train(setup: tuple[Path, Path], out: Path, *sets: str) -> None:
    """`st train` as its own process, with this process's single torch thread (so that bytes compare)."""
    root, config = setup
    options = [item for s in (*QUICK, *SETS, *sets) for item in ("--set", s)]
    done = subprocess.run([ST, "train", "-c", str(config), "-i", str(root / "cache"), "-o", str(out), *options],
                          env={**st_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def straight(paired, tmp_path_factory):
    """`straight(family)`: an uninterrupted 2-step ControlNet run with a validation at its end."""
    runs: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in runs:
            runs[family] = tmp_path_factory.mktemp(f"controlnet-{family}") / "train"
            train_here(paired(family), runs[family], "validation_disable=false", "validation_step_interval=100")
        return runs[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_controlnet_trains_resumes_exactly_and_saves_renders_beside_their_conditioning(paired, straight, tmp_path,
                                                                                       family):  # fmt: skip
    from safetensors.torch import load_file

    run = straight(family)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["final"]["format"] == "controlnet" and manifest["metrics"]["steps"] == 2
    config = json.loads((run / "final" / "controlnet" / "config.json").read_text())
    assert config["_class_name"] == SPECS[family].model_class
    checkpoint = load_file(str(run / "checkpoints" / "checkpoint-2" / "weights.safetensors"))
    assert checkpoint and all(k.startswith("controlnet.") for k in checkpoint)  # the frozen base is not saved
    names = {p.name for p in (run / "validation" / "step-2").glob("*.png")}
    assert {"validation-64x64-0.png", "validation-64x64-control.png"} <= names

    resumed = tmp_path / "resumed"
    train_here(paired(family), resumed, "max_train_steps=1")
    st_train(paired(family), resumed, "max_train_steps=2")  # a new process continues from checkpoint-1
    assert losses(resumed)[2] == losses(run)[2]
    assert (resumed / WEIGHTS).read_bytes() == (run / WEIGHTS).read_bytes()


@pytest.mark.parametrize("family", sorted(SPECS))
def test_published_controlnet_loads_in_the_pipeline_and_follows_the_conditioning_image(paired, straight, tiny_model,
                                                                                       tmp_path, family):  # fmt: skip
    import diffusers
    from PIL import Image

    _, config = paired(family)
    out = tmp_path / "publish"
    run_publish(load_config(config), straight(family), out)
    spec = SPECS[family]
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert f"A ControlNet for `{tiny_model(family).name}`" in card and "assets/validation-64x64-control.png" in card

    controlnet = getattr(diffusers, spec.model_class).from_pretrained(str(out))
    pipe = getattr(diffusers, spec.pipeline_class).from_pretrained(str(tiny_model(family)), controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)

    def render(condition: Image.Image) -> np.ndarray:
        torch.manual_seed(0)  # SD3's pipeline samples the control image's latents from the global generator
        return pipe("a circle", **{spec.control_argument: condition}, num_inference_steps=2, height=64, width=64,
                    guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]

    blank = Image.new("RGB", (64, 64), "black")
    edges = Image.open(paired(family)[0] / "edges" / "s1.png").convert("RGB")
    first, second = render(blank), render(edges)
    # Rendering is deterministic (the same image twice gives the same bytes); two steps move the ControlNet's
    # zero-initialised output layers only a little, so the change is small but real.
    assert np.array_equal(render(blank), first)
    assert np.isfinite(second).all() and np.abs(first - second).max() > 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_format_is_the_controlnet_file_with_the_keys_comfyuis_loader_detects(paired, straight, tmp_path,
                                                                                     family):  # fmt: skip
    from safetensors import safe_open

    _, config = paired(family)
    out = tmp_path / "publish"
    run_publish(load_config(config, ['lora_format="comfyui"']), straight(family), out)
    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert set(COMFYUI_KEYS[SPECS[family].model_class]) <= keys
    # what would make ComfyUI take it for another kind (XLabs' Flux, Stability's SD 3.5 ControlNets)
    assert not keys & {"double_blocks.0.img_attn.norm.key_norm.scale", "transformer_blocks.0.adaLN_modulation.1.bias"}
    assert "## Use with ComfyUI" in (out / "README.md").read_text()


@pytest.mark.parametrize("family", FAMILIES)
def test_an_adapter_on_the_controlnet_trains_resumes_exactly_and_publishes_merged(paired, tiny_model, tmp_path,
                                                                                  family):  # fmt: skip
    """model_type lora (SimpleTuner's ControlNet example): a LoHa (SD 1.x) or LoRA (Flux) on the ControlNet; the
    checkpoints hold the adapter only, the final folder is the ControlNet with it merged, and the adapter file
    applied with peft onto the ControlNet it was trained on gives the merged ControlNet's output."""
    import diffusers
    from peft import LoHaConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pipeline.families import get_family
    from pipeline.families.limits import vae_scale_factor
    from pipeline.train.controlnet import ControlNetTraining

    lora = ['model_type="lora"', "lora_rank=4", "lora_dropout=0"]
    run, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_here(paired(family), run, *lora)
    checkpoint = load_file(str(run / "checkpoints" / "checkpoint-2" / "weights.safetensors"))
    adapter_key = "hada_" if family == "sd1x" else "lora_"
    assert checkpoint and all(adapter_key in k for k in checkpoint)  # the adapter only
    shutil.copytree(run / "checkpoints" / "checkpoint-1", resumed / "checkpoints" / "checkpoint-1")
    train_here(paired(family), resumed, *lora, "max_train_steps=2")  # continues from the run's checkpoint-1
    assert json.loads((resumed / "manifest.json").read_text())["stats"]["steps_this_run"] == 1
    assert losses(resumed)[2] == losses(run)[2]
    assert (resumed / WEIGHTS).read_bytes() == (run / WEIGHTS).read_bytes()

    out = tmp_path / "publish"
    run_publish(load_config(paired(family)[1]), run, out)
    assert f"with a {'LoHa' if family == 'sd1x' else 'LoRA'} on it" in (out / "README.md").read_text()
    spec = SPECS[family]
    merged = getattr(diffusers, spec.model_class).from_pretrained(str(out)).eval()
    # the ControlNet the adapter was trained on, built from the base as the run built it
    loaded = load_config(paired(family)[1], ['model_type="full"', "controlnet=true"])
    pipe = getattr(diffusers, get_family(family).pipeline_class).from_pretrained(str(tiny_model(family)))
    denoiser = getattr(pipe, get_family(family).denoiser.subfolder)
    scale = vae_scale_factor(get_family(family), str(tiny_model(family)), None)
    training = ControlNetTraining(loaded.config, get_family(family), base_dir=None, seed=loaded.config.seed,
                                  vae_scale=scale)  # fmt: skip
    training.build(denoiser)
    base = training.controlnet.eval()
    torch.manual_seed(0)
    pixels = family == "sd1x"
    latents = torch.randn(1, 4 if pixels else 16, 8, 8)
    control = torch.rand(1, 3, 8 * scale, 8 * scale) if pixels else torch.randn(1, 16, 8, 8)
    width = denoiser.config.cross_attention_dim if pixels else denoiser.config.joint_attention_dim
    text = {"prompt_embeds": torch.randn(1, 77, width)}
    if not pixels:
        text["pooled_prompt_embeds"] = torch.randn(1, denoiser.config.pooled_projection_dim)

    def predict(controlnet):
        with torch.no_grad():
            return spec.predict(denoiser, controlnet, latents, torch.tensor([500]), text, None, None, control)

    untrained = predict(base)
    adapter = out / "controlnet_lora.safetensors"
    if pixels:  # a LoHa: peft loads it
        with safe_open(str(adapter), framework="pt") as f:
            settings = json.loads(f.metadata()["lora_adapter_metadata"])
            state = {k.removeprefix("controlnet."): f.get_tensor(k) for k in f.keys()}
        keep = ("r", "alpha", "target_modules", "use_effective_conv2d")
        inject_adapter_in_model(LoHaConfig(**{k: v for k, v in settings.items() if k in keep}), base)
        set_peft_model_state_dict(base, state)
    else:  # a LoRA: diffusers' own adapter loader reads it
        base.load_lora_adapter(str(adapter), prefix="controlnet")
    expected = predict(merged)
    assert torch.allclose(predict(base), expected, atol=1e-5)
    assert not torch.allclose(untrained, expected, atol=1e-6)  # the adapter changed the ControlNet

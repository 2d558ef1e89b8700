"""`controlnet: true` on the tiny models, from a generated paired dataset (shapes and their edges): two steps train
the ControlNet only, a resumed run ends byte for byte where an uninterrupted one does (SD 1.x, Flux), validation
saves each render beside its conditioning image, and the published folder is a diffusers ControlNet that the
family's ControlNet pipeline loads and that changes its image when the conditioning image changes (every family st
trains ControlNets for)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.families.controlnet import SPECS
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


def test_comfyui_format_is_refused_for_a_controlnet(paired, straight, tmp_path):
    _, config = paired("sd1x")
    with pytest.raises(UserError, match="a ControlNet is published as a diffusers ControlNet folder"):
        run_publish(load_config(config, ['lora_format="comfyui"']), straight("sd1x"), tmp_path / "publish")

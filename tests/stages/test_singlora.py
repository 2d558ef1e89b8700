"""`peft_lora_mode = "singlora"`: peft-singlora's layers train with SimpleTuner's ramp, resume exactly in a process of
their own, and publish a plain LoRA that diffusers loads with the trained output (and SimpleTuner's SingLoRA file)."""

from __future__ import annotations

import subprocess

import pytest

from pipeline.families import get_family, load_components
from pipeline.singlora_format import SINGLORA_WEIGHT_NAME
from tests.helpers.training import QUICK, WEIGHTS, denoise, st_train_args, train

SETS = ["train_batch_size=1", "learning_rate=0.01", "lora_dropout=0", "caption_dropout_probability=0",
        "lr_scheduler=\"constant\"", "lr_warmup_steps=0", "mixed_precision=\"no\"", "lora_rank=4",
        "peft_lora_mode=\"singlora\"", "singlora_ramp_up_steps=2", "max_train_steps=3",
        "checkpoint_step_interval=1", "checkpoints_total_limit=5"]  # fmt: skip


def checkpoint_weights(out, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"checkpoint-{step}" / "weights.safetensors"))


@pytest.fixture(scope="module")
def sd1x_run(cached, tmp_path_factory):
    """3 steps of sd1x SingLoRA (ramp over 2 steps), a checkpoint after each, validation images at the end."""
    root, config = cached("sd1x")
    out = tmp_path_factory.mktemp("singlora") / "out"
    train(config, root / "cache", out, *SETS, "validation_disable=false", "validation_num_inference_steps=1",
          'validation_resolution="64"', "validation_step_interval=100")  # fmt: skip
    return root, config, out


def test_layers_train_with_simpletuners_ramp(sd1x_run):
    """Step n trains at t = max(n - 2, 0) (SimpleTuner's update after each step), so the first two steps leave A
    where weight decay puts it and the third, at u = 1/2, moves it."""
    _, _, out = sd1x_run
    weights = {step: checkpoint_weights(out, step) for step in (1, 2, 3)}
    steps = {step: {float(v) for k, v in w.items() if k.endswith("training_step_default")}
             for step, w in weights.items()}  # fmt: skip
    assert steps == {1: {0.0}, 2: {1.0}, 3: {2.0}}
    names = [k for k in weights[1] if k.endswith("lora_A.default")]
    assert names and all(weights[1][k].shape[1] == 4 for k in names)
    decay_only = max(float((weights[2][k] - weights[1][k]).abs().max()) for k in names)
    trained = max(float((weights[3][k] - weights[2][k]).abs().max()) for k in names)
    assert trained > 100 * decay_only
    assert list((out / "validation" / "step-3").glob("*.png"))


def test_resume_in_another_process_is_exact(sd1x_run, tmp_path):
    root, config, out = sd1x_run
    resumed = tmp_path / "resumed"
    train(config, root / "cache", resumed, *SETS, "max_train_steps=2")
    # The same thread count as this process (OMP_NUM_THREADS is inherited): CPU results are bitwise equal only so.
    proc = subprocess.run(st_train_args((root, config), resumed, *QUICK, *SETS, 'resume_from_checkpoint="latest"'),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint-2 at step 2" in proc.stderr
    assert (resumed / WEIGHTS).read_bytes() == (out / WEIGHTS).read_bytes()
    name = "checkpoints/checkpoint-3/weights.safetensors"
    assert (resumed / name).read_bytes() == (out / name).read_bytes()


def test_published_plain_lora_loads_in_diffusers_with_the_trained_output(sd1x_run, tiny_model, tmp_path):
    """The published `pytorch_lora_weights.safetensors` is a plain LoRA (B = A[:out], A' = u A[:in]^T): diffusers'
    loader applies it to the base and reproduces the SingLoRA denoiser; the SimpleTuner-layout file is beside it."""
    from safetensors.torch import load_file

    from pipeline.config import load_config
    from pipeline.publish.stage import run_publish
    from pipeline.train import adapters
    from pipeline.train.checkpoint import read_checkpoint
    from pipeline.train.options import AdapterOptions

    root, config, out = sd1x_run
    family, model = get_family("sd1x"), tiny_model("sd1x")
    run_publish(load_config(config), out, tmp_path / "pub")
    published = load_file(str(tmp_path / "pub" / "pytorch_lora_weights.safetensors"))
    assert published and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in published)
    simpletuner = load_file(str(tmp_path / "pub" / SINGLORA_WEIGHT_NAME))
    assert {k.rsplit(".", 1)[1] for k in simpletuner} == {"lora_A", "training_step_default"}
    assert "peft_singlora" in (tmp_path / "pub" / "README.md").read_text()
    run_publish(load_config(config), out / "checkpoints" / "checkpoint-3", tmp_path / "from-checkpoint")
    for name in ("pytorch_lora_weights.safetensors", SINGLORA_WEIGHT_NAME):  # the last checkpoint is the final
        assert (tmp_path / "from-checkpoint" / name).read_bytes() == (tmp_path / "pub" / name).read_bytes()

    trained = load_components(family, str(model), which=("denoiser",))["denoiser"].eval()
    adapters.attach(trained, AdapterOptions.from_config(load_config(config, SETS).config), family)
    adapters.load_trainable_state(trained, read_checkpoint(out / "checkpoints" / "checkpoint-3")["weights"])
    expected = denoise("sd1x", trained.eval(), root)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None)
    before = denoise("sd1x", pipe.unet, root)
    family.load_lora_into_pipeline(pipe, tmp_path / "pub" / "pytorch_lora_weights.safetensors")
    loaded = denoise("sd1x", pipe.unet, root)
    assert float((expected - before).abs().max()) > 1e-4
    assert float((loaded - expected).abs().max()) < 1e-5

    # The card's peft-singlora snippet loads SimpleTuner's layout onto a fresh pipeline with the same output.
    card = (tmp_path / "pub" / "README.md").read_text().split("## SingLoRA", 1)[1]
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("path/to/this/folder", str(tmp_path / "pub"))
    scope = {"pipe": StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None)}
    exec(compile(code, "snippet", "exec"), scope)  # noqa: S102 - our own generated snippet
    assert float((denoise("sd1x", scope["pipe"].unet, root) - expected).abs().max()) < 1e-5


@pytest.mark.parametrize(("family", "extra"), [("sdxl", ()), ("sd3", ()), ("flux", ()), ("pixart_sigma", ()),
                                              ("sd1x", ('base_model_precision="int8-quanto"',))])
def test_other_families_and_a_quantised_base_train(cached, tmp_path, family, extra):
    """Every family (and SingLoRA layers around quanto's int8 layers) trains; both files are written."""
    from safetensors.torch import load_file

    root, config = cached(family)
    train(config, root / "cache", tmp_path / "out", *SETS, "checkpoint_step_interval=0", *extra)
    plain = load_file(str(tmp_path / "out" / WEIGHTS))
    assert plain and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in plain)
    steps = {float(v) for k, v in load_file(str(tmp_path / "out" / "final" / SINGLORA_WEIGHT_NAME)).items()
             if k.endswith("training_step_default")}  # fmt: skip
    assert steps == {2.0}


@pytest.mark.parametrize(("option", "message"), [("use_dora=true", "use_dora"),
                                                 ('lora_init_type="pissa"', "lora_init_type default only")])
def test_refuses_what_singlora_layers_cannot_do(cached, tmp_path, option, message):
    from pipeline.errors import ConfigError

    root, config = cached("sd1x")
    with pytest.raises(ConfigError, match=message):
        train(config, root / "cache", tmp_path / "out", *SETS, option)

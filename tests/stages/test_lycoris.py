"""`lora_type = "lycoris"`: LoKr, LoHa and LoCon through the lycoris-lora library; exact resume; published files that
the library loads back onto the base denoiser with the trained outputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.families import get_family, load_components
from tests.helpers.training import QUICK, denoise, train

SETS = ["train_batch_size=1", "learning_rate=0.01", "lora_dropout=0", "caption_dropout_probability=0",
        "lr_scheduler=\"constant\"", "lr_warmup_steps=0", "mixed_precision=\"no\""]  # fmt: skip
ALGOS = {
    "lokr": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 1, "factor": 4, "full_matrix": True,
             "apply_preset": {"target_module": ["Attention", "FeedForward"],
                              "module_algo_map": {"FeedForward": {"factor": 2}}}},
    "loha": {"algo": "loha", "linear_dim": 4, "linear_alpha": 2},
    "locon": {"algo": "locon", "linear_dim": 4, "linear_alpha": 4, "apply_preset": {"target_module": ["Attention"]}},
}  # fmt: skip
# The README's Flux LoKr example: diffusers' Flux attention class is FluxAttention (not Attention).
FLUX_LOKR = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16,
             "apply_preset": {"target_module": ["FluxAttention", "FeedForward"],
                              "module_algo_map": {"FluxAttention": {"factor": 16}, "FeedForward": {"factor": 8}}}}  # fmt: skip



def lycoris_file(folder: Path, settings: dict) -> Path:
    path = folder / "lycoris_config.json"
    path.write_text(json.dumps(settings))
    return path


def lycoris_train(family_root, out: Path, settings: dict, *sets: str):
    root, config = family_root
    path = lycoris_file(out.parent, settings)
    return train(config, root / "cache", out, *SETS, 'lora_type="lycoris"', f'lycoris_config="{path}"', *sets)


def assert_trained(out: Path) -> None:
    """The final LyCORIS weights are the library's keys and moved after step 1 (a checkpoint at every step)."""
    from safetensors.torch import load_file

    final = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    assert final and all(k.startswith("lycoris_") for k in final)
    step1 = load_file(str(out / "checkpoints" / "checkpoint-1" / "weights.safetensors"))
    assert [k for k, v in final.items() if not v.equal(step1[f"lycoris_network.{k}"])]


# LoKr trains on every family in test_published_lokr_loads_back_through_the_library, LoCon on sd1x in
# test_publish_from_a_checkpoint_and_for_comfyui; SDXL's UNet has sd1x's module classes. Flux LoHa: the library's
# default preset on Flux's own attention class.
@pytest.mark.parametrize(("family", "algo"), [("sd1x", "loha"), ("flux", "loha"), ("pixart_sigma", "locon")])
def test_algorithms_train(cached, tmp_path, family, algo):
    lycoris_train(cached(family), tmp_path / "out", ALGOS[algo], "checkpoint_step_interval=1")
    assert_trained(tmp_path / "out")


def base_denoiser(family_name: str, model: Path):
    return load_components(get_family(family_name), str(model), which=("denoiser",))["denoiser"].eval()


def trained_denoiser(family_name: str, model: Path, config: Path, checkpoint: Path, *sets: str):
    """The denoiser as st trained it: st's own LyCORIS wrapper with a checkpoint's weights."""
    from pipeline.config import load_config
    from pipeline.train import adapters
    from pipeline.train.checkpoint import read_checkpoint
    from pipeline.train.options import AdapterOptions

    denoiser = base_denoiser(family_name, model)
    options = AdapterOptions.from_config(load_config(config, list(sets)).config)
    adapters.attach(denoiser, options, get_family(family_name))
    adapters.load_trainable_state(denoiser, read_checkpoint(checkpoint)["weights"])
    return denoiser.eval()


@pytest.mark.parametrize("family", ["sd1x", "sdxl", "sd3", "flux", "pixart_sigma"])
def test_published_lokr_loads_back_through_the_library(cached, tiny_model, tmp_path, family):
    """`st publish` writes the library's file; the library loads it onto the base denoiser with the trained output."""
    from lycoris import create_lycoris_from_weights

    from pipeline.config import load_config
    from pipeline.publish.stage import run_publish

    root, config = cached(family)
    settings = FLUX_LOKR if family == "flux" else ALGOS["lokr"]
    lycoris_train((root, config), tmp_path / "out", settings, "checkpoint_step_interval=2")
    run_publish(load_config(config), tmp_path / "out", tmp_path / "pub")
    published = tmp_path / "pub" / "pytorch_lora_weights.safetensors"
    assert published.read_bytes() == (tmp_path / "out" / "final" / "pytorch_lora_weights.safetensors").read_bytes()
    card = (tmp_path / "pub" / "README.md").read_text()
    assert "create_lycoris_from_weights" in card and "lora_type | lycoris" in card

    model = tiny_model(family)
    sets = [*SETS, 'lora_type="lycoris"', f'lycoris_config="{tmp_path / "lycoris_config.json"}"']
    trained = denoise(family, trained_denoiser(family, model, config, tmp_path / "out" / "checkpoints" /
                                               "checkpoint-2", *sets), root)  # fmt: skip
    base = base_denoiser(family, model)
    before = denoise(family, base, root)
    network, _ = create_lycoris_from_weights(1.0, str(published), base)
    network.apply_to()
    loaded = denoise(family, base, root)
    assert float((trained - before).abs().max()) > 1e-4  # training changed the output
    assert float((loaded - trained).abs().max()) < 1e-5
    if family == "flux":  # both targets of the README example matched
        assert {type(m.org_module[0]).__name__ for m in network.loras} == {"Linear"}
        assert any(".attn." in m.lora_name or "_attn_" in m.lora_name for m in network.loras)
        assert any("_ff_" in m.lora_name for m in network.loras)


def test_resume_is_exact(cached, tmp_path):
    """1 step, then a resume to 2 in an `st train` process of its own, equals an uninterrupted 2-step run (with
    LyCORIS rank dropout drawing from the restored random state)."""
    root, config = cached("sd1x")
    settings = {**ALGOS["lokr"], "rank_dropout": 0.2}
    path = lycoris_file(tmp_path, settings)
    sets = [*SETS, 'lora_type="lycoris"', f'lycoris_config="{path}"', "checkpoint_step_interval=1", "use_ema=true"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config, root / "cache", straight, *sets)
    train(config, root / "cache", resumed, *sets, "max_train_steps=1")
    options = [*QUICK, *sets, 'resume_from_checkpoint="latest"']
    proc = subprocess.run([str(Path(sys.executable).with_name("st")), "train", "-c", str(config), "-i",
                           str(root / "cache"), "-o", str(resumed), *[a for o in options for a in ("--set", o)]],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint-1 at step 1" in proc.stderr
    name = "final/pytorch_lora_weights.safetensors"
    assert (straight / name).read_bytes() == (resumed / name).read_bytes()
    for part in ("weights", "ema"):
        a = (straight / "checkpoints" / "checkpoint-2" / f"{part}.safetensors").read_bytes()
        assert a == (resumed / "checkpoints" / "checkpoint-2" / f"{part}.safetensors").read_bytes()


def test_validation_renders_at_validation_lycoris_strength(cached, tmp_path):
    """At strength 0 the adapter is off while validating: the last images equal the base model's; at 1 they differ."""
    validated = ["validation_disable=false", "disable_benchmark=false", "validation_num_inference_steps=2",
                 'validation_resolution="64"', "validation_guidance=3.0", "learning_rate=0.05"]  # fmt: skip
    images = {}
    for strength in (0, 1):
        out = tmp_path / f"strength-{strength}"
        out.mkdir()
        lycoris_train(cached("sd1x"), out / "run", ALGOS["lokr"], *validated,
                      f"validation_lycoris_strength={strength}")  # fmt: skip
        folder = out / "run" / "validation"
        images[strength] = [(p.read_bytes(), (folder / "step-2" / p.name).read_bytes())
                            for p in sorted((folder / "base").glob("*.png"))]  # fmt: skip
    assert images[0] and all(base == last for base, last in images[0])
    assert any(base != last for base, last in images[1])


def test_bad_lycoris_config_stops_train_naming_file_and_key(cached, tmp_path):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lycoris_config .*lycoris_config.json: key 'algorithm'"):
        lycoris_train(cached("sd1x"), tmp_path / "out", {"algorithm": "lokr"})
    with pytest.raises(ConfigError, match="matched no module of the denoiser; check apply_preset.target_module"):
        lycoris_train(cached("sd1x"), tmp_path / "out1", {"algo": "locon",
                                                          "apply_preset": {"target_module": ["FluxAttention"]}})
    root, config = cached("sd1x")
    with pytest.raises(ConfigError, match="lora_type lycoris needs lycoris_config"):
        train(config, root / "cache", tmp_path / "out2", *SETS, 'lora_type="lycoris"')


def test_publish_from_a_checkpoint_and_for_comfyui(cached, tiny_model, tmp_path):
    """A checkpoint publishes the same LyCORIS file as the run's final weights at that step, and the same EMA file,
    which is a LyCORIS file like the main one; the ComfyUI file is the library's layout itself (ComfyUI reads
    `lycoris_*` keys)."""
    from lycoris import create_lycoris_from_weights
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pipeline.config import load_config
    from pipeline.publish.stage import run_publish

    root, config = cached("sd1x")
    lycoris_train((root, config), tmp_path / "out", ALGOS["locon"], "checkpoint_step_interval=1", "use_ema=true",
                  "ema_decay=0.5")  # fmt: skip
    assert_trained(tmp_path / "out")
    final = (tmp_path / "out" / "final" / "pytorch_lora_weights.safetensors").read_bytes()
    run_publish(load_config(config), tmp_path / "out", tmp_path / "from-final")
    run_publish(load_config(config), tmp_path / "out" / "checkpoints" / "checkpoint-2", tmp_path / "from-checkpoint")
    assert (tmp_path / "from-checkpoint" / "pytorch_lora_weights.safetensors").read_bytes() == final
    ema = tmp_path / "from-final" / "ema_weights.safetensors"
    assert ema.read_bytes() == (tmp_path / "from-checkpoint" / "ema_weights.safetensors").read_bytes()
    main = load_file(str(tmp_path / "from-final" / "pytorch_lora_weights.safetensors"))
    averaged = load_file(str(ema))
    assert set(averaged) == set(main) and any(not averaged[k].equal(main[k]) for k in main)
    with safe_open(str(ema), framework="pt") as handle:
        assert json.loads(handle.metadata()["lycoris_config"])["algo"] == "locon"
    network, _ = create_lycoris_from_weights(1.0, str(ema), base_denoiser("sd1x", tiny_model("sd1x")))
    assert len(network.loras) == 32
    run_publish(load_config(config, ['lora_format="comfyui"', 'hub_model_id="me/shapes"']), tmp_path / "out",
                tmp_path / "comfy")  # fmt: skip
    assert (tmp_path / "comfy" / "shapes_comfyui.safetensors").read_bytes() == final
    assert "ComfyUI's LoRA loader reads it as it is" in (tmp_path / "comfy" / "README.md").read_text()
    # The card's snippet, pasted on this CPU machine next to the base model: the library loads the file.
    body = (tmp_path / "from-checkpoint" / "README.md").read_text()
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    code = (code.replace("path/to/this/folder", str(tmp_path / "from-checkpoint"))
            .replace('("sd1x-0"', f"({str(tiny_model('sd1x'))!r}").replace('image.save("image.png")', ""))  # fmt: skip
    code = re.sub(r"num_inference_steps=\d+", "num_inference_steps=1", code)
    scope: dict = {}
    exec(compile(code, "snippet", "exec"), scope)  # noqa: S102 - our own generated snippet
    assert len(scope["network"].loras) == 32 and scope["image"].size[0] > 0


def test_lycoris_trains_on_an_int8_base(cached, tmp_path):
    """lycoris-lora wraps optimum-quanto's QLinear layers: the LoKr network trains on an int8 base."""
    out = tmp_path / "out"
    lycoris_train(cached("sd1x"), out, ALGOS["lokr"], 'base_model_precision="int8-quanto"', "checkpoint_step_interval=1")
    assert_trained(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stats"]["denoiser"]["base_model_precision"] == "int8-quanto"


def test_bf16_network_is_held_and_saved_in_bf16_and_restarts_exactly(cached, tmp_path):
    """mixed_precision bf16: the LyCORIS network is trained and saved in bf16 (SimpleTuner moves it to weight_dtype
    and saves it in its parameters' dtype); started from that file with learning_rate 0, a run gives it back bit for
    bit."""
    import torch
    from safetensors.torch import load_file

    from pipeline.train.checkpoint import read_checkpoint

    first, again = tmp_path / "first", tmp_path / "again"
    lycoris_train(cached("sd1x"), first, ALGOS["loha"], 'mixed_precision="bf16"', "checkpoint_step_interval=1")
    assert_trained(first)
    saved = first / "final" / "pytorch_lora_weights.safetensors"
    start = load_file(str(saved))
    assert {v.dtype for v in start.values()} == {torch.bfloat16}
    weights = read_checkpoint(first / "checkpoints" / "checkpoint-2")["weights"]
    assert {v.dtype for k, v in weights.items() if "hada_w" in k} == {torch.bfloat16}
    lycoris_train(cached("sd1x"), again, ALGOS["loha"], 'mixed_precision="bf16"', f'init_lora="{saved}"',
                  "learning_rate=0")  # fmt: skip
    end = load_file(str(again / "final" / "pytorch_lora_weights.safetensors"))
    assert set(end) == set(start) and all(torch.equal(end[k], start[k]) for k in start)

"""PEFT LoRA options: DoRA on every family exported to ComfyUI's layout, a per-module rank/alpha LoRA in that layout,
and Flux's `flux_lora_target` presets against SimpleTuner's module lists.

The ComfyUI side is a reference merge written from ComfyUI's loader (`comfy/weight_adapter/lora.py` and
`base.py::weight_decompose`): `W + (alpha / rank) * up @ down`, and with `dora_scale` on the output axis
`(W + diff) * dora_scale / (|W|_row + eps)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.families import get_family, load_components
from pipeline.publish import comfyui, keymaps, lora
from pipeline.train import adapters
from pipeline.train.checkpoint import read_checkpoint
from pipeline.train.options import AdapterOptions
from tests.helpers.training import train

SETS = ["train_batch_size=1", "learning_rate=0.01", "lora_dropout=0", "caption_dropout_probability=0",
        "lr_scheduler=\"constant\"", "lr_warmup_steps=0", "mixed_precision=\"no\"", "lora_rank=4", "lora_alpha=8",
        "lora_init_type=\"default\"", "checkpoint_step_interval=2"]  # fmt: skip
EPS = 1.1920928955078125e-07
UNETS = {"sd1x": False, "sd2x": False, "sdxl": True}


def base_denoiser(family: str, model: Path):
    return load_components(get_family(family), str(model), which=("denoiser",))["denoiser"].float().eval()


def comfy_apply(weight, tensors: dict, name: str):
    """ComfyUI's patched weight for the module `name` (key prefix) of a LoRA file."""
    down, up = (tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]) if \
        f"{name}.lora_down.weight" in tensors else (tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"])  # fmt: skip
    alpha = float(tensors[f"{name}.alpha"]) / down.shape[0]
    diff = (up.float().flatten(1) @ down.float().flatten(1)).reshape(weight.shape) * alpha
    dora_scale = tensors.get(f"{name}.dora_scale")
    if dora_scale is None:
        return weight + diff
    calc = weight + diff
    assert dora_scale.shape[0] == weight.shape[0]  # output axis, as peft decomposes
    norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    return calc * (dora_scale.float() / (norm + EPS))


def merged_weights(denoiser) -> dict[str, object]:
    """Every module's effective weight once its LoRA (DoRA included) is merged, by module name."""
    from peft.tuners.lora import LoraLayer

    for module in denoiser.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    weights = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, LoraLayer):
            weights[name] = module.base_layer.weight.detach().float()
        elif hasattr(module, "weight") and not name.endswith((".base_layer", ".lora_A.default", ".lora_B.default")):
            weights.setdefault(name, module.weight)
    return weights


def check_comfy_file(family: str, tensors: dict, lora_names: list[str], base: dict, trained: dict,
                     config: dict) -> float:  # fmt: skip
    """Largest difference between ComfyUI's merge of `tensors` onto the base and the trained weights, over every
    module of the file (fused modules compared as the concatenation of their diffusers parts)."""
    import torch

    native: dict[str, tuple[list[str], bool]] = {}
    for name in lora_names:
        if family in UNETS:
            native[keymaps.kohya_unet_name(name, UNETS[family], config)] = ([name], False)
        else:
            target = keymaps.native_target(family, name, config)
            native[f"diffusion_model.{target.module}"] = (list(target.parts) or [name], target.swap_halves)
    files = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".alpha")}
    assert files == set(native)

    def stack(weights: dict, parts: list[str], swap: bool):
        w = torch.cat([weights[p].float() for p in parts])
        return torch.cat(list(w.chunk(2))[::-1]) if swap else w

    worst = 0.0
    for key, (parts, swap) in native.items():
        patched = comfy_apply(stack(base, parts, swap), tensors, key)
        worst = max(worst, float((patched - stack(trained, parts, swap)).abs().max()))
    return worst



@pytest.mark.parametrize("family", ["sd1x", "sd2x", "sdxl", "sd3", "flux", "pixart_sigma"])
def test_dora_trains_and_exports_to_comfyui(cached, tiny_model, tmp_path, family):
    from pipeline.config import load_config

    root, config = cached(family)
    sets = [*SETS, "use_dora=true"] + (['flux_lora_target="all"'] if family == "flux" else [])
    train(config, root / "cache", tmp_path / "out", *sets)
    final = tmp_path / "out" / "final" / "pytorch_lora_weights.safetensors"
    prefix = get_family(family).denoiser.subfolder
    mods = lora.modules(lora.load_tensors(final), lora.read_header(final), prefix)
    assert mods and all(m.magnitude is not None for m in mods)

    model = tiny_model(family)
    base_model = base_denoiser(family, model)
    denoiser_config = dict(base_model.config)
    with pytest.raises(Exception, match="needs the base model's weights"):
        comfyui.convert(family, mods, denoiser_config)
    tensors = comfyui.convert(family, mods, denoiser_config, base=lora.base_weights(model / prefix))
    assert any(k.endswith(".dora_scale") for k in tensors)

    trained = base_denoiser(family, model)
    options = AdapterOptions.from_config(load_config(config, sets).config)
    adapters.attach(trained, options, get_family(family))
    state = read_checkpoint(tmp_path / "out" / "checkpoints" / "checkpoint-2")["weights"]
    adapters.load_trainable_state(trained, state)
    magnitudes = [v for k, v in state.items() if "lora_magnitude_vector" in k]
    trained_weights = merged_weights(trained)
    base_weights = {n: m.weight.detach().float() for n, m in base_model.named_modules() if hasattr(m, "weight")
                    and m.weight is not None}  # fmt: skip
    names = [m.name for m in mods]
    moved = max(float((trained_weights[n] - base_weights[n]).abs().max()) for n in names)
    assert moved > 1e-4 and magnitudes  # training changed the weights
    assert check_comfy_file(family, tensors, names, base_weights, trained_weights, denoiser_config) < 1e-5
    if family == "sd1x":  # `st publish` reads the base weights itself and writes the same file
        from safetensors.torch import load_file as load_tensors

        from pipeline.publish.stage import run_publish

        published = run_publish(load_config(config, [*sets, 'lora_format="comfyui"']), tmp_path / "out",
                                tmp_path / "published")  # fmt: skip
        (comfy,) = [p for p in published.out_dir.glob("*.safetensors") if p.name != final.name]
        written = load_tensors(comfy)
        assert written.keys() == tensors.keys()
        assert max(float((written[k].float() - tensors[k].float()).abs().max()) for k in tensors) == 0.0


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_per_module_rank_and_alpha_export_to_comfyui(tiny_model, tmp_path, family):
    """A LoRA with peft's rank_pattern / alpha_pattern: each ComfyUI module carries its own alpha and rank."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    fam = get_family(family)
    model = tiny_model(family)
    denoiser = base_denoiser(family, model)
    base = {n: m.weight.detach().float().clone() for n, m in denoiser.named_modules() if hasattr(m, "weight")
            and m.weight is not None}  # fmt: skip
    if family == "flux":
        targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out"]
        ranks, alphas = {"to_k": 2, "proj_mlp": 8}, {"to_k": 1.0, "to_out.0": 16.0, "proj_mlp": 3.0}
    else:
        targets = list(fam.lora_targets)
        ranks, alphas = {"to_k": 2, "attn2.to_v": 6}, {"to_k": 1.0, "to_out.0": 16.0}
    config = LoraConfig(r=4, lora_alpha=4, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas)
    fam.add_lora(denoiser, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    saved = fam.save_lora(tmp_path, get_peft_model_state_dict(denoiser), config=config)
    mods = lora.modules(lora.load_tensors(saved), lora.read_header(saved), fam.denoiser.subfolder)
    assert {m.rank for m in mods} >= {2, 4} and len({m.alpha for m in mods}) >= 3
    denoiser_config = dict(denoiser.config)
    tensors = comfyui.convert(family, mods, denoiser_config)
    trained = merged_weights(denoiser)
    assert check_comfy_file(family, tensors, [m.name for m in mods], base, trained, denoiser_config) < 1e-5


# SimpleTuner's flux_lora_target lists, as simpletuner/helpers/models/flux/model.py defines them.
_ALL = ["to_k", "to_q", "to_v", "to_qkv", "add_qkv_proj", "add_k_proj", "add_q_proj", "add_v_proj", "to_out.0",
        "to_add_out"]  # fmt: skip
_FFS = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
SIMPLETUNER_FLUX = {
    "mmdit": ["to_k", "to_q", "to_v", "to_out.0", "to_qkv"],  # no branch: the model's DEFAULT_LORA_TARGET
    "all": _ALL,
    "context": ["add_k_proj", "add_q_proj", "add_v_proj", "add_qkv_proj", "to_add_out"],
    "context+ffs": ["add_k_proj", "add_q_proj", "add_v_proj", "add_qkv_proj", "to_add_out", "ff_context.net.0.proj",
                    "ff_context.net.2"],
    "all+ffs": [*_ALL, *_FFS, "proj_mlp", "proj_out"],
    "all+ffs+embedder": ["x_embedder", *_ALL, *_FFS, "proj_mlp", "proj_out"],
    "ai-toolkit": [*_ALL, *_FFS, "norm.linear", "norm1.linear", "norm1_context.linear", "proj_mlp", "proj_out"],
    "tiny": ["single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"],
    "nano": ["single_transformer_blocks.7.proj_out"],
}  # fmt: skip


@pytest.mark.parametrize("preset", sorted(SIMPLETUNER_FLUX))
def test_flux_lora_target_presets_match_simpletuner(tiny_model, tmp_path, preset):
    from pipeline.config import load_config

    family = get_family("flux")
    denoiser = base_denoiser("flux", tiny_model("flux"))
    names = [n for n, _ in denoiser.named_modules()]
    wanted = {n for n in names if any(n == t or n.endswith("." + t) for t in SIMPLETUNER_FLUX[preset])}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"--model_family": "flux", "--flux_lora_target": preset}))
    config = load_config(path, ["lora_rank=2", "lora_dropout=0", 'lora_init_type="default"']).config
    adapters.attach(denoiser, AdapterOptions.from_config(config), family)
    adapted = {n.split(".lora_A")[0] for n, _ in denoiser.named_parameters() if ".lora_A." in n}
    assert adapted == wanted and wanted


@pytest.mark.parametrize("preset", ["controlnet", "all+ffs+embedder+controlnet"])
def test_flux_controlnet_targets_need_a_controlnet(tmp_path, preset):
    """The ControlNet presets name a Flux ControlNet's layers: without controlnet true a standard LoRA on the
    transformer would have none of them (tests/stages/test_flux_controlnet_preset.py: accepted with it)."""
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"--model_family": "flux", "--flux_lora_target": preset}))
    with pytest.raises(ConfigError, match="exist only with controlnet true"):
        load_config(path)


def test_default_targets_are_simpletuners(tiny_model):
    """Each family's default LoRA targets are SimpleTuner's DEFAULT_LORA_TARGET (SD3: image-stream attention only)."""
    attention = ("to_k", "to_q", "to_v", "to_out.0")
    for name in ("sd1x", "sd2x", "sdxl", "sd3", "pixart_sigma"):
        assert set(get_family(name).lora_target_modules()) == set(attention), name
    assert Config().flux_lora_target == "all"


# SimpleTuner's slider targets (its models' SLIDER_LORA_TARGET / DEFAULT_SLIDER_LORA_TARGET, fused to_qkv left out).
SIMPLETUNER_SLIDER = {
    "sd1x": ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "proj_in", "proj_out", "conv_in", "conv_out",
             "time_embedding.linear_1", "time_embedding.linear_2"],
    "flux": ["to_k", "to_q", "to_v", "to_out.0"],
}  # fmt: skip


@pytest.mark.parametrize("family_name", sorted(SIMPLETUNER_SLIDER))
def test_slider_lora_target_adapts_simpletuners_slider_modules(tiny_model, family_name):
    denoiser = base_denoiser(family_name, tiny_model(family_name))
    names = [n for n, _ in denoiser.named_modules()]
    wanted = {n for n in names if any(n == t or n.endswith("." + t) for t in SIMPLETUNER_SLIDER[family_name])}
    config = Config(model_family=family_name, slider_lora_target=True, lora_rank=2, lora_dropout=0.0)
    adapters.attach(denoiser, AdapterOptions.from_config(config), get_family(family_name))
    adapted = {n.split(".lora_A")[0] for n, _ in denoiser.named_parameters() if ".lora_A." in n}
    assert adapted == wanted and any(n.endswith("conv_in") for n in adapted) == (family_name == "sd1x")


def test_a_pissa_run_publishes_its_final_weights_but_refuses_a_checkpoint(cached, tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import NotSupportedError
    from pipeline.publish.stage import run_publish

    root, config = cached("sd1x")
    sets = [*SETS, 'lora_init_type="pissa"']
    train(config, root / "cache", tmp_path / "out", *sets)
    loaded = load_config(config, sets)
    assert run_publish(loaded, tmp_path / "out", tmp_path / "published").manifest is not None
    with pytest.raises(NotSupportedError, match="checkpoint of a lora_init_type pissa run .* publish the run's final"):
        run_publish(loaded, tmp_path / "out" / "checkpoints" / "checkpoint-2", tmp_path / "from-checkpoint")
    assert not (tmp_path / "from-checkpoint" / "pytorch_lora_weights.safetensors").exists()

"""`st publish` on tiny trained runs: weights, model card, lineage, ComfyUI layouts, full models and checkpoints."""

from __future__ import annotations

import json
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cache_reader import CacheReader
from pipeline.config import load_config
from pipeline.errors import LineageError
from pipeline.families import get_family
from pipeline.hashing import sha256_file
from pipeline.manifest import read_manifest
from pipeline.publish import comfyui, lora
from pipeline.publish.stage import run_publish
from pipeline.train.stage import run_train

PROMPT = "a red circle on a white background"
TRAIN = ["disable_benchmark=true", 'report_to="none"', "dataloader_prefetch=false", "max_train_steps=2",
         "train_batch_size=1", "eval_steps_interval=0", "lora_rank=4", "lora_alpha=8",
         "learning_rate=1e-2"]  # fmt: skip
QUIET = ["validation_disable=true"]
# sd1x LoRA: validation after the last step (2 inference steps, 64 px) and a checkpoint at every step, in fp32 (the
# default bf16 is kept on a CPU with AVX512-BF16 / AMX), so that an fp32 render of the published LoRA reproduces it.
VALIDATED = ["validation_disable=false", "validation_num_inference_steps=2", 'validation_resolution="64"',
             "validation_guidance=3.0", "checkpoint_step_interval=1", 'mixed_precision="no"']  # fmt: skip
RUNS = {
    "sd1x-lora": ("sd1x", VALIDATED),
    "sd1x-full": ("sd1x", [*QUIET, 'model_type="full"', "use_ema=true", "learning_rate=1e-4"]),
    "sdxl-lora": ("sdxl", QUIET),
    "flux-lora": ("flux", QUIET),
    "pixart-lora": ("pixart_sigma", QUIET),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cached):
    """Tiny trained runs, built on first use: get(name) -> (root of the family's shared `cached` sample dataset with
    data/config.json, prepare/, cache/; train dir). The base model is `tiny_model(family)`."""
    trained: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in trained:
            family, sets = RUNS[name]
            root, config = cached(family)
            out = tmp_path_factory.mktemp(f"publish-{name}") / "train"
            run_train(load_config(config, [*TRAIN, *sets]), root / "cache", out)
            trained[name] = (root, out)
        return trained[name]

    return get


def publish(root: Path, source: Path, out: Path, *sets: str, force: bool = False):
    return run_publish(load_config(root / "data" / "config.json", list(sets)), source, out, force=force)


def front_matter(readme: Path) -> tuple[dict, str]:
    text = readme.read_text()
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def denoise(family_name: str, pipe, text: dict) -> "np.ndarray":
    """The denoiser's prediction for fixed latents, timestep and cached prompt embeddings."""
    import torch

    family = get_family(family_name)
    latents = torch.randn(1, family.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    meta = [{"original_size": [64, 64], "crop_top_left": [0, 0], "target_size": [64, 64]}]
    denoiser = getattr(pipe, family.denoiser.subfolder)
    with torch.no_grad():
        return family.denoiser_forward(denoiser, latents, torch.tensor([500.0]), family.collate_text([text]),
                                       meta).numpy()  # fmt: skip


def pipeline(family_name: str, model: Path, lora_file: Path | None = None):
    family = get_family(family_name)
    pipe = family.load_pipeline_class().from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    if lora_file is not None:
        family.load_lora_into_pipeline(pipe, lora_file)
    return pipe


# ------------------------------------------------------------------------------------------------------ LoRA


def test_lora_folder_card_and_lineage(runs, tiny_model, tmp_path):
    root, train_dir = runs("sd1x-lora")
    note = "Shapes on white: a | test note"
    result = publish(root, train_dir, tmp_path / "pub", f'model_card_note="{note}"', 'license="apache-2.0"')
    pub = tmp_path / "pub"
    weights = pub / "pytorch_lora_weights.safetensors"
    assert weights.read_bytes() == (train_dir / "final" / "pytorch_lora_weights.safetensors").read_bytes()
    assert not result.up_to_date and read_manifest(pub, stage="publish")["digest"] == result.manifest["digest"]

    meta, body = front_matter(pub / "README.md")
    assert meta["base_model"] == tiny_model("sd1x").name  # the base model's folder name, never its path
    assert str(root) not in (pub / "README.md").read_text()
    assert set(meta["tags"]) >= {"sd1x", "lora", "text-to-image", "diffusers", "st", "not-for-all-audiences"}
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-to-image" and meta["inference"] is True
    assert [w["text"] for w in meta["widget"]] == [PROMPT]
    assert all((pub / w["output"]["url"]).is_file() for w in meta["widget"])
    assert "![validation grid](assets/grid.png)" in body and (pub / "assets" / "grid.png").is_file()
    assert note.replace("|", "\\|") not in body and note in body  # the note is prose, not a table cell
    assert "| lora_rank / lora_alpha | 4 / 8 |" in body and "| learning_rate | 0.01 |" in body
    assert "| shapes | 8 |" in body and "textfile" in body  # dataset summary from the cache + prepare manifests

    lineage = json.loads((pub / "lineage.json").read_text())
    cache = read_manifest(root / "cache", stage="cache")
    assert lineage["manifests"]["train"]["digest"] == read_manifest(train_dir)["digest"]
    assert lineage["manifests"]["cache"]["digest"] == cache["digest"]
    assert lineage["manifests"]["prepare"]["digest"] == read_manifest(root / "prepare")["digest"]
    assert lineage["weights"] == [{"path": weights.name, "format": "diffusers-lora", "sha256": sha256_file(weights),
                                   "bytes": weights.stat().st_size}]  # fmt: skip
    assert lineage["checkpoint"] is None and lineage["base_model"]["denoiser"]["subfolder"] == "unet"


def test_published_lora_reproduces_the_validation_image(runs, tiny_model, tmp_path):
    import torch
    from PIL import Image

    root, train_dir = runs("sd1x-lora")
    publish(root, train_dir, tmp_path / "pub")
    reader = CacheReader(root / "cache")
    family = get_family("sd1x")
    kwargs = {"prompt_embeds": family.collate_text([reader.prompt(PROMPT)])["prompt_embeds"],
              "negative_prompt_embeds": family.collate_text([reader.prompt("")])["prompt_embeds"]}  # fmt: skip

    def render(pipe):  # with st's validation spacing (inference_scheduler_timestep_spacing, default trailing)
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing="trailing")
        return pipe(**kwargs, num_inference_steps=2, guidance_scale=3.0, height=64, width=64, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(0)).images[0]  # fmt: skip

    base = render(pipeline("sd1x", tiny_model("sd1x")))
    tuned = render(pipeline("sd1x", tiny_model("sd1x"), tmp_path / "pub" / "pytorch_lora_weights.safetensors"))
    assert np.abs(base - tuned).max() > 1e-3
    saved = np.asarray(Image.open(train_dir / "validation" / "step-2" / "validation-64x64-0.png").convert("RGB"))
    ours = (tuned * 255).round().astype(np.int16)
    assert np.abs(ours - saved.astype(np.int16)).max() <= 1


@pytest.mark.parametrize("name", ["sd1x-lora", "pixart-lora"])
def test_card_snippet_runs(runs, tiny_model, tmp_path, name):
    """The card's diffusers snippet, run as written (CPU, fp32, one step): diffusers' loader, or peft for PixArt."""
    root, train_dir = runs(name)
    model = tiny_model(RUNS[name][0])
    publish(root, train_dir, tmp_path / "pub")
    _, body = front_matter(tmp_path / "pub" / "README.md")
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    loader = "pipe.load_lora_weights(" if name == "sd1x-lora" else "set_peft_model_state_dict(pipe.transformer"
    assert loader in code and f'from_pretrained("{model.name}", torch_dtype=dtype).to(device)' in code
    assert 'device = "cuda" if torch.cuda.is_available() else "cpu"' in code  # runs where it is pasted
    # Pasted on this CPU machine, next to the base model's folder and with the published folder's path filled in.
    code = (code.replace("path/to/this/folder", str(tmp_path / "pub"))
            .replace(f'from_pretrained("{model.name}"', f'from_pretrained({str(model)!r}')
            .replace('image.save("image.png")', ""))  # fmt: skip
    code = re.sub(r"num_inference_steps=\d+", "num_inference_steps=1", code)
    scope: dict = {}
    exec(compile(code, "snippet", "exec"), scope)  # noqa: S102 - our own generated snippet
    assert scope["image"].size == ((64, 64) if name == "sd1x-lora" else (256, 256))
    denoiser = scope["pipe"].unet if name == "sd1x-lora" else scope["pipe"].transformer
    assert any("lora_A" in n for n, _ in denoiser.named_parameters())  # the LoRA is loaded


# --------------------------------------------------------------------------------------------------- ComfyUI


@pytest.mark.parametrize("name", ["sd1x-lora", "sdxl-lora"])
def test_comfyui_unet_file_loads_in_diffusers_with_the_same_output(runs, tiny_model, tmp_path, name):
    root, train_dir = runs(name)
    family = name.split("-")[0]
    publish(root, train_dir, tmp_path / "pub", 'lora_format="comfyui"', 'hub_model_id="me/shapes"')
    comfy = tmp_path / "pub" / "shapes_comfyui.safetensors"
    tensors = lora.load_tensors(comfy)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    alphas = [v for k, v in tensors.items() if k.endswith(".alpha")]
    assert len(alphas) == len(tensors) // 3 and all(a.ndim == 0 and a.item() == 8.0 for a in alphas)
    blocks = {k.split("_blocks_")[0] for k in tensors}
    if family == "sdxl":  # Kohya's SDXL names: the original SGM blocks
        assert blocks <= {"lora_unet_input", "lora_unet_middle_block_1_transformer", "lora_unet_output"}
        assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.alpha" in tensors
    else:  # Kohya's SD 1.x names: the diffusers module path
        assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in tensors
    text = CacheReader(root / "cache").prompt(PROMPT)
    model = tiny_model(family)
    base = denoise(family, pipeline(family, model), text)
    diffusers_file = tmp_path / "pub" / "pytorch_lora_weights.safetensors"
    diffusers_out = denoise(family, pipeline(family, model, diffusers_file), text)
    comfy_out = denoise(family, pipeline(family, model, comfy), text)
    assert np.abs(base - diffusers_out).max() > 1e-4
    np.testing.assert_allclose(comfy_out, diffusers_out, rtol=0, atol=1e-6)


def test_comfyui_sgm_names_cover_every_unet_module_kind(runs, tiny_model, tmp_path):
    """LoRA on resnets, samplers, embeddings and conv in/out too: diffusers reads every SGM name back exactly."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    root, _ = runs("sdxl-lora")
    model = tiny_model("sdxl")
    family = get_family("sdxl")
    pipe = pipeline("sdxl", model)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "linear_1", "linear_2", "conv"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    pipe.unet.add_adapter(config)
    torch.manual_seed(0)
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    saved = family.save_lora(tmp_path / "lora", get_peft_model_state_dict(pipe.unet), config=config)
    mods = lora.modules(lora.load_tensors(saved), lora.read_header(saved), "unet")
    unet_config = json.loads((model / "unet" / "config.json").read_text())
    tensors = comfyui.convert("sdxl", mods, unet_config)
    for name in ("lora_unet_input_blocks_0_0", "lora_unet_input_blocks_2_0_op", "lora_unet_out_2",
                 "lora_unet_middle_block_2_emb_layers_1", "lora_unet_output_blocks_1_0_skip_connection",
                 "lora_unet_output_blocks_1_2_conv", "lora_unet_label_emb_0_0", "lora_unet_time_embed_2"):
        assert f"{name}.lora_down.weight" in tensors, name
    save_file(tensors, str(tmp_path / "comfy.safetensors"))
    text = CacheReader(root / "cache").prompt(PROMPT)
    expected = denoise("sdxl", pipeline("sdxl", model, saved), text)
    got = denoise("sdxl", pipeline("sdxl", model, tmp_path / "comfy.safetensors"), text)
    assert np.abs(expected - denoise("sdxl", pipeline("sdxl", model), text)).max() > 1e-2
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def _deltas(tensors: dict, prefix: str = "diffusion_model.") -> dict:
    """Native module -> the weight change ComfyUI applies: alpha / rank * up @ down (in fp32, as ComfyUI patches; a
    LoRA trained under bf16 is stored in bf16)."""
    names = {k[len(prefix) : -len(".alpha")] for k in tensors if k.endswith(".alpha")}
    return {n: tensors[f"{prefix}{n}.alpha"].float() / tensors[f"{prefix}{n}.lora_A.weight"].shape[0]
            * tensors[f"{prefix}{n}.lora_B.weight"].float() @ tensors[f"{prefix}{n}.lora_A.weight"].float()
            for n in names}  # fmt: skip


def _check_fused(mods, tensors, expected: dict[str, tuple[str, int, tuple[int, ...]]]) -> None:
    """Each listed diffusers module's delta sits in its native module's row slot; rows of other slots carry only
    their own modules."""
    deltas = _deltas(tensors)
    by_name = {m.name: m for m in mods}
    for module, (native, slot, sizes) in expected.items():
        mod = by_name[module]
        unit = mod.up.shape[0] // sizes[slot]
        start = sum(sizes[:slot]) * unit
        want = mod.scale * mod.up.float() @ mod.down.float()
        got = deltas[native][start : start + want.shape[0]]
        assert float((got - want).abs().max()) <= 1e-6 * max(1.0, float(want.abs().max())), module


def test_comfyui_flux_uses_native_fused_modules(runs, tmp_path):
    root, train_dir = runs("flux-lora")
    publish(root, train_dir, tmp_path / "pub", 'lora_format="comfyui"')
    tensors = lora.load_tensors(tmp_path / "pub" / "pytorch_lora_weights_comfyui.safetensors")
    assert all(k.startswith("diffusion_model.") for k in tensors)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha")) for k in tensors)
    assert all(v.item() == 8.0 for k, v in tensors.items() if k.endswith(".alpha"))
    modules = {k[len("diffusion_model.") :].rsplit(".", 1)[0] for k in tensors if k.endswith(".alpha")}
    assert {"double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj",
            "double_blocks.0.txt_attn.proj", "single_blocks.20.linear1"} <= modules  # fmt: skip
    source = tmp_path / "pub" / "pytorch_lora_weights.safetensors"
    mods = lora.modules(lora.load_tensors(source), lora.read_header(source), "transformer")
    _check_fused(mods, tensors, {
        "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv", 1, (1, 1, 1)),
        "transformer_blocks.0.attn.add_v_proj": ("double_blocks.0.txt_attn.qkv", 2, (1, 1, 1)),
        "transformer_blocks.0.attn.to_add_out": ("double_blocks.0.txt_attn.proj", 0, (1,)),
        "single_transformer_blocks.5.attn.to_q": ("single_blocks.5.linear1", 0, (1, 1, 1, 4)),
        "single_transformer_blocks.5.attn.to_v": ("single_blocks.5.linear1", 2, (1, 1, 1, 4)),
    })  # fmt: skip
    linear1 = _deltas(tensors)["single_blocks.5.linear1"]
    assert linear1.shape[0] == 7 * 32 and float(linear1[3 * 32 :].abs().max()) == 0.0  # proj_mlp was not trained


@pytest.mark.parametrize("family_name", ["sd3", "pixart_sigma"])
def test_comfyui_transformer_layouts(tiny_model, tmp_path, family_name):
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    family = get_family(family_name)
    denoiser = family.denoiser.load_class().from_pretrained(str(tiny_model(family_name)), subfolder="transformer")
    from pipeline.families.sd3 import MMDIT_LORA_TARGETS

    # SD3: both streams (SimpleTuner's default targets only the image stream), to check every fused layout.
    targets = MMDIT_LORA_TARGETS if family_name == "sd3" else family.lora_targets
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets))
    family.add_lora(denoiser, config)
    torch.manual_seed(0)
    for n, p in denoiser.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    saved = family.save_lora(tmp_path / "lora", get_peft_model_state_dict(denoiser), config=config)
    mods = lora.modules(lora.load_tensors(saved), lora.read_header(saved), "transformer")
    tensors = comfyui.convert(family_name, mods, dict(denoiser.config))
    if family_name == "sd3":
        expected = {"transformer_blocks.0.attn.to_v": ("joint_blocks.0.x_block.attn.qkv", 2, (1, 1, 1)),
                    "transformer_blocks.1.attn.add_k_proj": ("joint_blocks.1.context_block.attn.qkv", 1, (1, 1, 1)),
                    "transformer_blocks.0.attn.to_out.0": ("joint_blocks.0.x_block.attn.proj", 0, (1,)),
                    "transformer_blocks.0.attn.to_add_out": ("joint_blocks.0.context_block.attn.proj", 0, (1,))}
    else:
        expected = {"transformer_blocks.0.attn1.to_k": ("blocks.0.attn.qkv", 1, (1, 1, 1)),
                    "transformer_blocks.0.attn2.to_q": ("blocks.0.cross_attn.q_linear", 0, (1,)),
                    "transformer_blocks.0.attn2.to_v": ("blocks.0.cross_attn.kv_linear", 1, (1, 1)),
                    "transformer_blocks.0.attn2.to_out.0": ("blocks.0.cross_attn.proj", 0, (1,))}  # fmt: skip
    _check_fused(mods, tensors, expected)
    assert all(v.item() == 8.0 for k, v in tensors.items() if k.endswith(".alpha"))


# ------------------------------------------------------------------------------------------- full, checkpoints


def test_full_finetune_is_a_loadable_diffusers_folder(runs, tiny_model, tmp_path):
    import torch
    from safetensors.torch import load_file

    root, train_dir = runs("sd1x-full")
    result = publish(root, train_dir, tmp_path / "pub", 'hub_model_id="me/shapes-full"')
    model = tmp_path / "pub" / "model"
    pipe = pipeline("sd1x", model)
    trained = load_file(str(train_dir / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    state = pipe.unet.state_dict()
    assert set(state) == set(trained) and all(torch.equal(state[k], trained[k]) for k in trained)
    base = pipeline("sd1x", tiny_model("sd1x"))
    assert torch.equal(pipe.vae.decoder.conv_out.weight, base.vae.decoder.conv_out.weight)
    assert not torch.equal(state["conv_in.weight"], base.unet.state_dict()["conv_in.weight"])
    ema = tmp_path / "pub" / "ema_weights.safetensors"
    assert ema.read_bytes() == (train_dir / "final" / "ema_weights.safetensors").read_bytes()
    formats = {w["path"]: w["format"] for w in result.manifest["weights"]}
    assert formats == {"model/unet/diffusion_pytorch_model.safetensors": "diffusers-model",
                       "ema_weights.safetensors": "ema"}  # fmt: skip
    meta, body = front_matter(tmp_path / "pub" / "README.md")
    assert "full" in meta["tags"] and 'snapshot_download("me/shapes-full")' in body
    assert 'from_pretrained(f"{folder}/model"' in body


def test_publish_from_checkpoints(runs, tiny_model, tmp_path):
    root, train_dir = runs("sd1x-lora")
    final = train_dir / "final" / "pytorch_lora_weights.safetensors"
    last = publish(root, train_dir / "checkpoints" / "checkpoint-2", tmp_path / "last")
    assert (tmp_path / "last" / final.name).read_bytes() == final.read_bytes()  # same step: same bytes as final
    assert last.manifest["source"]["kind"] == "checkpoint" and last.manifest["source"]["step"] == 2

    first = publish(root, train_dir / "checkpoints" / "checkpoint-1", tmp_path / "first")
    weights = lora.load_tensors(tmp_path / "first" / final.name)
    raw = lora.load_tensors(train_dir / "checkpoints" / "checkpoint-1" / "weights.safetensors")
    assert weights.keys() == lora.load_tensors(final).keys()
    assert all((weights["unet." + k.replace(".default", "")] == v).all() for k, v in raw.items())
    assert lora.read_header(tmp_path / "first" / final.name) == lora.read_header(final)
    lineage = json.loads((tmp_path / "first" / "lineage.json").read_text())
    manifest_sha = sha256_file(train_dir / "checkpoints" / "checkpoint-1" / "manifest.json")
    assert lineage["checkpoint"] == {"path": "checkpoints/checkpoint-1", "step": 1, "manifest_sha256": manifest_sha}
    assert first.manifest["source"]["manifest_sha256"] == manifest_sha
    meta, body = front_matter(tmp_path / "first" / "README.md")
    assert "checkpoints/checkpoint-1" in body and "widget" not in meta  # no validation image at step 1
    get_family("sd1x").load_lora_into_pipeline(pipeline("sd1x", tiny_model("sd1x")), tmp_path / "first" / final.name)


# ------------------------------------------------------------------------------------------- lineage, re-runs


def test_tampered_train_output_is_a_lineage_error(runs, tmp_path):
    root, train_dir = runs("sd1x-lora")
    copy = tmp_path / "train"
    shutil.copytree(train_dir, copy)
    weights = copy / "final" / "pytorch_lora_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(LineageError, match=r"final/pytorch_lora_weights\.safetensors changed .*re-run `st train`"):
        publish(root, copy, tmp_path / "pub")
    checkpoint = copy / "checkpoints" / "checkpoint-1" / "weights.safetensors"
    weights.write_bytes((train_dir / "final" / weights.name).read_bytes())
    checkpoint.write_bytes(checkpoint.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(LineageError, match=r"checkpoint-1/weights\.safetensors is missing or changed"):
        publish(root, copy / "checkpoints" / "checkpoint-1", tmp_path / "pub")


def test_second_run_is_up_to_date_and_changes_rerun(runs, tmp_path, caplog):
    root, train_dir = runs("sd1x-lora")
    out = tmp_path / "pub"
    first = publish(root, train_dir, out)
    again = publish(root, train_dir, out)
    assert again.up_to_date and again.manifest["digest"] == first.manifest["digest"]
    comfy = publish(root, train_dir, out, 'lora_format="comfyui"')
    assert not comfy.up_to_date and "config key lora_format changed: 'diffusers' -> 'comfyui'" in comfy.reasons[0]
    assert (out / "pytorch_lora_weights_comfyui.safetensors").is_file()
    back = publish(root, train_dir, out)
    assert back.manifest["digest"] == first.manifest["digest"]
    assert not (out / "pytorch_lora_weights_comfyui.safetensors").exists()  # the stale output is removed
    (out / "README.md").write_text("edited")
    assert "README.md was modified" in publish(root, train_dir, out).reasons[0]


def test_missing_dataset_manifests_leave_a_note(runs, tmp_path):
    root, train_dir = runs("sd1x-lora")
    copy = tmp_path / "train"
    shutil.copytree(train_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["provenance"]["cache_path"] = str(tmp_path / "elsewhere" / "manifest.json")  # outside the digest
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = publish(root, copy, tmp_path / "pub")
    _, body = front_matter(tmp_path / "pub" / "README.md")
    assert "The dataset summary is unavailable: the cache manifest" in body
    assert result.manifest["dataset"]["summary"] is False and result.manifest["dataset"]["prepare"] is None


def test_upload_records_go_to_provenance(runs, tmp_path, monkeypatch):
    root, train_dir = runs("sd1x-lora")
    calls = []

    def publish_to_targets(config, out_dir, base_dir):
        calls.append(sorted(p.name for p in Path(out_dir).iterdir()))
        return [{"provider": "fake", "destination": "fake://bucket/shapes", "files": 4}]

    monkeypatch.setitem(sys.modules, "pipeline.remote",
                        types.SimpleNamespace(publish_to_targets=publish_to_targets))  # fmt: skip
    plain = publish(root, train_dir, tmp_path / "plain")
    target = 'publishing_config=[{provider = "fake"}]'
    result = publish(root, train_dir, tmp_path / "pub", target)
    assert calls and "manifest.json" in calls[0] and ".publish.tmp" not in calls[0]
    assert result.uploads == [{"provider": "fake", "destination": "fake://bucket/shapes", "files": 4}]
    stored = read_manifest(tmp_path / "pub", stage="publish")
    assert stored["provenance"]["uploads"]["records"] == result.uploads
    assert stored["digest"] == plain.manifest["digest"]
    assert publish(root, train_dir, tmp_path / "pub", target).up_to_date and len(calls) == 1


def test_cli_publish(runs, tmp_path, cli):
    root, train_dir = runs("sd1x-lora")
    config = root / "data" / "config.json"
    result = cli("publish", "-c", config, "-i", train_dir, "-o", tmp_path / "pub")
    assert result.exit_code == 0, result.output
    assert "pytorch_lora_weights.safetensors (diffusers-lora" in result.output and "publish: wrote" in result.output
    assert "publish: up to date" in cli("publish", "-c", config, "-i", train_dir, "-o", tmp_path / "pub").output
    missing = cli("publish", "-c", config, "-i", tmp_path / "nothing", "-o", tmp_path / "pub2")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr

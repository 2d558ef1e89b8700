"""Qwen-Image flavour edit-v2+: Qwen-Image-Edit-2509 trained with zero_cond_t forced on, as SimpleTuner's edit-v2+.
Every loader gives the 2509 transformer with zero_cond_t; its denoiser call is SimpleTuner's (`_model_predict_edit_plus`
with timesteps [t, 0] and a modulate_index, replayed here from its model.py and transformer.py on the weights of the
same transformer) and differs from edit-v2's; two LoRA steps train with validation through QwenImageEditPlusPipeline
(which runs the live transformer, zero_cond_t included); the train manifest records it and the published LoRA loads
into the Plus pipeline with the transformer loaded as the model card says."""

from __future__ import annotations

import json
import os
from math import prod
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import InputError
from pipeline.families import get_family, load_components, qwen_image_edit
from pipeline.families.loading import load_denoiser

BASE = get_family("qwen_image")
PLUS = qwen_image_edit.PLUS_FAMILY
V2_PLUS = qwen_image_edit.V2_PLUS_FAMILY


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen-edit-2509") / "model"
    qwen_image_edit.tiny_plus(folder, 0)
    return folder


@pytest.fixture(scope="module")
def small_reference_area():
    """The Plus pipeline resizes references to a 1024x1024 area for its VAE (minutes on one core for the tiny VAE):
    64x64 here, the only change to the pipeline."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    with pytest.MonkeyPatch.context() as patch:
        real = module.calculate_dimensions
        patch.setattr(module, "calculate_dimensions", lambda area, ratio: real(64 * 64, ratio))
        yield


def test_edit_v2_plus_loads_the_2509_transformer_with_zero_cond_t(model):
    from diffusers import QwenImageTransformer2DModel

    assert BASE.flavour_hub_id("edit-v2+") == "Qwen/Qwen-Image-Edit-2509"
    assert BASE.for_run("edit-v2+", "Qwen/Qwen-Image-Edit-2509") is V2_PLUS
    assert BASE.for_run("edit-v2+", str(model)) is V2_PLUS and BASE.for_run("edit-v2", str(model)) is PLUS
    assert V2_PLUS.pipeline_class == "QwenImageEditPlusPipeline" and V2_PLUS.encode_prompts is PLUS.encode_prompts
    assert json.loads((model / "transformer" / "config.json").read_text())["zero_cond_t"] is False  # 2509's config
    forced = load_components(V2_PLUS, str(model), which=("denoiser",))["denoiser"]
    plain = load_components(PLUS, str(model), which=("denoiser",))["denoiser"]
    assert type(forced) is QwenImageTransformer2DModel  # diffusers' own class: saved and published as such
    assert forced.config.zero_cond_t and all(block.zero_cond_t for block in forced.transformer_blocks)
    assert not plain.config.zero_cond_t
    # pretrained_transformer_model_name_or_path (`load_denoiser`) and the weights are the folder's, unchanged
    other = load_denoiser(V2_PLUS, str(model), "transformer")
    assert other.config.zero_cond_t and all(torch.equal(a, b) for a, b in zip(forced.state_dict().values(),
                                                                               plain.state_dict().values()))
    assert V2_PLUS.train_key_entries(V2_PLUS) == {"qwen_zero_cond_t": "forced"} and PLUS.train_key_entries is None


def simpletuner_zero_cond_call(transformer, tokens, timesteps, embeds, mask, img_shapes):
    """SimpleTuner's edit-v2+ transformer call, replayed on diffusers' modules of a transformer built without
    zero_cond_t: models/qwen_image/model.py `_model_predict_edit_plus` (timesteps / 1000, then [t, 0] and
    modulate_index 0 for the target's tokens, 1 for the references') and models/qwen_image/transformer.py (the image
    stream modulated per token from the t or the 0 half, the text stream and the output norm from the t half). `mask`:
    the batch's text mask, which its attention masks as diffusers' does."""
    from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask
    t = timesteps / 1000.0
    t = torch.cat([t, torch.zeros_like(t)], dim=0)
    index = torch.tensor([[0] * prod(s[0]) + [1] * sum(prod(x) for x in s[1:]) for s in img_shapes], dtype=torch.long)
    hidden = transformer.img_in(tokens)
    t = t.to(hidden.dtype)
    text = transformer.txt_in(transformer.txt_norm(embeds))
    text_len, _, mask = compute_text_seq_len_from_mask(text, mask)
    temb = transformer.time_text_embed(t, hidden)
    rope = transformer.pos_embed(img_shapes, max_txt_seq_len=text_len, device=hidden.device)

    def modulate(x, params, modulate_index=None):  # QwenImageTransformerBlock._modulate of SimpleTuner
        shift, scale, gate = params.chunk(3, dim=-1)
        if modulate_index is None:
            return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1), gate.unsqueeze(1)
        b = shift.size(0) // 2
        pick = modulate_index.unsqueeze(-1) == 0
        shift, scale, gate = (torch.where(pick, v[:b].unsqueeze(1), v[b:].unsqueeze(1)) for v in (shift, scale, gate))
        return x * (1 + scale) + shift, gate

    for block in transformer.transformer_blocks:
        img_mod1, img_mod2 = block.img_mod(temb).chunk(2, dim=-1)
        txt_mod1, txt_mod2 = block.txt_mod(torch.chunk(temb, 2, dim=0)[0]).chunk(2, dim=-1)
        img_in, img_gate1 = modulate(block.img_norm1(hidden), img_mod1, index)
        txt_in, txt_gate1 = modulate(block.txt_norm1(text), txt_mod1)
        img_attn, txt_attn = block.attn(hidden_states=img_in, encoder_hidden_states=txt_in,
                                        encoder_hidden_states_mask=mask, image_rotary_emb=rope)  # fmt: skip
        hidden = hidden + img_gate1 * img_attn
        text = text + txt_gate1 * txt_attn
        img_in2, img_gate2 = modulate(block.img_norm2(hidden), img_mod2, index)
        hidden = hidden + img_gate2 * block.img_mlp(img_in2)
        txt_in2, txt_gate2 = modulate(block.txt_norm2(text), txt_mod2)
        text = text + txt_gate2 * block.txt_mlp(txt_in2)
    return transformer.proj_out(transformer.norm_out(hidden, torch.chunk(temb, 2, dim=0)[0]))


def test_the_denoiser_call_is_simpletuners_zero_cond_formula_and_not_edit_v2s(model):
    from diffusers import QwenImageEditPlusPipeline

    pipe = QwenImageEditPlusPipeline.from_pretrained(
        str(model), processor=load_components(PLUS, str(model), which=("text_encoders",))["tokenizers"][0])
    forced = load_components(V2_PLUS, str(model), which=("denoiser",))["denoiser"].eval()
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    items = PLUS.encode_prompts([pipe.text_encoder], [pipe.processor], ["make it red", "a square"],
                                images=[Image.fromarray(pixels), None])  # fmt: skip
    batch = PLUS.collate_text(items)
    generator = torch.Generator().manual_seed(3)
    latents, reference = torch.randn(2, 16, 8, 8, generator=generator), torch.randn(2, 16, 6, 10, generator=generator)
    timesteps = torch.tensor([500.0, 120.0])
    with torch.no_grad():
        ours = V2_PLUS.denoiser_forward(forced, latents, timesteps, batch, reference=reference)
        edit_v2 = PLUS.denoiser_forward(pipe.transformer, latents, timesteps, batch, reference=reference)
        packed = torch.cat([pipe._pack_latents(latents.unsqueeze(1), 2, 16, 8, 8),
                            pipe._pack_latents(reference.unsqueeze(1), 2, 16, 6, 10)], dim=1)  # fmt: skip
        mask = batch["attention_mask"]
        assert not bool(mask.all())  # two prompts of other lengths: the shorter one's padding is masked
        theirs = simpletuner_zero_cond_call(pipe.transformer, packed, timesteps, batch["prompt_embeds"], mask,
                                            [[(1, 4, 4), (1, 3, 5)]] * 2)[:, :16]  # fmt: skip
    scale = pipe.vae_scale_factor
    expected = pipe._unpack_latents(theirs, 8 * scale, 8 * scale, scale)[:, :, 0]
    assert torch.equal(ours, expected)  # bit for bit
    # the reference tokens at timestep 0 change the prediction (slightly: the tiny model's time embedding is small)
    assert (ours - edit_v2).abs().max() > 1e-4
    # a transformer built without zero_cond_t is refused, not silently trained as edit-v2
    with pytest.raises(InputError, match=r"edit-v2\+ trains with zero_cond_t"):
        V2_PLUS.denoiser_forward(pipe.transformer, latents, timesteps, batch, reference=reference)


@pytest.fixture(scope="module")
def trained(model, small_reference_area, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(root, config, train output): the 8-picture dataset paired with edge images cached for the 2509 folder with
    model_flavour edit-v2+, and two LoRA steps with a validation render."""
    from tests.helpers.training import cached_dataset
    from tests.stages.reference_runs import VALIDATION, train_lora

    root = tmp_path_factory.mktemp("qwen-edit-v2-plus")
    config = cached_dataset(root, "qwen_image", model, conditioning=("controlnet",), **{"--model_flavour": "edit-v2+"})
    out = root / "train"
    train_lora((root, config), out, *VALIDATION)
    return root, config, out


def test_two_lora_steps_record_zero_cond_t_and_validate_through_the_plus_pipeline(trained):
    root, _, out = trained
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2 and (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert manifest["config"]["pipeline"] == "QwenImageEditPlusPipeline"
    assert manifest["config"]["qwen_zero_cond_t"] == "forced"  # an edit-v2 run of this folder keys otherwise
    names = {p.name for p in (out / "validation" / "step-2").glob("*.png")}
    assert {"validation-64x64-0.png", "validation-64x64-control.png"} <= names


def test_published_lora_loads_into_the_plus_pipeline_with_the_zero_cond_transformer(model, trained,
                                                                                    small_reference_area, tmp_path):
    from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel
    from PIL import Image

    from pipeline.publish.stage import run_publish

    root, config, out = trained
    publish = tmp_path / "publish"
    run_publish(load_config(config), out, publish)
    card = (publish / "README.md").read_text()
    assert "trained as edit-v2+" in card and "zero_cond_t=True" in card
    # as the card says: the transformer with zero_cond_t, then the LoRA
    transformer = QwenImageTransformer2DModel.from_pretrained(str(model), subfolder="transformer", zero_cond_t=True)
    processor = load_components(PLUS, str(model), which=("text_encoders",))["tokenizers"][0]
    pipe = QwenImageEditPlusPipeline.from_pretrained(str(model), processor=processor, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    reference = Image.open(sorted((root / "data" / "edges").glob("*.png"))[0]).convert("RGB")

    def render() -> np.ndarray:
        return pipe(image=reference, prompt="a red circle on a white background", num_inference_steps=2, height=64,
                    width=64, true_cfg_scale=1.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip

    base = render()
    pipe.load_lora_weights(str(publish / "pytorch_lora_weights.safetensors"))
    edited = render()
    assert np.isfinite(edited).all() and np.abs(base - edited).max() > 1e-4

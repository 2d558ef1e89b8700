"""What AuraFlow and Lumina 2 do differently from the other families: the denoiser call of their pipelines (AuraFlow's
0..1 timesteps, Lumina's reversed time and negated velocity) and their ComfyUI LoRA files."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pipeline.errors import NotSupportedError
from pipeline.families import get_family, load_components
from pipeline.publish import comfyui, lora

PROMPTS = ["a red circle on a white background", "a blue square"]


def _parts(tiny_model, name):
    family = get_family(name)
    parts = load_components(family, tiny_model(name), which=("denoiser", "text_encoders"))
    text = family.collate_text(family.encode_prompts(parts["text_encoders"], parts["tokenizers"], PROMPTS))
    return family, parts["denoiser"], text


def test_auraflow_passes_timesteps_on_the_0_to_1_scale(tiny_model):
    family, transformer, text = _parts(tiny_model, "auraflow")
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = family.denoiser_forward(transformer, latents, torch.tensor([700.0, 250.0]), text)
        theirs = transformer(latents, encoder_hidden_states=text["prompt_embeds"],
                             timestep=torch.tensor([0.7, 0.25]), return_dict=False)[0]  # fmt: skip
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_lumina2_reverses_time_and_negates_the_prediction(tiny_model):
    family, transformer, text = _parts(tiny_model, "lumina2")
    assert text["prompt_embeds"].shape[1] == 256 and text["attention_mask"].dtype == torch.int64
    latents = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = family.denoiser_forward(transformer, latents, torch.tensor([700.0, 250.0]), text)
        theirs = transformer(hidden_states=latents, timestep=torch.tensor([0.3, 0.75]),
                             encoder_hidden_states=text["prompt_embeds"], encoder_attention_mask=text["attention_mask"],
                             return_dict=False)[0]  # fmt: skip
    torch.testing.assert_close(ours, -theirs, atol=0, rtol=0)


def test_lumina2_prompts_carry_the_pipelines_system_prompt(tiny_model):
    from diffusers import Lumina2Pipeline

    pipe = Lumina2Pipeline.from_pretrained(tiny_model("lumina2"))
    family = get_family("lumina2")
    (item,) = family.encode_prompts([pipe.text_encoder], [pipe.tokenizer], ["a dog"])
    with torch.no_grad():
        full, mask, _, _ = pipe.encode_prompt(["a dog"], do_classifier_free_guidance=False, device="cpu")
    length = int(mask.sum())
    assert item["prompt_embeds"].shape[0] == length > len(pipe.tokenizer("a dog").input_ids) + 20
    torch.testing.assert_close(item["prompt_embeds"], full[0, :length], atol=0, rtol=0)


def _lora_modules(tiny_model, tmp_path, name):
    from peft import LoraConfig, get_peft_model_state_dict

    family = get_family(name)
    denoiser = load_components(family, tiny_model(name), which=("denoiser",))["denoiser"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(family.lora_targets))
    family.add_lora(denoiser, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=gen)
    saved = family.save_lora(tmp_path / "lora", get_peft_model_state_dict(denoiser), config=config)
    return lora.modules(lora.load_tensors(saved), lora.read_header(saved), "transformer")


def test_auraflow_comfyui_file_uses_the_diffusers_names_comfyui_maps(tiny_model, tmp_path):
    """ComfyUI's AuraFlow key map takes `transformer.<diffusers module>`: with `.alpha` its scale alpha / rank gives
    the delta peft applies."""
    mods = _lora_modules(tiny_model, tmp_path, "auraflow")
    tensors = comfyui.convert("auraflow", mods, None)
    assert len(tensors) == 3 * len(mods)
    for mod in mods:
        name = f"transformer.{mod.name}"
        down, up, alpha = (tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"],
                           tensors[f"{name}.alpha"])  # fmt: skip
        assert alpha.item() == 8.0
        torch.testing.assert_close(alpha.item() / down.shape[0] * up @ down, mod.scale * mod.up @ mod.down)
    assert any(".joint_transformer_blocks.0.attn.add_q_proj." in k for k in tensors)
    assert any(".single_transformer_blocks.0.attn.to_out.0." in k for k in tensors)


def test_lumina2_comfyui_is_refused_pointing_to_diffusers(tiny_model, tmp_path):
    mods = _lora_modules(tiny_model, tmp_path, "lumina2")
    with pytest.raises(NotSupportedError, match=r"lumina2.*lora_format = \"diffusers\""):
        comfyui.convert("lumina2", mods, None)

"""Sana: linear-attention DiT over the 32-channel latents of the deep-compression autoencoder (AutoencoderDC, 32x),
cross-attending to a masked Gemma2 sequence; flow matching.

`SanaPipeline.encode_prompt` lower-cases and strips each prompt, prepends the "complex human instruction" (the lines
joined by newlines; SimpleTuner's `sana_complex_human_instruction`), tokenizes padded on the right to the
instruction's token count + max_sequence_length - 2, runs Gemma2 with the mask and keeps the first token and the last
max_sequence_length - 1 positions. Gemma2 is causal and the transformer masks padded positions, so `encode_prompts`
stores `prompt_embeds` trimmed to the real token count and the full mask (as PixArt-Sigma).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import SANA_COMPLEX_HUMAN_INSTRUCTION
from pipeline.errors import ConfigError
from pipeline.families import sd1x, text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec
from pipeline.families.tokenizers import gemma_tokenizer

SEQUENCE_LENGTH = 300

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "Gemma2Model", "transformers"),
        tokenizer=Component("tokenizer", "GemmaTokenizer", "transformers"),
        max_length=SEQUENCE_LENGTH,
        kind="gemma",
    ),
)


def instruction_lines(value: Any) -> tuple[str, ...]:
    """SimpleTuner's reading of `sana_complex_human_instruction`: a list of lines, a JSON list, a path to a text file
    or text with one line per instruction line; each line stripped, empty ones dropped; None, "" or "None": none."""
    import json

    if value in (None, "", "None"):
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(str(line).strip() for line in value if line not in (None, "", "None") and str(line).strip())
    if not isinstance(value, str):
        raise ConfigError(f"sana_complex_human_instruction must be text or a list of lines, got {type(value).__name__}")
    candidate = value.strip()
    path = Path(candidate).expanduser()
    if "\n" not in candidate and len(candidate) < 4096 and path.is_file():
        return instruction_lines(path.read_text(encoding="utf-8"))
    if candidate.startswith(("[", "{")):
        try:
            return instruction_lines(json.loads(candidate))
        except json.JSONDecodeError as error:
            raise ConfigError(f"sana_complex_human_instruction looks like JSON but does not parse: {error}") from None
    return tuple(line.strip() for line in candidate.splitlines() if line.strip())


# SimpleTuner's default instruction as its option parser hands it to the pipeline (lines stripped).
COMPLEX_HUMAN_INSTRUCTION = instruction_lines("\n".join(SANA_COMPLEX_HUMAN_INSTRUCTION))


def encode_prompts(
    text_encoders: Any,
    tokenizers: Any,
    prompts: list[str],
    *,
    max_length: int | None = None,
    t5_padding: str = "unmodified",
    device: Any = "cpu",
    complex_human_instruction: Sequence[str] = COMPLEX_HUMAN_INSTRUCTION,
) -> list[dict[str, Any]]:
    """`prompt_embeds` (real tokens x Gemma2 width) and `attention_mask` (max_length positions), as
    `SanaPipeline.encode_prompt(..., clean_caption=False, complex_human_instruction=...)`. `max_length` is the
    `max_sequence_length` (300). `t5_padding` changes nothing (padded positions are masked)."""
    import torch

    text.check_t5_padding(t5_padding)
    prompts = [p.lower().strip() for p in text.check_prompts(prompts)]
    (encoder,), (tokenizer,) = tuple(text_encoders), tuple(tokenizers)
    length = text.check_max_length(max_length, SEQUENCE_LENGTH)
    tokenizer.padding_side = "right"
    total = length
    if complex_human_instruction:
        instruction = "\n".join(complex_human_instruction)
        prompts = [instruction + p for p in prompts]
        total = len(tokenizer.encode(instruction)) + length - 2
    ids, mask = text.tokenize(tokenizer, prompts, total, device)
    with torch.no_grad():
        embeds = encoder(ids, attention_mask=mask)[0]
    select = [0, *range(total - length + 1, total)]
    embeds, mask = embeds[:, select], mask[:, select]
    keep = [int(n) for n in mask.sum(dim=1)]
    return text.split({"prompt_embeds": embeds, "attention_mask": mask}, keep=keep)


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`SanaPipeline`'s denoiser call: the masked Gemma2 sequence, the timestep times the transformer's
    `timestep_scale`."""
    return transformer(
        latents,
        encoder_hidden_states=text["prompt_embeds"],
        encoder_attention_mask=text["attention_mask"],
        timestep=timesteps * transformer.config.timestep_scale,
        return_dict=False,
    )[0]


def gemma2_encoder(tokenizer: Any, hidden: int = 32) -> Any:
    """A tiny `Gemma2Model` whose ids match `tokenizer` (Sana's Gemma2 2B-IT in miniature)."""
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=1024,
        sliding_window=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Gemma2Model(config).eval()


def dc_autoencoder(scaling_factor: float = 0.41407) -> Any:
    """A tiny `AutoencoderDC` with the real 32x compression to 32 channels (six stages, five halvings)."""
    from diffusers import AutoencoderDC

    channels = (8, 8, 16, 16, 32, 32)
    blocks = ("ResBlock",) * 4 + ("EfficientViTBlock",) * 2
    return AutoencoderDC(
        in_channels=3,
        latent_channels=32,
        attention_head_dim=8,
        encoder_block_types=blocks,
        decoder_block_types=blocks,
        encoder_block_out_channels=channels,
        decoder_block_out_channels=channels,
        encoder_layers_per_block=(1,) * 6,
        decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=((),) * 4 + ((5,),) * 2,
        decoder_qkv_multiscales=((),) * 4 + ((5,),) * 2,
        scaling_factor=scaling_factor,
    ).eval()


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny Sana diffusers folder (DPM-Solver++ over flow sigmas with shift 3, as the released models)."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    tokenizer = gemma_tokenizer()
    tokenizer.padding_side = "right"
    tiny_parts.seed_everything(seed)
    text_encoder = gemma2_encoder(tokenizer)
    tiny_parts.seed_everything(seed + 1)
    transformer = SanaTransformer2DModel(
        in_channels=32,
        out_channels=32,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=text_encoder.config.hidden_size,
        sample_size=16,
        patch_size=1,
    ).eval()
    tiny_parts.seed_everything(seed + 2)
    vae = dc_autoencoder()
    scheduler = DPMSolverMultistepScheduler(
        beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="flow_prediction",
        use_flow_sigmas=True, flow_shift=3.0,
    )  # fmt: skip
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)  # fmt: skip
    tiny_parts.save(pipe, out_dir)


# SimpleTuner's Sana flavours (models/sana/model.py HUGGINGFACE_PATHS); its default is "sana1.5-4.8b-1024".
FLAVOURS = (
    Flavour("sana1.5-4.8b-1024", "Efficient-Large-Model/SANA1.5_4.8B_1024px_diffusers"),
    Flavour("sana1.5-1.6b-1024", "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers"),
    Flavour("sana1.0-1.6b-2048", "Efficient-Large-Model/Sana_1600M_2Kpx_BF16_diffusers"),
    Flavour("sana1.0-1.6b-1024", "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers"),
    Flavour("sana1.0-600m-1024", "Efficient-Large-Model/Sana_600M_1024px_diffusers"),
    Flavour("sana1.0-600m-512", "Efficient-Large-Model/Sana_600M_512px_diffusers"),
)

FAMILY = Family(
    name="sana",
    pipeline_class="SanaPipeline",
    denoiser=Component("transformer", "SanaTransformer2DModel", "diffusers"),
    vae=Component("vae", "AutoencoderDC", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "DPMSolverMultistepScheduler", "diffusers"),
    latent_channels=32,
    bucket_alignment=64,  # SimpleTuner forces 64 px for Sana
    prediction_type="flow_matching",
    lora_targets=sd1x.UNET_LORA_TARGETS,  # SimpleTuner's DEFAULT_LORA_TARGET: to_k, to_q, to_v, to_out.0
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=text.collate,
    predict=predict,
    single_file=False,
    trims_text=True,
    # SimpleTuner draws Sana's training sigmas from FlowMatchEulerDiscreteScheduler.from_pretrained(the model's
    # scheduler folder), which ignores the DPM-Solver config's flow_shift: the unshifted table, shift 1.
    default_flow_shift=1.0,
    flavours=FLAVOURS,
    default_flavour="sana1.5-4.8b-1024",
    text_options=lambda options: {
        "complex_human_instruction": instruction_lines(options.sana_complex_human_instruction)},
)

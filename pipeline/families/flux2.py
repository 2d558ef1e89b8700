"""FLUX.2: a Flux-style MMDiT over 2x2-patchified 32-channel latents, conditioned on three stacked hidden layers of
its text encoder. [klein] (`Flux2KleinPipeline`, Qwen3; SimpleTuner's flavours klein-4b and klein-9b, its default
klein-9b) is `FAMILY`; [dev] (`Flux2Pipeline`, Mistral-3; flavour dev, or a Flux2Pipeline folder) is `DEV_FAMILY`.

Text: `Flux2KleinPipeline.encode_prompt` wraps each prompt in Qwen3's chat template (one user turn, a generation
prompt, thinking disabled), pads it to 512 tokens, runs Qwen3 with the attention mask and concatenates hidden states
9, 18 and 27 per token; the denoiser gets every position (no mask), so nothing is trimmed.

Latents: AutoencoderKLFlux2 is normalised by its BatchNorm's running statistics over 2x2 patches of its 32 channels.
st caches the VAE mode (as the pipeline and SimpleTuner take it) normalised in that patch space and laid back out as
B x 32 x h x w (`loading.scaled_latents`), so the shared 4-D code and the flow-matching noise are unchanged: a patch
rearrangement only permutes elements. `predict` patchifies to 128 channels at h/2 x w/2, flattens the patches into
tokens with their 4-axis position ids (time, row, column, layer) and the text's ids (0, 0, 0, token), passes
`timestep / 1000` and, for a guidance-distilled transformer, the guidance value (1.0 in training, as SimpleTuner).

Reference images: as SimpleTuner, a run whose datasets link conditioning images trains FLUX.2's image input
(`REFERENCE_FAMILY`, chosen by `train.reference.for_pairs`): the reference's patch tokens follow the noisy ones with
time coordinate 10, as the pipelines' `image=` argument feeds them.

[dev]: `Flux2Pipeline.encode_prompt` gives the Pixtral processor a system turn (FLUX.2's system message) and the
prompt as a user turn, pads to 512 tokens, runs Mistral3ForConditionalGeneration with the attention mask and
concatenates hidden states 10, 20 and 30 per token. transformers 5 builds PixtralProcessor only where torchvision is
installed; for text-only messages it renders the chat template and runs its tokenizer, so st loads that tokenizer
(`tokenizer/`, as the processor loads it) and does the same (`processor_tokens`). The transformer has a guidance
embedding: training passes 1.0, as SimpleTuner forces for FLUX.2 (`check_training_guidance`).

DEVIATION: SimpleTuner's copy of FLUX.2's system message has a space where Black Forest Labs' and diffusers' have a
newline ("object\nattribution"), which changes the tokens; st sends Flux2Pipeline's, so that its cached embeddings
are the pipeline's. SimpleTuner also reads the Mistral-3 encoder and processor from
mistralai/Mistral-Small-3.1-24B-Instruct-2503; st reads the model's own text_encoder/ and tokenizer/ (the same
model, where Flux2Pipeline reads it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InputError
from pipeline.families import text, tiny_parts, z_image
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec

MAX_LENGTH = 512  # Flux2KleinPipeline's max_sequence_length (and SimpleTuner's tokenizer_max_length for FLUX.2)
HIDDEN_LAYERS = (9, 18, 27)  # the pipeline's text_encoder_out_layers for [klein]
REFERENCE_TIME = 10  # the time coordinate of the (first) reference image's tokens
# SimpleTuner's DEFAULT_LORA_TARGET for FLUX.2: the double-stream attention and the single-stream fused projection.
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.to_qkv_mlp_proj")

TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "Qwen3ForCausalLM", "transformers"),
        tokenizer=Component("tokenizer", "Qwen2Tokenizer", "transformers"),
        max_length=MAX_LENGTH,
        kind="qwen3",
    ),
)

DEV_PIPELINE = "Flux2Pipeline"
DEV_HIDDEN_LAYERS = (10, 20, 30)  # Flux2Pipeline's text_encoder_out_layers (SimpleTuner's OUTPUT_LAYERS)
# [dev]'s tokenizer folder holds a PixtralProcessor (model_index.json names it); st loads its tokenizer as the
# processor does (`TokenizersBackend`, tokenizer.json as written) and replays the processor's text path.
DEV_TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("text_encoder", "Mistral3ForConditionalGeneration", "transformers"),
        tokenizer=Component("tokenizer", "PreTrainedTokenizerFast", "transformers"),
        max_length=MAX_LENGTH,
        kind="mistral3",
    ),
)


def encode_prompts(
    text_encoders: Any,
    tokenizers: Any,
    prompts: list[str],
    *,
    max_length: int | None = None,
    t5_padding: str = "unmodified",
    device: Any = "cpu",
) -> list[dict[str, Any]]:
    """Per prompt, `prompt_embeds` (max_length tokens x 3 * Qwen3 dim: hidden states 9, 18, 27 side by side), as
    `Flux2KleinPipeline.encode_prompt`. `max_length` is the `max_sequence_length`; `t5_padding` does not apply."""
    text.check_t5_padding(t5_padding)
    (encoder,), (tokenizer,) = tuple(text_encoders), tuple(tokenizers)
    length = text.check_max_length(max_length, MAX_LENGTH)
    ids, mask = text.tokenize(tokenizer, text.chat_turns(tokenizer, prompts, enable_thinking=False), length, device)
    return _stacked_hidden_states(encoder, encoder.config.num_hidden_layers, ids, mask, HIDDEN_LAYERS, "[klein]")


def _stacked_hidden_states(encoder: Any, layers: int, ids: Any, mask: Any, wanted: tuple[int, ...],
                           name: str) -> list[dict[str, Any]]:  # fmt: skip
    """Per prompt, `prompt_embeds`: the encoder's hidden states `wanted` side by side (the pipelines' stack + permute +
    reshape). `layers`: the encoder's layer count, checked against `wanted` (`name` says which FLUX.2 it is for)."""
    import torch

    if layers < max(wanted):
        raise InputError(f"the FLUX.2 {name} text encoder needs at least {max(wanted)} layers (the pipeline reads "
                         f"hidden states {wanted}), this one has {layers}")  # fmt: skip
    with torch.no_grad():
        hidden = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    stacked = torch.cat([hidden[k] for k in wanted], dim=-1)
    return [{"prompt_embeds": row.detach().clone()} for row in stacked]


def processor_tokens(tokenizer: Any, prompts: list[str], max_length: int, device: Any) -> tuple[Any, Any]:
    """Token ids and attention mask of `PixtralProcessor.apply_chat_template` on `Flux2Pipeline`'s messages (FLUX.2's
    system message, then the prompt as a user turn, `[IMG]` removed), padded to `max_length` and truncated. For
    messages without images the processor renders its chat template and tokenizes the text, adding no special
    tokens when the text starts with the beginning-of-sequence token (the template writes it)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError("the FLUX.2 [dev] tokenizer has no chat template: its tokenizer/ folder needs the "
                         "processor's chat_template.jinja beside tokenizer.json")  # fmt: skip
    messages = format_input(text.check_prompts(prompts), system_message=SYSTEM_MESSAGE)
    texts = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    bos = tokenizer.bos_token
    inputs = tokenizer(texts, add_special_tokens=not (bos is not None and texts[0].startswith(bos)),
                       padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")  # fmt: skip
    return inputs.input_ids.to(device), inputs.attention_mask.to(device)


def encode_dev_prompts(
    text_encoders: Any,
    tokenizers: Any,
    prompts: list[str],
    *,
    max_length: int | None = None,
    t5_padding: str = "unmodified",
    device: Any = "cpu",
) -> list[dict[str, Any]]:
    """Per prompt, `prompt_embeds` (max_length tokens x 3 * Mistral dim: hidden states 10, 20, 30 side by side), as
    `Flux2Pipeline.encode_prompt`. `max_length` is the `max_sequence_length`; `t5_padding` does not apply."""
    text.check_t5_padding(t5_padding)
    (encoder,), (tokenizer,) = tuple(text_encoders), tuple(tokenizers)
    length = text.check_max_length(max_length, MAX_LENGTH)
    ids, mask = processor_tokens(tokenizer, prompts, length, device)
    return _stacked_hidden_states(encoder, encoder.config.text_config.num_hidden_layers, ids, mask, DEV_HIDDEN_LAYERS,
                                  "[dev]")  # fmt: skip


def patchify(latents: Any) -> Any:
    """B x C x h x w -> B x 4C x h/2 x w/2, each 2x2 patch's channels together (`Flux2Pipeline._patchify_latents`)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: Any) -> Any:
    """The inverse of `patchify`."""
    b, c4, h, w = latents.shape
    return latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c4 // 4, h * 2, w * 2)


def position_ids(rows: int, cols: int, device: Any, time: int = 0) -> Any:
    """(rows * cols) x 4 ids (time, row, column, 0) of patch tokens, as `Flux2Pipeline._prepare_latent_ids` (time 0)
    and `_prepare_image_ids` (a reference image: time 10)."""
    import torch

    times = torch.tensor([time])
    return torch.cartesian_prod(times, torch.arange(rows), torch.arange(cols), torch.arange(1)).to(device)


def text_ids(length: int, device: Any) -> Any:
    """length x 4 ids (0, 0, 0, token), as `Flux2Pipeline._prepare_text_ids`."""
    import torch

    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)).to(device)


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """The FLUX.2 pipelines' denoiser call: patchified latents as tokens with their ids, the text with its ids,
    `timestep / 1000`, the guidance value(s) for a guidance-distilled transformer ([dev]; default 1.0) and None
    otherwise ([klein]); the output laid back out as B x C x h x w."""
    patches = _patches(latents)
    ids = position_ids(*patches.shape[-2:], latents.device)
    out = _transformer_call(transformer, _tokens(patches), ids, timesteps, text, guidance)
    return unpatchify(out.transpose(1, 2).reshape(patches.shape))


def predict_with_reference(transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None,
                           guidance: Any = None, *, reference: Any) -> Any:  # fmt: skip
    """The FLUX.2 pipelines' denoiser call with a reference image (`image=`): its patch tokens follow the noisy ones,
    with ids (10, row, column, 0) (`_prepare_image_ids`); only the noisy tokens' prediction is kept."""
    import torch

    patches, ref_patches = _patches(latents), _patches(reference)
    b = latents.shape[0]
    if reference.shape[0] not in (1, b) or reference.shape[1] != latents.shape[1]:
        raise InputError(f"reference latents {tuple(reference.shape)} do not fit latents {tuple(latents.shape)}")
    tokens = _tokens(patches)
    ids = torch.cat([position_ids(*patches.shape[-2:], latents.device),
                     position_ids(*ref_patches.shape[-2:], latents.device, time=REFERENCE_TIME)])  # fmt: skip
    inputs = torch.cat([tokens, _tokens(ref_patches).expand(b, -1, -1)], dim=1)
    out = _transformer_call(transformer, inputs, ids, timesteps, text, guidance)[:, : tokens.shape[1]]
    return unpatchify(out.transpose(1, 2).reshape(patches.shape))


def _patches(latents: Any) -> Any:
    h, w = latents.shape[-2:]
    if h % 2 or w % 2:
        raise InputError(f"FLUX.2 patchifies 2x2 latent patches: latent height and width must be even, got {h} x {w}")
    return patchify(latents)


def _tokens(patches: Any) -> Any:
    """B x C x h x w patches -> B x (h * w) x C tokens (`_pack_latents`)."""
    return patches.flatten(2).transpose(1, 2)


def _transformer_call(transformer: Any, tokens: Any, ids: Any, timesteps: Any, text: dict[str, Any],
                      guidance: Any) -> Any:  # fmt: skip
    import torch

    b, device = tokens.shape[0], tokens.device
    embeds = text["prompt_embeds"]
    scale = None
    if transformer.config.guidance_embeds:
        scale = torch.as_tensor(1.0 if guidance is None else guidance, dtype=torch.float32, device=device)
        scale = scale.expand(b) if scale.ndim == 0 else scale
    return transformer(
        hidden_states=tokens,
        timestep=timesteps.to(tokens.dtype) / 1000,
        guidance=scale,
        encoder_hidden_states=embeds,
        txt_ids=text_ids(embeds.shape[1], device).expand(b, -1, -1),
        img_ids=ids.expand(b, -1, -1),
        return_dict=False,
    )[0]


def text_encoder(tokenizer: Any, hidden: int = 16) -> Any:
    """A tiny `Qwen3ForCausalLM` with the 27 layers the pipeline reads hidden states from (grouped-query attention,
    q/k norms), whose ids match `tokenizer`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=max(HIDDEN_LAYERS), num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )  # fmt: skip
    return Qwen3ForCausalLM(config).eval()


def vae() -> Any:
    """A tiny `AutoencoderKLFlux2`: 32 latent channels, the real 8x reduction, BatchNorm statistics that are not
    the identity (so that tests see the normalisation)."""
    import torch
    from diffusers import AutoencoderKLFlux2

    model = AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=32, norm_num_groups=8,
        sample_size=64, mid_block_add_attention=False,
    ).eval()  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(model.bn.running_mean.shape, generator=generator) * 0.1)
        model.bn.running_var.copy_(1 + torch.rand(model.bn.running_var.shape, generator=generator))
    return model


def tiny_transformer(joint_attention_dim: int, guidance_embeds: bool) -> Any:
    """A tiny `Flux2Transformer2DModel`: 1 double- and 2 single-stream blocks, 128 input channels."""
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    ).eval()  # fmt: skip


def scheduler() -> Any:
    """FLUX.2's scheduler (SimpleTuner's SCHEDULER_CONFIG: dynamic shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
        shift=3.0, use_dynamic_shifting=True,
    )  # fmt: skip


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny FLUX.2 [klein] diffusers folder: 1 double- and 2 single-stream blocks without guidance
    embedding, the FLUX.2 VAE, Qwen3 (27 layers) with its chat template, FLUX.2's scheduler (dynamic shift)."""
    from diffusers import Flux2KleinPipeline

    words = z_image.tokenizer()
    tiny_parts.seed_everything(seed)
    encoder = text_encoder(words)
    tiny_parts.seed_everything(seed + 1)
    transformer = tiny_transformer(encoder.config.hidden_size * len(HIDDEN_LAYERS), guidance_embeds=False)
    tiny_parts.seed_everything(seed + 2)
    autoencoder = vae()
    pipe = Flux2KleinPipeline(scheduler=scheduler(), vae=autoencoder, text_encoder=encoder, tokenizer=words,
                              transformer=transformer)  # fmt: skip
    tiny_parts.save(pipe, out_dir)


# Mistral Small 3.1's chat template for system and user turns, as FLUX.2 [dev]'s processor applies it (the real
# template's default system message, which carries the date, is left out: FLUX.2 always sends its own).
DEV_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if message['content'] is string %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' }}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}{%- endif %}"
    "{%- endfor %}{{- '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{{- message['content'][0]['text'] }}{%- endif %}{{- eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)
DEV_PATCH_SIZE = 8  # the tiny Pixtral vision tower's patch (the real one: 14)


def dev_tokenizer() -> Any:
    """The tiny Mistral-3 tokenizer with Mistral Small 3.1's chat template."""
    from pipeline.families.tokenizers import mistral_tokenizer

    words = mistral_tokenizer()
    words.chat_template = DEV_CHAT_TEMPLATE
    return words


def dev_text_encoder(tokenizer: Any, hidden: int = 16) -> Any:
    """A tiny `Mistral3ForConditionalGeneration`: a Mistral language model with the 30 layers the pipeline reads
    hidden states from (grouped-query attention) and a one-layer Pixtral vision tower, ids matching `tokenizer`."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    language = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=max(DEV_HIDDEN_LAYERS), num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=2048, sliding_window=None, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    vision = PixtralVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1,
                                 num_attention_heads=2, head_dim=8, image_size=64, patch_size=DEV_PATCH_SIZE)  # fmt: skip
    config = Mistral3Config(vision_config=vision, text_config=language, spatial_merge_size=2,
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"))  # fmt: skip
    return Mistral3ForConditionalGeneration(config).eval()


def tiny_dev(out_dir: Path, seed: int) -> None:
    """Write a tiny FLUX.2 [dev] diffusers folder: the [klein] tiny's transformer with a guidance embedding, the
    FLUX.2 VAE, Mistral-3 (30 layers, a Pixtral vision tower) and its processor's files in tokenizer/ (tokenizer,
    chat template, processor and image processor configs; model_index.json names PixtralProcessor, as FLUX.2-dev's)."""
    from diffusers import Flux2Pipeline
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    words = dev_tokenizer()
    tiny_parts.seed_everything(seed)
    encoder = dev_text_encoder(words)
    tiny_parts.seed_everything(seed + 1)
    width = encoder.config.text_config.hidden_size * len(DEV_HIDDEN_LAYERS)
    transformer = tiny_transformer(width, guidance_embeds=True)
    tiny_parts.seed_everything(seed + 2)
    autoencoder = vae()
    pipe = Flux2Pipeline(scheduler=scheduler(), vae=autoencoder, text_encoder=encoder, tokenizer=words,
                         transformer=transformer)  # fmt: skip
    tiny_parts.save(pipe, out_dir)
    folder = Path(out_dir) / "tokenizer"
    images = PixtralImageProcessorPil(patch_size={"height": DEV_PATCH_SIZE, "width": DEV_PATCH_SIZE},
                                      size={"longest_edge": 64})  # fmt: skip
    preprocessor = {**json.loads(images.to_json_string()), "image_processor_type": "PixtralImageProcessor",
                    "processor_class": "PixtralProcessor"}  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2, sort_keys=True) + "\n")
    processor = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]",
                 "patch_size": DEV_PATCH_SIZE, "processor_class": "PixtralProcessor", "spatial_merge_size": 2}  # fmt: skip
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
    index_path = Path(out_dir) / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# SimpleTuner's FLUX.2 flavours (models/flux2/model.py HUGGINGFACE_PATHS); its default is "klein-9b".
FLAVOURS = (
    Flavour("dev", "black-forest-labs/FLUX.2-dev"),  # trains as DEV_FAMILY (see `_variant`)
    Flavour("klein-4b", "black-forest-labs/FLUX.2-klein-base-4B"),
    Flavour("klein-9b", "black-forest-labs/FLUX.2-klein-base-9B"),
)  # fmt: skip


def check_training_guidance(config: Any, family: Family) -> None:
    """Refuse flux_guidance_* settings other than SimpleTuner's for a FLUX.2 transformer with a guidance embedding
    ([dev]): SimpleTuner trains FLUX.2 with guidance 1.0 whatever they say (it overrides flux_guidance_mode to
    constant and flux_guidance_value to 1.0), so honouring them would train another model than SimpleTuner does."""
    if family.pipeline_class != DEV_PIPELINE:
        return  # [klein] has no guidance embedding: the options cannot change what it trains
    if config.flux_guidance_mode != "constant" or float(config.flux_guidance_value) != 1.0:
        raise ConfigError(f"flux_guidance_mode {config.flux_guidance_mode!r} / flux_guidance_value "
                          f"{config.flux_guidance_value}: FLUX.2 [dev] trains with guidance 1.0 (SimpleTuner forces "
                          "flux_guidance_mode constant and flux_guidance_value 1.0 for FLUX.2); remove both options")  # fmt: skip


def _variant(flavour: str | None, source: str) -> Family:
    """[dev] for its flavour or a Flux2Pipeline folder, else [klein]; a flavour that names the other pipeline than
    the model folder's is refused."""
    from pipeline.families.hub import model_index_of

    pipeline = (model_index_of(source) or {}).get("_class_name")
    dev = flavour == "dev" if pipeline not in (DEV_PIPELINE, FAMILY.pipeline_class) else pipeline == DEV_PIPELINE
    if flavour is not None and (flavour == "dev") != dev:
        raise ConfigError(f"model_flavour {flavour} is FLUX.2 {'[dev]' if flavour == 'dev' else '[klein]'}, but the "
                          f"model at {source} is a {pipeline}: set model_flavour to "
                          f"{'dev' if dev else 'klein-4b or klein-9b'}, or point pretrained_model_name_or_path at a "
                          f"{DEV_PIPELINE if flavour == 'dev' else FAMILY.pipeline_class} model")  # fmt: skip
    return DEV_FAMILY if dev else FAMILY


FAMILY = Family(
    name="flux2",
    pipeline_class="Flux2KleinPipeline",
    denoiser=Component("transformer", "Flux2Transformer2DModel", "diffusers"),
    vae=Component("vae", "AutoencoderKLFlux2", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "FlowMatchEulerDiscreteScheduler", "diffusers"),
    latent_channels=32,  # the VAE's; `predict` patchifies them to the transformer's 128
    bucket_alignment=16,  # the VAE's 8x and the 2x2 patches (SimpleTuner forces 16)
    prediction_type="flow_matching",
    lora_targets=LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=text.collate,
    predict=predict,
    single_file=False,
    default_flow_shift=3.0,  # SimpleTuner's flow_schedule_shift default
    flavours=FLAVOURS,
    default_flavour="klein-9b",
    variant=_variant,
)

# FLUX.2 [dev]: the same transformer (with a guidance embedding), VAE, latents, LoRA targets and schedule; Mistral-3's
# prompt embeddings; rendered by Flux2Pipeline.
DEV_FAMILY: Family = dataclasses.replace(FAMILY, pipeline_class=DEV_PIPELINE, text_encoders=DEV_TEXT_ENCODERS,
                                         encode_prompts=encode_dev_prompts, tiny=tiny_dev, variant=None,
                                         check_config=check_training_guidance)  # fmt: skip

# FLUX.2 trained on (reference image, image) pairs, as SimpleTuner trains it when its datasets link conditioning
# images: the same pipeline, given the reference as `image`.
REFERENCE_FAMILY: Family = dataclasses.replace(FAMILY, predict=predict_with_reference, takes_reference=True,
                                               variant=None)  # fmt: skip
DEV_REFERENCE_FAMILY: Family = dataclasses.replace(DEV_FAMILY, predict=predict_with_reference, takes_reference=True)

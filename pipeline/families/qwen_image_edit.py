"""Qwen-Image-Edit (`QwenImageEditPipeline`; SimpleTuner's `qwen_image` flavour `edit-v1`): Qwen-Image trained to
edit a reference image.

Text: the caption (the edit instruction) is encoded together with the sample's reference image, exactly as
`QwenImageEditPipeline.encode_prompt` does: the edit chat template with one `<|image_pad|>` slot, which the
`Qwen2VLProcessor` expands to the image's patch tokens; Qwen2.5-VL (with its vision tower) runs over text and image,
and the last hidden state of the real tokens after the template's first 64 is kept. The processor is built with
transformers' PIL image backend (`Qwen2VLImageProcessorPil`, no torchvision) and passed to the pipeline as
`processor=`. Each prompt is encoded alone (no batch neighbours, no padding); the whole prompt is kept (the pipeline
has no `max_sequence_length` here). A prompt without a reference (the empty caption of caption dropout, the shared
prompts) is encoded with a black 224x224 image, as SimpleTuner's `encode_dropout_caption` does.

Denoiser: the noisy latents and the reference's latents are packed 2x2 and concatenated along the sequence, with
`img_shapes` [(1, h/2, w/2), (1, h'/2, w'/2)] per sample; only the target's tokens are kept (the pipeline's call).

Qwen-Image-Edit-Plus (`QwenImageEditPlusPipeline`; flavours edit-v2, the 2509 model, and edit-v3, 2511): the same
denoiser call and template, the user turn "Picture 1: <image> caption" with the reference resized to a 384x384 area
(`PLUS_FAMILY`); the 2511 transformer's config sets zero_cond_t (the reference tokens at timestep 0, applied by the
transformer itself), which edit-v3 requires as SimpleTuner always uses it (`V3_FAMILY`). One reference per sample:
several (the Plus pipeline's multi-image editing) are refused by `st cache`.

edit-v2+ (`V2_PLUS_FAMILY`): the 2509 model trained with zero_cond_t on, as SimpleTuner's ZERO_COND_T_FLAVOURS do. Its
`_model_predict_edit_plus` doubles the timesteps to [t, 0] and passes `modulate_index` (0 for the target's tokens, 1
for the reference's) to its own transformer, whose image stream takes shift / scale / gate per token from the t or
the 0 half, while the text stream and the output norm take the t half. diffusers' QwenImageTransformer2DModel does
exactly that when its config sets `zero_cond_t` (the flag adds no weights), so edit-v2+ loads the 2509 transformer
with `zero_cond_t=True` (`zero_cond_transformer_class`, for every way st loads a denoiser) and calls it as edit-v2.
Validation runs QwenImageEditPlusPipeline around that live transformer, so its renders use zero_cond_t too.
DEVIATION: SimpleTuner's validation pipeline passes no `modulate_index` (its transformer ignores the config flag), so
its edit-v2+ / edit-v3 renders run without zero_cond_t; st renders with the conditioning it trains with. The train
manifest records `qwen_zero_cond_t` (the flavour changes training, not the files it reads) and the model card says
how to load the transformer with it.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InputError
from pipeline.families import flux, qwen_image, text, tiny_parts
from pipeline.families.spec import Component, Family, TextEncoderSpec

PIPELINE_CLASS = "QwenImageEditPipeline"
FLAVOUR = "edit-v1"
PLUS_PIPELINE = "QwenImageEditPlusPipeline"  # Qwen-Image-Edit-2509 (edit-v2) and -2511 (edit-v3)
PLUS_FLAVOURS = ("edit-v2", "edit-v3")
ZERO_COND_FLAVOUR = "edit-v2+"  # 2509 with zero_cond_t forced on (SimpleTuner's ZERO_COND_T_FLAVOURS)
TRANSFORMER_CLASS = "QwenImageTransformer2DModel"
ZERO_COND_KEY = "qwen_zero_cond_t"  # train's key / manifest entry of an edit-v2+ run (`train_key_entries`)
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TEMPLATE_TOKENS = 64  # the pipeline's prompt_template_encode_start_idx
# QwenImageEditPlusPipeline: the same system part; the user turn starts with one slot per image ("Picture 1: ...").
PLUS_TEMPLATE = PROMPT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "")
PLUS_IMAGE_SLOT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
CONDITION_AREA = 384 * 384  # QwenImageEditPlusPipeline's CONDITION_IMAGE_SIZE: what Qwen2.5-VL sees of a reference
DUMMY_SIZE = 224  # SimpleTuner's stand-in image for prompts without a reference (a black 224x224 image)
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
PROCESSOR_CLASS = "Qwen2VLPilProcessor"


@functools.cache
def processor_class() -> type:
    """`Qwen2VLProcessor` over an image processor and a tokenizer only: transformers 5 checks every sub-processor's
    class when a processor is built, and its video processor needs torchvision, which an image-only run never uses."""
    from transformers import Qwen2VLProcessor

    class Qwen2VLPilProcessor(Qwen2VLProcessor):
        """A Qwen2VLProcessor with the PIL image backend and no video processor."""

        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                     **kwargs: Any) -> None:  # fmt: skip
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

        @classmethod
        def from_pretrained(cls, source: Any, subfolder: str | None = None, revision: str | None = None,
                            local_files_only: bool = False, **_: Any) -> Any:  # fmt: skip
            """The model's `processor/` folder (preprocessor_config.json and the tokenizer files) read with the PIL
            image backend; dtype and variant (weights options) do not apply."""
            from transformers import Qwen2Tokenizer
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            opts: dict[str, Any] = {"subfolder": subfolder or "", "local_files_only": local_files_only}
            if revision is not None:
                opts["revision"] = revision
            return cls(image_processor=Qwen2VLImageProcessorPil.from_pretrained(source, **opts),
                       tokenizer=Qwen2Tokenizer.from_pretrained(source, **opts))  # fmt: skip

    return Qwen2VLPilProcessor


@functools.cache
def zero_cond_transformer_class() -> type:
    """What edit-v2+'s denoiser component loads: diffusers' `QwenImageTransformer2DModel` (the instance returned is
    of that class, config and all) with `zero_cond_t=True` over the folder's config, from a diffusers folder, a hub id
    or a single file (GGUF included), as SimpleTuner's edit-v2+ always runs the 2509 transformer."""
    from diffusers import QwenImageTransformer2DModel

    class QwenImageTransformer2DModelZeroCondT(QwenImageTransformer2DModel):
        """A loader only: `from_pretrained` / `from_single_file` return the diffusers class with zero_cond_t on."""

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
            return QwenImageTransformer2DModel.from_pretrained(*args, **{**kwargs, "zero_cond_t": True})

        @classmethod
        def from_single_file(cls, *args: Any, **kwargs: Any) -> Any:
            return QwenImageTransformer2DModel.from_single_file(*args, **{**kwargs, "zero_cond_t": True})

    return QwenImageTransformer2DModelZeroCondT


def __getattr__(name: str) -> Any:
    """`Component.load_class` finds the processor class here (built on first use: transformers loads lazily), and
    edit-v2+'s transformer loader under the diffusers class name its component keeps (`V2_PLUS_FAMILY`)."""
    if name == PROCESSOR_CLASS:
        return processor_class()
    if name == TRANSFORMER_CLASS:
        return zero_cond_transformer_class()
    raise AttributeError(name)


TEXT_ENCODERS = (
    TextEncoderSpec(
        model=qwen_image.TEXT_ENCODERS[0].model,
        tokenizer=Component("processor", PROCESSOR_CLASS, __name__),
        max_length=qwen_image.MAX_LENGTH,
        kind="qwen2_5_vl",
    ),
)


def dummy_image() -> Any:
    from PIL import Image

    return Image.new("RGB", (DUMMY_SIZE, DUMMY_SIZE))


def encode_prompts(
    text_encoders: Any,
    tokenizers: Any,
    prompts: list[str],
    *,
    max_length: int | None = None,
    t5_padding: str = "unmodified",
    device: Any = "cpu",
    images: list[Any] | None = None,
) -> list[dict[str, Any]]:
    """Per prompt, `prompt_embeds` (its real tokens after the template's first 64, image tokens included) and
    `attention_mask` (ones), as `QwenImageEditPipeline.encode_prompt(prompt, image)` for one prompt; `images` holds
    one PIL image (or None: a black 224x224 image) per prompt. `tokenizers` holds the pipeline's processor."""
    text.check_t5_padding(t5_padding)
    prompts = text.check_prompts(prompts)
    _check_max_length(max_length, PIPELINE_CLASS)
    texts = [PROMPT_TEMPLATE.format(p) for p in prompts]
    return _encode(text_encoders, tokenizers, texts, images, device)


def encode_prompts_plus(
    text_encoders: Any,
    tokenizers: Any,
    prompts: list[str],
    *,
    max_length: int | None = None,
    t5_padding: str = "unmodified",
    device: Any = "cpu",
    images: list[Any] | None = None,
) -> list[dict[str, Any]]:
    """`encode_prompts` as `QwenImageEditPlusPipeline` encodes a prompt with one reference image: the image resized
    to a 384x384 area (`condition_image`, as its `__call__` does before `encode_prompt`, and as SimpleTuner resizes
    the cached reference), the user turn "Picture 1: <image> prompt". Without a reference, the black 224x224 image
    as it is (SimpleTuner's stand-in)."""
    text.check_t5_padding(t5_padding)
    prompts = text.check_prompts(prompts)
    _check_max_length(max_length, PLUS_PIPELINE)
    texts = [PLUS_TEMPLATE.format(PLUS_IMAGE_SLOT.format(1) + p) for p in prompts]
    images = None if images is None else [None if i is None else condition_image(i) for i in images]
    return _encode(text_encoders, tokenizers, texts, images, device)


def condition_image(image: Any) -> Any:
    """What QwenImageEditPlusPipeline gives Qwen2.5-VL of a reference: the image resized (Lanczos) to about a
    384x384 area, each side a multiple of 32 (its `calculate_dimensions` and `VaeImageProcessor.resize`)."""
    import math

    from PIL import Image

    ratio = image.width / image.height
    width = math.sqrt(CONDITION_AREA * ratio)
    height = width / ratio
    return image.resize((round(width / 32) * 32, round(height / 32) * 32), resample=Image.Resampling.LANCZOS)


def _check_max_length(max_length: int | None, pipeline_class: str) -> None:
    if max_length is not None:
        raise ConfigError(f"tokenizer_max_length is set ({max_length}), but {pipeline_class} encodes the whole "
                          "prompt with its image tokens (it has no max_sequence_length); unset "
                          "tokenizer_max_length")  # fmt: skip


def _encode(text_encoders: Any, tokenizers: Any, texts: list[str], images: list[Any] | None,
            device: Any) -> list[dict[str, Any]]:  # fmt: skip
    """Each templated text encoded alone with its image (None: the black 224x224 image), as the edit pipelines'
    `_get_qwen_prompt_embeds` for one prompt: the last hidden state of the real tokens after the first 64."""
    import torch

    images = [None] * len(texts) if images is None else list(images)
    if len(images) != len(texts):
        raise InputError(f"{len(images)} reference image(s) for {len(texts)} prompt(s)")
    (encoder,), (processor,) = tuple(text_encoders), tuple(tokenizers)
    items = []
    for templated, image in zip(texts, images, strict=True):
        inputs = processor(text=[templated], images=dummy_image() if image is None else image, padding=True,
                           return_tensors="pt").to(device)  # fmt: skip
        with torch.no_grad():
            hidden = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                             output_hidden_states=True).hidden_states[-1]  # fmt: skip
        embeds = hidden[0][inputs["attention_mask"][0].bool()][TEMPLATE_TOKENS:].detach().clone()
        ones = torch.ones(embeds.shape[0], dtype=torch.long, device=embeds.device)
        items.append({"prompt_embeds": embeds, "attention_mask": ones})
    return items


def predict(transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None,
            guidance: Any = None, *, reference: Any) -> Any:  # fmt: skip
    """`QwenImageEditPipeline`'s denoiser call: the packed noisy latents followed by the packed reference latents,
    `img_shapes` of both per sample, Qwen-Image's text, timestep and guidance inputs; the prediction's target tokens
    unpacked to B x C x h x w. `reference`: B (or 1) x C x h' x w' latents, normalised like `latents`."""
    h, w = flux.even_latent_size(latents)
    rh, rw = flux.even_latent_size(reference)
    b = latents.shape[0]
    if reference.shape[0] not in (1, b) or reference.shape[1] != latents.shape[1]:
        raise InputError(f"reference latents {tuple(reference.shape)} do not fit latents {tuple(latents.shape)}")
    import torch

    tokens = flux.pack_latents(latents)
    packed = torch.cat([tokens, flux.pack_latents(reference).expand(b, -1, -1)], dim=1)
    shapes = [[(1, h // 2, w // 2), (1, rh // 2, rw // 2)]] * b
    out = qwen_image.transformer_call(transformer, packed, timesteps, text, shapes, guidance)
    return flux.unpack_latents(out[:, : tokens.shape[1]], h, w)


def predict_zero_cond(transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None,
                      guidance: Any = None, *, reference: Any) -> Any:  # fmt: skip
    """`predict` for edit-v3, which SimpleTuner always trains with zero_cond_t (the reference tokens at timestep 0):
    the transformer applies it itself when its config sets it (Qwen-Image-Edit-2511's); InputError otherwise."""
    if not getattr(transformer.config, "zero_cond_t", False):
        raise InputError("model_flavour edit-v3 (Qwen-Image-Edit-2511) trains with zero_cond_t, and this transformer's "
                         "config does not set it: point pretrained_model_name_or_path at Qwen-Image-Edit-2511, or use "
                         "model_flavour edit-v2 for a transformer without it")  # fmt: skip
    return predict(transformer, latents, timesteps, text, meta, guidance, reference=reference)


def predict_zero_cond_forced(transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None,
                             guidance: Any = None, *, reference: Any) -> Any:  # fmt: skip
    """`predict` for edit-v2+: the 2509 transformer loaded with zero_cond_t on (`zero_cond_transformer_class`);
    InputError for a transformer built without it (its call would silently be edit-v2's)."""
    if not getattr(transformer.config, "zero_cond_t", False):
        raise InputError(f"model_flavour {ZERO_COND_FLAVOUR} trains with zero_cond_t, and this transformer was loaded "
                         "without it: load it through the edit-v2+ family (its denoiser component sets it), or use "
                         "model_flavour edit-v2")  # fmt: skip
    return predict(transformer, latents, timesteps, text, meta, guidance, reference=reference)


def zero_cond_key_entries(family: Family) -> dict[str, str]:
    """`Family.train_key_entries` of edit-v2+: zero_cond_t changes training but no file the run reads, so train's key
    and manifest record it (an edit-v2 run of the same folder keys otherwise; publish's card reads it)."""
    return {ZERO_COND_KEY: "forced"}


def card_note(family: Family, train: dict[str, Any], denoiser_config: Any) -> str | None:
    """`Family.card_note` of Qwen-Image: for an edit-v2+ run, that the transformer must run with zero_cond_t."""
    if train.get("config", {}).get(ZERO_COND_KEY) is None:
        return None
    if train.get("model_type") == "full":
        return ("It was trained as edit-v2+: the transformer runs with `zero_cond_t` on (the reference image's tokens "
                "at timestep 0), which its published config sets.")
    return ("It was trained as edit-v2+: the transformer ran with `zero_cond_t` on (the reference image's tokens at "
            "timestep 0), which the base model's config does not set; load the transformer with "
            "`QwenImageTransformer2DModel.from_pretrained(<base>, subfolder=\"transformer\", zero_cond_t=True)` and "
            "pass it to the pipeline as `transformer=` before loading these weights.")


def variant(flavour: str | None, source: str) -> Family:
    """The family a `qwen_image` run trains: Qwen-Image-Edit for flavour edit-v1, Qwen-Image-Edit-Plus for edit-v2
    and edit-v3, Qwen-Image-Edit-Plus with zero_cond_t forced on for edit-v2+, or as the folder's model_index.json
    names it (QwenImageEditPipeline, QwenImageEditPlusPipeline); else Qwen-Image."""
    from pipeline.families.hub import model_index_of

    if flavour == ZERO_COND_FLAVOUR:
        return V2_PLUS_FAMILY
    if flavour == FLAVOUR:
        return FAMILY
    if flavour in PLUS_FLAVOURS:
        return V3_FAMILY if flavour == "edit-v3" else PLUS_FAMILY
    found = (model_index_of(source) or {}).get("_class_name")
    return {PIPELINE_CLASS: FAMILY, PLUS_PIPELINE: PLUS_FAMILY}.get(found, qwen_image.FAMILY)


def tokenizer() -> Any:
    """The tiny Qwen tokenizer with Qwen2.5-VL's vision tokens."""
    from pipeline.families.tokenizers import qwen_tokenizer

    tok = qwen_tokenizer()
    tok.add_tokens(list(VISION_TOKENS), special_tokens=True)
    return tok


def text_encoder(tok: Any, hidden: int = 32) -> Any:
    """A tiny `Qwen2_5_VLForConditionalGeneration` with its vision tower (one block, 14-pixel patches merged 2x2)
    and the image/vision token ids of `tok`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = qwen_image.text_encoder(tok, hidden).config
    ids = tok.convert_tokens_to_ids(list(VISION_TOKENS))
    config.vision_start_token_id, config.vision_end_token_id, config.image_token_id, config.video_token_id = ids
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny(out_dir: Path, seed: int, pipeline_class: str = PIPELINE_CLASS) -> None:
    """Write a tiny Qwen-Image-Edit diffusers folder: tiny Qwen-Image parts, a Qwen2.5-VL with its vision tower, and
    `processor/` (the PIL image processor's preprocessor_config.json, at most 256x256 pixels per image, and the
    tokenizer), named in model_index.json as the real model names it (transformers' Qwen2VLProcessor).
    `pipeline_class`: the model_index.json's pipeline (QwenImageEditPlusPipeline: `tiny_plus`)."""
    import json

    from diffusers import QwenImageEditPipeline
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out_dir = Path(out_dir)
    pipe = QwenImageEditPipeline(processor=None, **qwen_image.tiny_components(seed, tokenizer(), text_encoder))
    tiny_parts.save(pipe, out_dir)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 256 * 256})
    image_processor.save_pretrained(str(out_dir / "processor"))
    pipe.tokenizer.save_pretrained(str(out_dir / "processor"))
    index_path = out_dir / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index["_class_name"] = pipeline_class
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def tiny_plus(out_dir: Path, seed: int) -> None:
    """A tiny Qwen-Image-Edit-Plus (2509) folder: the tiny edit model named QwenImageEditPlusPipeline (the same
    components; the 2511 model differs in its transformer's zero_cond_t)."""
    tiny(out_dir, seed, PLUS_PIPELINE)


FAMILY: Family = dataclasses.replace(qwen_image.FAMILY, pipeline_class=PIPELINE_CLASS, text_encoders=TEXT_ENCODERS,
                                     encode_prompts=encode_prompts, predict=predict, takes_reference=True,
                                     text_with_reference=True, tiny=tiny, variant=None)  # fmt: skip
# Qwen-Image-Edit-2509 / 2511 with one reference image per sample: the denoiser call is edit-v1's (the transformer
# applies its own zero_cond_t, 2511's, from its config); the prompt sees the reference at a 384x384 area.
PLUS_FAMILY: Family = dataclasses.replace(FAMILY, pipeline_class=PLUS_PIPELINE, encode_prompts=encode_prompts_plus,
                                          tiny=tiny_plus)  # fmt: skip
V3_FAMILY: Family = dataclasses.replace(PLUS_FAMILY, predict=predict_zero_cond)  # edit-v3: zero_cond_t required
# edit-v2+: the 2509 transformer loaded with zero_cond_t on (the component keeps diffusers' class name and subfolder, so
# folder checks and identities are edit-v2's; only the loader differs).
V2_PLUS_FAMILY: Family = dataclasses.replace(PLUS_FAMILY, predict=predict_zero_cond_forced,
                                             denoiser=Component("transformer", TRANSFORMER_CLASS, __name__),
                                             train_key_entries=zero_cond_key_entries)  # fmt: skip

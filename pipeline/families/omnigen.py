"""OmniGen v1: a Phi-3 style transformer that embeds the prompt's token ids itself, SDXL's 4-channel VAE.

Text: OmniGen has no text encoder. `OmniGenMultiModalProcessor` wraps a prompt in its instruction template
(`<|user|>`, "Generate an image according to the following instructions", `<|end|>`, `<|assistant|>`,
`<|diffusion|>`) and tokenizes it with Phi-3's tokenizer, without truncation; the transformer embeds those ids. So
`st cache` stores each prompt's token ids (`input_ids`, int64), as `encode_prompts` below (the family's "text
encoder" is `NoEncoderTokenizer`, a stand-in with nothing to run), and `collate_text` pads a batch on the left with id 2
and a 0/1 mask, as `OmniGenCollator.pad_input_ids` does. SimpleTuner tokenizes in its training step instead
(`uses_text_embeddings_cache` False); the ids are the same.

Denoiser: `predict` builds the rest of the collator's output for the batch's latent size (OmniGenCollator's causal
text / bidirectional image attention mask and its position ids: what SimpleTuner's OmniGenTrainingCollator builds
from latents) and calls the transformer as `OmniGenPipeline` does. OmniGen counts time the other way (t = 1 is the
image, the scheduler is `invert_sigmas` with 1 training step) and predicts the velocity towards the image: `predict`
passes t = 1 - sigma and negates the output, which makes SimpleTuner's loss (`latents - noise` against the raw
output) st's (`noise - latents`). Training sigmas are SimpleTuner's OmniGen draw, t = sigmoid(normal), unshifted.

Without torchvision: `OmniGenPipeline.__init__` builds an `OmniGenMultiModalProcessor`, whose image transform is a
torchvision Compose, and the pipeline module only imports the processor when torchvision is installed.
`pipeline_setup` then gives that module `PilProcessor`, the same processor with the same transform written with
PIL and numpy (`crop_image`, to a C x H x W tensor in [0, 1], normalised with mean 0.5 / std 0.5); the denoising
loop stays diffusers' own. With torchvision installed the stock processor is used.

Text-to-image only: a run whose datasets link conditioning images (OmniGen's instruction / reference-image training,
`<img><|image_1|></img>` placeholders in the prompt) is refused by `train.reference.check` (`PAIRED_NOT_YET`).
Validation renders through the pipeline with the prompt text (`Family.prompt_text`); OmniGenPipeline takes no
negative prompt (its processor has its own), so validation_negative_prompt does not apply, as in SimpleTuner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.families import text, tiny_parts
from pipeline.families.spec import Component, Family, Flavour, TextEncoderSpec

PAD_ID = 2  # OmniGenCollator's pad_token_id (Phi-3's </s>)
MAX_LENGTH = 131072  # Phi-3's model_max_length: the processor never truncates
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # SimpleTuner's DEFAULT_LORA_TARGET (OmniGen keeps it)
PHI3_SPECIALS = ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>")


class NoEncoderTokenizer:
    """OmniGen's "text encoder": nothing to run (the transformer embeds token ids itself). It stands in the text
    encoder slot, loads from the tokenizer folder (so st's loaders treat it as tokenizer files, hence its name) and
    offers the few module methods `st cache` calls on an encoder."""

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> NoEncoderTokenizer:
        return cls()

    def eval(self) -> NoEncoderTokenizer:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> NoEncoderTokenizer:
        return self

    def to(self, *args: Any, **kwargs: Any) -> NoEncoderTokenizer:
        return self

    def parameters(self) -> Any:
        return iter(())


TEXT_ENCODERS = (
    TextEncoderSpec(
        model=Component("tokenizer", "NoEncoderTokenizer", "pipeline.families.omnigen"),
        tokenizer=Component("tokenizer", "LlamaTokenizer", "transformers"),
        max_length=MAX_LENGTH,
        kind="phi3",
    ),
)


def instruction(prompt: str) -> str:
    """The processor's instruction template around `prompt` (OmniGenMultiModalProcessor.add_prefix_instruction)."""
    from diffusers.pipelines.omnigen.processor_omnigen import OmniGenMultiModalProcessor

    return OmniGenMultiModalProcessor.add_prefix_instruction(None, prompt)


def encode_prompts(
    text_encoders: Any,
    tokenizers: Any,
    prompts: list[str],
    *,
    max_length: int | None = None,
    t5_padding: str = "unmodified",
    device: Any = "cpu",
) -> list[dict[str, Any]]:
    """Per prompt, `input_ids`: its instruction-templated token ids (int64), as
    `OmniGenMultiModalProcessor.process_multi_modal_prompt` for a prompt without images."""
    import torch

    text.check_t5_padding(t5_padding)
    if max_length is not None:
        raise ConfigError("tokenizer_max_length does not apply to model_family omnigen (OmniGen's processor "
                          "tokenizes whole prompts, without truncation); remove it")  # fmt: skip
    (tokenizer,) = tuple(tokenizers)
    return [{"input_ids": torch.tensor(tokenizer(instruction(p)).input_ids, dtype=torch.long)}
            for p in text.check_prompts(prompts)]  # fmt: skip


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`input_ids` padded on the left with id 2 and `attention_mask` (0 on padding), as
    `OmniGenCollator.pad_input_ids`."""
    import torch

    if not items:
        raise ConfigError("collate_text needs at least one item")
    longest = max(int(item["input_ids"].shape[0]) for item in items)
    ids, masks = [], []
    for item in items:
        row = item["input_ids"].to(torch.long)
        pad = longest - row.shape[0]
        ids.append(torch.cat([torch.full((pad,), PAD_ID, dtype=torch.long), row]))
        masks.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(row.shape[0], dtype=torch.long)]))
    return {"input_ids": torch.stack(ids), "attention_mask": torch.stack(masks)}


def sequence_inputs(mask: Any, image_tokens: int) -> tuple[Any, Any]:
    """The transformer's `attention_mask` (B x S x S) and `position_ids` (B x S) for text with 0/1 `mask` (B x L,
    left-padded) followed by the time token and `image_tokens` image patches: `OmniGenCollator.create_mask` and
    `create_position` with every output image the same size."""
    from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator

    collator = OmniGenCollator(pad_token_id=PAD_ID)
    sizes = [image_tokens] * mask.shape[0]
    positions = collator.create_position(mask.cpu(), sizes)
    attention, _ = collator.create_mask(mask.cpu(), sizes)
    return attention, positions


def predict(
    transformer: Any, latents: Any, timesteps: Any, text: dict[str, Any], meta: Any = None, guidance: Any = None
) -> Any:
    """`OmniGenPipeline`'s denoiser call for a text-only prompt: token ids, OmniGen's mask and positions, reversed
    time t = 1 - sigma (timesteps / 1000 = sigma), the output negated (OmniGen predicts image - noise)."""
    patch = transformer.config.patch_size
    tokens = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
    attention, positions = sequence_inputs(text["attention_mask"], tokens)
    out = transformer(
        hidden_states=latents,
        timestep=1 - timesteps.to(latents.dtype) / 1000,
        input_ids=text["input_ids"],
        input_img_latents=[],
        input_image_sizes={},
        attention_mask=attention.to(latents.device),
        position_ids=positions.to(latents.device),
        return_dict=False,
    )[0]
    return -out


def flow_sigmas(normal: Any) -> Any:
    """SimpleTuner's OmniGen draw: t = sigmoid(normal), no shift; st's sigma is 1 - t."""
    import torch

    return 1 - torch.sigmoid(normal)


def _pil_processor_class() -> type:
    """`OmniGenMultiModalProcessor` with its torchvision image transform written with PIL and numpy."""
    from diffusers.pipelines.omnigen import processor_omnigen

    class PilProcessor(processor_omnigen.OmniGenMultiModalProcessor):
        """OmniGen's processor without torchvision: `crop_image`, then HWC uint8 -> CHW float in [0, 1] (ToTensor),
        then (x - 0.5) / 0.5 (Normalize)."""

        def __init__(self, text_tokenizer: Any, max_image_size: int = 1024):
            self.text_tokenizer = text_tokenizer
            self.collator = processor_omnigen.OmniGenCollator()
            self.reset_max_image_size(max_image_size)

        def reset_max_image_size(self, max_image_size: int) -> None:
            self.max_image_size = max_image_size
            self.image_transform = lambda image: pil_transform(image, max_image_size)

    return PilProcessor


def pil_transform(image: Any, max_image_size: int) -> Any:
    """The processor's image transform without torchvision: crop_image, ToTensor, Normalize(0.5, 0.5)."""
    import numpy as np
    import torch
    from diffusers.pipelines.omnigen.processor_omnigen import crop_image

    array = np.asarray(crop_image(image.convert("RGB"), max_image_size), dtype=np.float32) / 255.0
    return (torch.from_numpy(array).permute(2, 0, 1).contiguous() - 0.5) / 0.5


def pipeline_setup(pipeline_class: type) -> None:
    """Give diffusers' OmniGen pipeline module a processor when torchvision is missing (see the module docstring)."""
    import sys

    module = sys.modules[pipeline_class.__module__]
    if not hasattr(module, "OmniGenMultiModalProcessor"):
        module.OmniGenMultiModalProcessor = _pil_processor_class()


def tokenizer() -> Any:
    """A Phi-3 style `LlamaTokenizer` (byte-fallback BPE, a leading beginning-of-sequence token, Phi-3's chat
    markers as special tokens) over the tiny vocab."""
    from transformers import LlamaTokenizer

    from pipeline.families.tokenizers import gemma_vocab

    vocab, merges = gemma_vocab()
    words = LlamaTokenizer(vocab=dict(vocab), merges=[tuple(line.split(" ")) for line in merges], unk_token="<unk>",
                           bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", add_bos_token=True,
                           add_eos_token=False, padding_side="left", model_max_length=MAX_LENGTH)  # fmt: skip
    words.add_special_tokens({"additional_special_tokens": list(PHI3_SPECIALS)})
    return words


def tiny(out_dir: Path, seed: int) -> None:
    """Write a tiny OmniGen diffusers folder: a one-layer transformer over the tokenizer's vocab, a 4-channel VAE
    with SDXL's 0.13025 and the real 8x reduction the pipeline assumes, OmniGen's scheduler (invert_sigmas,
    num_train_timesteps 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, OmniGenTransformer2DModel

    from pipeline.families import get_family

    words = tokenizer()
    tiny_parts.seed_everything(seed)
    transformer = OmniGenTransformer2DModel(
        in_channels=4, patch_size=2, hidden_size=32, rms_norm_eps=1e-5, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, num_layers=2, pad_token_id=PAD_ID, vocab_size=len(words), max_position_embeddings=4096,
        original_max_position_embeddings=4096, rope_base=10000,
        rope_scaling={"long_factor": [1.0, 1.5, 2.0, 2.5], "short_factor": [1.0, 1.0, 1.0, 1.0]},
        pos_embed_max_size=64, time_step_dim=32,
    ).eval()  # fmt: skip
    tiny_parts.seed_everything(seed + 1)
    vae = tiny_parts.vae(4, 0.13025, block_out_channels=(16, 32, 32, 32))
    scheduler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True, num_train_timesteps=1)
    pipeline_class = get_family("omnigen").load_pipeline_class()
    pipe = pipeline_class(transformer=transformer, scheduler=scheduler, vae=vae, tokenizer=words)
    tiny_parts.save(pipe, out_dir)


def latent_side_limit(config: Any) -> tuple[int, str]:
    """The patch embedding's position table covers `pos_embed_max_size` patches per side."""
    size, patch = config["pos_embed_max_size"], config["patch_size"]
    return size * patch, f"pos_embed_max_size {size} x patch_size {patch}"


# SimpleTuner's OmniGen flavours (models/omnigen/model.py HUGGINGFACE_PATHS); its default is "v1".
FLAVOURS = (Flavour("v1", "Shitao/OmniGen-v1-diffusers"),)

FAMILY = Family(
    name="omnigen",
    pipeline_class="OmniGenPipeline",
    denoiser=Component("transformer", "OmniGenTransformer2DModel", "diffusers"),
    vae=Component("vae", "AutoencoderKL", "diffusers"),
    text_encoders=TEXT_ENCODERS,
    scheduler=Component("scheduler", "FlowMatchEulerDiscreteScheduler", "diffusers"),
    latent_channels=4,
    bucket_alignment=16,  # the VAE's 8x and the 2x2 patches (the pipeline's image processor uses 16)
    prediction_type="flow_matching",
    lora_targets=LORA_TARGETS,
    tiny=tiny,
    encode_prompts=encode_prompts,
    collate_text=collate,
    predict=predict,
    single_file=False,
    lora_loader=False,  # OmniGenPipeline has no load_lora_weights: LoRAs load into its transformer through peft
    flavours=FLAVOURS,
    default_flavour="v1",
    flow_sigmas=flow_sigmas,
    pipeline_setup=pipeline_setup,
    prompt_text=True,
    latent_side_limit=latent_side_limit,
)

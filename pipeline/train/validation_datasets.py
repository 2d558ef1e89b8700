"""`validation_using_datasets`: validation renders img2img from dataset images with their captions, as SimpleTuner.

SimpleTuner (helpers/training/validation.py `retrieve_validation_images`, multiaspect/sampler.py
`retrieve_validation_set`) takes, from each image dataset in list order that is not `disable_validation: true` (and,
with `eval_dataset_id`, only the named ones), the first `num_eval_images` images by path; each is named
`<dataset id>_<n>` and rendered with its caption, and these inputs replace the validation prompts (no
validation_prompt, prompt library or unconditional render). Its pipeline is the family's img2img pipeline with the
training-prepared image (resized and cropped as training sees it) scaled to the validation size's area at its own
aspect ratio, denoised at strength 0.2 (`validation_strength`, which no option sets).

st reads the same images from the dataset files the cache was built from (the prepare plan's resize and crop, stored
in each cached sample's metadata, the file checked against its content hash) and the caption embeddings `st cache`
stored for them, so no text encoder loads. Families without an img2img pipeline in st, and the modes whose
validation inputs come from conditioning datasets (controlnet, control, Flux Kontext and other reference families,
Wan i2v / VACE, DeepFloyd stage II), are refused by name.

DEVIATION: a sample with several captions renders with its first (SimpleTuner picks one at random).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ..config import normalise_key
from ..errors import ConfigError, InputError
from ..families import Family, sdxl
from ..log import get_logger
from ..prompts import ValidationPrompt

log = get_logger("train")

# The img2img pipeline of each family pipeline SimpleTuner registers one for (PipelineTypes.IMG2IMG) and st renders.
IMG2IMG = {"StableDiffusionPipeline": "StableDiffusionImg2ImgPipeline",
           "StableDiffusionXLPipeline": "StableDiffusionXLImg2ImgPipeline",
           "StableDiffusion3Pipeline": "StableDiffusion3Img2ImgPipeline"}  # fmt: skip
# SimpleTuner's Sana uses SanaImg2ImgPipeline, which the installed diffusers lacks; its PixArt, AuraFlow and FLUX.2
# register their text-to-image pipeline as IMG2IMG (no partial denoising): st refuses those families. Kolors: the
# installed KolorsImg2ImgPipeline drops `pooled_prompt_embeds` (it cannot render from cached embeddings); the SDXL
# refiner: st renders it from an empty latent (README); both refused.
STRENGTH = 0.2  # SimpleTuner: getattr(config, "validation_strength", 0.2); no option sets it
ALIGNMENT = 16  # the multiple validation sizes round to (validation.parse_resolutions)


@dataclasses.dataclass(frozen=True)
class DatasetPrompt(ValidationPrompt):
    """A validation input from a dataset: its caption (`text`), name `<dataset>_<n>`, the training-prepared image and
    the cached caption embeddings."""

    image: Any = dataclasses.field(default=None, compare=False, repr=False)
    embeds: Any = dataclasses.field(default=None, compare=False, repr=False)


def check(config, family: Family) -> None:
    """ConfigError for a family or mode whose dataset validation st does not render."""
    name = "validation_using_datasets"
    if config.controlnet or config.control:
        raise ConfigError(f"{name} with {'controlnet' if config.controlnet else 'control'}: validation already renders "
                          "from the conditioning images; remove validation_using_datasets")  # fmt: skip
    if family.name == "flux" and config.model_flavour == "kontext":
        raise ConfigError(f"{name}: Flux Kontext validates through its paired reference images (SimpleTuner turns "
                          "the option off for it); remove it and pick the edit dataset with eval_dataset_id")
    if family.video or family.takes_reference or family.validation_input is not None:
        raise ConfigError(f"{name}: model_family {family.name} validates from its conditioning (reference, first "
                          "frame or stage II input) datasets; st renders dataset images img2img for "
                          f"{', '.join(families_supported())} only: remove the option")  # fmt: skip
    if family.pipeline_class == sdxl.REFINER_PIPELINE:
        raise ConfigError(f"{name}: st validates the SDXL refiner from an empty latent image over the whole schedule, "
                          "not from dataset images at strength 0.2: remove the option")  # fmt: skip
    if family.pipeline_class not in IMG2IMG:
        raise ConfigError(f"{name}: model_family {family.name} has no img2img validation pipeline in st (it "
                          f"renders dataset images for {', '.join(families_supported())}): remove the option")
    if int(config.validation_num_inference_steps * STRENGTH) < 1:
        raise ConfigError(f"{name} denoises the last {STRENGTH:.0%} of the schedule: validation_num_inference_steps "
                          f"{config.validation_num_inference_steps} gives no step; set it to at least "
                          f"{math.ceil(1 / STRENGTH)}")  # fmt: skip


def families_supported() -> list[str]:
    from ..families import FAMILIES

    return sorted(n for n, f in FAMILIES.items() if f.pipeline_class in IMG2IMG and not f.takes_reference)


def _disabled(loaded) -> set[str]:
    """The ids of the dataset-list entries with `disable_validation: true`."""
    from ..datasets import read_dataset_list

    entries = read_dataset_list(loaded.resolve_path(loaded.config.data_backend_config).resolve())
    found = set()
    for entry in entries:
        keys = {normalise_key(str(k)): v for k, v in entry.items()}
        if keys.get("disable_validation") in (True, "true", "True"):
            found.add(str(keys.get("id")))
    return found


def collect(loaded, family: Family, cache_root: Path, manifest: dict[str, Any],
            shared: dict[str, Any]) -> list[DatasetPrompt]:  # fmt: skip
    """The validation inputs: per image dataset in list order, not disabled and (with eval_dataset_id) named, its
    first `num_eval_images` cached samples by path, each with its image as training saw it and its first caption's
    cached embeddings. InputError when none is left, or a file changed since `st prepare`."""
    from ..source_pixels import ImageJob, SourceProblem, load_pixels
    from ..datasets import load_datasets
    from .data import CacheIndex, SampleReader

    config = loaded.config
    check(config, family)
    specs = [s for s in load_datasets(loaded) if s.dataset_type == "image"]
    wanted = config.eval_dataset_id
    wanted = None if wanted in (None, "", []) else ({wanted} if isinstance(wanted, str) else set(map(str, wanted)))
    if wanted and not wanted <= {s.id for s in specs}:
        raise ConfigError(f"eval_dataset_id {sorted(wanted - {s.id for s in specs})} names no image dataset of "
                          f"{config.data_backend_config}; validation_using_datasets takes its images from image "
                          f"datasets: {', '.join(s.id for s in specs)}")  # fmt: skip
    disabled = _disabled(loaded)
    index = CacheIndex(cache_root, manifest)
    by_dataset: dict[str, list[Any]] = {}
    for ref in index.samples.values():
        by_dataset.setdefault(ref.dataset_id, []).append(ref)
    reader = SampleReader()
    prompts: list[DatasetPrompt] = []
    try:
        for spec in specs:
            if spec.id in disabled or (wanted and spec.id not in wanted):
                log.info("validation_using_datasets: not collecting images from dataset '%s'", spec.id)
                continue
            if spec.source is not None:
                raise ConfigError(f"validation_using_datasets: dataset '{spec.id}' is remote; st reads "
                                  "validation images from local dataset folders only: set disable_validation: "
                                  "true on it")  # fmt: skip
            refs = sorted(by_dataset.get(spec.id, []), key=lambda r: (r.meta["path"], r.key))
            for n, ref in enumerate(refs[: config.num_eval_images]):
                meta = ref.meta
                width, height = meta["target_size"]
                left, top = meta["crop_top_left"][1], meta["crop_top_left"][0]
                job = ImageJob(meta["sample_id"], str(spec.root / meta["path"]), tuple(meta["intermediate_size"]),
                               (left, top, left + width, top + height))  # fmt: skip
                try:
                    pixels = load_pixels(job)
                except SourceProblem as exc:
                    raise InputError(f"validation_using_datasets: {job.path} {exc.detail}; re-run `st prepare` and "
                                     "`st cache`") from None  # fmt: skip
                sample = reader.sample(ref)
                kind, _, value = meta["text"][0].partition(":")
                embeds = sample.captions[0] if kind == "sample" else shared[value]
                prompts.append(DatasetPrompt(f"{spec.id}_{n}", meta["captions"][0], image=_pil(pixels), embeds=embeds))
    finally:
        reader.close()
    if not prompts:
        raise InputError("validation_using_datasets found no cached image to validate from: every image dataset is "
                         "disable_validation, not named by eval_dataset_id, or empty")  # fmt: skip
    log.info("validation_using_datasets: %d dataset image(s) replace the validation prompts", len(prompts))
    return prompts


def _pil(pixels: Any) -> Any:
    from PIL import Image

    return Image.fromarray(((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def input_size(image: Any, width: int, height: int) -> tuple[int, int]:
    """The render size of a dataset image for validation size WxH: that area at the image's aspect ratio, each edge a
    multiple of 16 (SimpleTuner: MultiaspectImage.calculate_new_size_by_pixel_area at the validation megapixels).
    DEVIATION: SimpleTuner rounds with its bucket rules; st rounds each edge to the nearest multiple of 16."""
    aspect = image.width / image.height
    w = math.sqrt(width * height * aspect)
    return (max(ALIGNMENT, round(w / ALIGNMENT) * ALIGNMENT),
            max(ALIGNMENT, round(w / aspect / ALIGNMENT) * ALIGNMENT))  # fmt: skip

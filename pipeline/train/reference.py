"""Families that take a reference image (`Family.takes_reference`, e.g. Flux Kontext): what their runs need.

The reference is a sample's conditioning image (a `conditioning` dataset of type reference_strict, reference_loose or
controlnet, or a generated one), cached as VAE latents beside the target (`Batch.control_latents`). Validation renders
through the family's pipeline with the first cached samples' conditioning images as its `image`.
"""

from __future__ import annotations

from typing import Any

from ..cache_reader import COND
from ..datasets import MASK_TYPES
from ..errors import ConfigError, InputError, NotSupportedError
from ..families import Family, flux2, flux_control, wan_i2v, wan_vace
from ..log import get_logger
from .controlnet import ValidationControl, read_conditioning
from .data import image_paired_datasets

log = get_logger("train")

IMAGE_ARGUMENT = "image"  # the edit pipelines' keyword for the reference image
# Pipelines that name it otherwise: FluxControlPipeline's control image (`control: true`).
ARGUMENTS = {flux_control.PIPELINE_CLASS: flux_control.CONTROL_ARGUMENT}
# Families that SimpleTuner trains on reference images whenever their datasets are paired (FLUX.2's optional image
# conditioning): the family such a run trains.
WHEN_PAIRED = {flux2.FAMILY.pipeline_class: flux2.REFERENCE_FAMILY,
               flux2.DEV_FAMILY.pipeline_class: flux2.DEV_REFERENCE_FAMILY}  # by pipeline: FLUX.2 [klein] and [dev]
# What the pairs are, and the conditioning_type of their dataset, in the refusal of a cache without them.
PAIRS = {None: "(reference image, edited image)", flux_control.PIPELINE_CLASS: "(control image, image)"}
CONDITIONING_TYPES = {None: ', `"conditioning_type": "reference_strict"`', flux_control.PIPELINE_CLASS: ""}


def for_pairs(family: Family, cache_manifest: dict[str, Any], *, controlnet: bool) -> Family:
    """The family a run trains on this cache: a family's reference-image variant (`WHEN_PAIRED`) when the cache
    pairs its samples with conditioning images (not masks) and no ControlNet trains on them, else `family`."""
    variant = WHEN_PAIRED.get(family.pipeline_class)
    if variant is None or family.takes_reference or controlnet or not image_paired_datasets(cache_manifest)[0]:
        return family
    log.info("%s trains on the datasets' conditioning images as reference images (%s `image`)", family.name,
             family.pipeline_class)  # fmt: skip
    return variant


def note_unused(family: Family, cache_manifest: dict[str, Any], *, controlnet: bool) -> None:
    """One warning when the cache pairs training samples with conditioning images (not masks) that this run does not
    use: only a ControlNet or a reference-image model trains with them, so a plain run is likely a missed option."""
    if controlnet or family.takes_reference or family.pipeline_class == wan_vace.PIPELINE_CLASS:
        return
    paired, _ = image_paired_datasets(cache_manifest)
    if paired:
        log.warning("dataset(s) %s are paired with conditioning images, which only `controlnet: true` or an edit "
                    "model (model_flavour kontext) trains with; this run trains %s without them",
                    ", ".join(paired), family.name)  # fmt: skip


# Families SimpleTuner trains on paired conditioning images in a way st does not implement yet: pipeline -> feature.
PAIRED_NOT_YET = {"OmniGenPipeline": "OmniGen's instruction / reference-image training (conditioning images as "
                                     "<img><|image_1|></img> inputs of the prompt)",
                  # VACE trains on the control clips of video datasets (pipeline.families.wan_vace); conditioning
                  # images of image datasets are refused here.
                  wan_vace.PIPELINE_CLASS: "Wan VACE control training on image datasets (st trains VACE on the "
                                           "conditioning clips of video datasets as WanVACEPipeline's `video`)"}


def check(family: Family, cache_manifest: dict[str, Any], *, controlnet: bool = False) -> None:
    """Refuse, before the model loads, a run of a reference family whose training datasets link no image (non-mask)
    conditioning dataset, or that asks for a ControlNet (its conditioning images are the references); and a run of
    a `PAIRED_NOT_YET` family whose datasets link conditioning images."""
    feature = PAIRED_NOT_YET.get(family.pipeline_class)
    paired_datasets = image_paired_datasets(cache_manifest)[0] if feature else []
    if family.pipeline_class == wan_vace.PIPELINE_CLASS:  # its video datasets' control clips train
        clips = {d["id"] for d in cache_manifest.get("datasets", []) if d.get("dataset_type") == "video"}
        paired_datasets = [d for d in paired_datasets if d not in clips]
    if paired_datasets:
        raise NotSupportedError(f"dataset(s) {', '.join(paired_datasets)} link conditioning images, and st does not "
                                f"implement {feature} yet; remove their conditioning_data to train {family.name} on "
                                f"text-to-{'video' if family.video else 'image'}")  # fmt: skip
    if not family.takes_reference:
        return
    if controlnet:
        raise NotSupportedError(f"controlnet: true with {family.pipeline_class} (a reference-image model) is not "
                                "supported; set controlnet to false to train the model on its reference images")  # fmt: skip
    if family.pipeline_class == wan_i2v.PIPELINE_CLASS:  # each clip's first frame is its reference, cached with it
        images = [d["id"] for d in cache_manifest.get("datasets", []) if d.get("dataset_type", "image") == "image"]
        if images:
            raise ConfigError(f"{family.pipeline_class} trains on video clips conditioned on their first frame, and "
                              f"dataset(s) {', '.join(images)} hold images: remove them from the dataset list or mark "
                              'them `"dataset_type": "eval"`, then re-run `st prepare` and `st cache`')  # fmt: skip
        return
    paired, unpaired = image_paired_datasets(cache_manifest)
    if paired and not unpaired:
        return
    which = f"dataset(s) {', '.join(unpaired)} have none (only masks, or no conditioning_data)" if unpaired else \
        "this cache has none"  # fmt: skip
    raise ConfigError(
        f"{family.pipeline_class} trains on {PAIRS.get(family.pipeline_class, PAIRS[None])} pairs and {which}: add "
        '`"conditioning_data": "<id>"` to each image dataset of the dataset list, with a '
        f'`"dataset_type": "conditioning"`{CONDITIONING_TYPES.get(family.pipeline_class, CONDITIONING_TYPES[None])} '
        'dataset of that id holding those images (same relative paths as the targets), or mark the others '
        '`"dataset_type": "eval"`; then re-run `st prepare` and `st cache`'
    )


def latents(family: Family, batch: Any) -> Any:
    """The reference latents of a reference family's forward pass (None for other families): the batch's (training
    batches, and the evaluation loss's one-sample batches, carry them)."""
    if not family.takes_reference:
        return None
    found = None if batch is None else batch.control_latents
    if found is None:
        raise InputError(f"a {family.pipeline_class} batch (dataset {getattr(batch, 'dataset_id', '?')!r}) has no "
                         "reference image latents: every dataset it trains on needs conditioning_data; re-run "
                         "`st prepare` and `st cache` after linking one")  # fmt: skip
    if family.pipeline_class == wan_i2v.PIPELINE_CLASS:  # a first-frame cache on a first/last-frame run, or the reverse
        wan_i2v.check_condition_frames(family, batch)
    return found


def validation_control(family: Family, denoiser: Any, index: Any, count: int) -> ValidationControl | None:
    """What validation renders with for a reference family (None for others): the family's pipeline on the live
    `denoiser`, prompt i with the reference image of the i-th cached sample that has one (modulo their number).
    A family with `validation_input` (DeepFloyd IF stage II) renders from the i-th cached training image (the cache
    holds pixels), made into its input image by that hook; one with `validation_extras` (Wan FLF2V's `last_image`)
    also gets those inputs of each sample."""
    if family.validation_input is not None:
        return _training_image_inputs(family, denoiser, index, count)
    if family.pipeline_class == wan_vace.PIPELINE_CLASS:
        return _control_clips(denoiser, index, count)
    if not family.takes_reference:
        return None
    from PIL import Image

    from .data import SampleReader

    reader = SampleReader()
    images: list[Any] = []
    extras: dict[str, list[Any]] = {}  # the pipeline's other inputs (FLF2V: each clip's cached last frame)
    try:
        for key in sorted(index.samples):
            ref = index.samples[key]
            kinds = [c.get("kind") for c in ref.meta.get("conditioning") or ()]
            if COND not in ref.members or all(kind in MASK_TYPES for kind in kinds):
                continue
            pixels, _ = read_conditioning(reader, ref)
            images.append(Image.fromarray(((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()))
            if family.validation_extras is not None:
                for name, image in family.validation_extras(family, reader.tensors(ref, COND), ref.key).items():
                    extras.setdefault(name, []).append(image)
            if len(images) >= max(1, count):
                break
    finally:
        reader.close()
    if not images:
        raise InputError(f"{family.pipeline_class} validation needs a cached reference image and the cache has none; "
                         "re-run `st cache` after linking conditioning_data")  # fmt: skip
    return ValidationControl(family.pipeline_class, denoiser, None, ARGUMENTS.get(family.pipeline_class, IMAGE_ARGUMENT),
                             images, extras)  # fmt: skip


def _training_image_inputs(family: Family, denoiser: Any, index: Any, count: int) -> ValidationControl:
    """The validation inputs of a family with `validation_input`: the first `count` cached training images (sorted by
    key), each passed through it (DeepFloyd IF stage II: resized to a 64-pixel short edge, as SimpleTuner's stage II
    validation takes dataset images; SimpleTuner's prompt validation instead renders them with a separate stage I
    model, which st does not load)."""
    from PIL import Image

    from .data import SampleReader

    reader = SampleReader()
    images = []
    try:
        for key in sorted(index.samples)[: max(1, count)]:
            pixels = reader.latent(index.samples[key])  # a pixel-space cache: the image itself, in [-1, 1]
            image = Image.fromarray(((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
            images.append(family.validation_input(image))
    finally:
        reader.close()
    if not images:
        raise InputError(f"{family.pipeline_class} validation renders from a cached training image and the cache has "
                         "none; re-run `st cache`")  # fmt: skip
    return ValidationControl(family.pipeline_class, denoiser, None, IMAGE_ARGUMENT, images)


def _control_clips(denoiser: Any, index: Any, count: int) -> ValidationControl | None:
    """Wan VACE: WanVACEPipeline's `video` for prompt i, the i-th cached control clip (sorted by key, modulo their
    number; the clip's frames as cached, uint8 at its training size), with its cached mask clip as `mask` and its
    cached reference image (the pipeline's letterbox of it at the clip's size) as `reference_images` when the clips
    have them; clips with a reference image and no control clip give `reference_images` alone. None when the cache
    holds none (the run renders the prompts alone, as it trains unpaired clips)."""
    from .data import SampleReader

    reader = SampleReader()
    clips: list[Any] = []
    masks: list[Any] = []
    references: list[Any] = []
    try:
        for key in sorted(index.samples):
            ref = index.samples[key]
            kinds = [c.get("kind") for c in ref.meta.get("conditioning") or ()]
            found = [k for k in kinds if k in wan_vace.REFERENCE_KINDS]
            if COND not in ref.members or (wan_vace.CONTROL_KIND not in kinds and not found):
                continue
            if clips and (wan_vace.CONTROL_KIND in kinds) != bool(clips[0]):
                continue  # the first cached clip's kind of conditioning (control clip or reference alone) renders
            stored = reader.tensors(ref, COND)
            clips.append(wan_vace.frames_of(stored[f"{kinds.index(wan_vace.CONTROL_KIND)}.pixels"])
                         if wan_vace.CONTROL_KIND in kinds else [])  # fmt: skip
            if wan_vace.MASK_KIND in kinds:
                masks.append(wan_vace.frames_of(stored[f"{kinds.index(wan_vace.MASK_KIND)}.pixels"]))
            if found:
                references.append(wan_vace.frames_of(stored[f"{kinds.index(found[0])}.pixels"][:, None]))
            if len(clips) >= max(1, count):
                break
    finally:
        reader.close()
    if not clips:
        return None
    if not clips[0]:  # reference images alone (the zero control): one image each, rendered (and saved) as images
        return ValidationControl(wan_vace.PIPELINE_CLASS, denoiser, None, wan_vace.REFERENCE_ARGUMENT,
                                 [images[0] for images in references], {})  # fmt: skip
    extra = {wan_vace.MASK_ARGUMENT: masks} if len(masks) == len(clips) else {}
    if len(references) == len(clips):
        extra[wan_vace.REFERENCE_ARGUMENT] = references
    return ValidationControl(wan_vace.PIPELINE_CLASS, denoiser, None, wan_vace.VIDEO_ARGUMENT, clips, extra)

"""Validation images: the family's diffusers pipeline with the weights being trained, prompts from the cache.

Prompt embeddings come from the cache's shared embeddings (st cache stores `validation_prompt`,
`validation_negative_prompt`, the prompts of `user_prompt_library` and the empty prompt), so no text encoder is loaded
while training; with train_text_encoder the encoders being trained embed the prompts' cached token ids. Images are seeded (`validation_seed`, else `seed`) and saved as PNGs plus one grid per step.
With `validation_randomize` each validation draws its own seed from `seed` and its label (`render_seed`), logged with
it; `validation_seed_source` gpu makes the generator on the training device (the CPU on a machine without one).
`inference_scheduler_timestep_spacing` sets the validation scheduler's timestep spacing (`timestep_spacing`), and
`unet_attention_slice` renders with diffusers' sliced attention (`attention_sliced_modules`).
Video families (Wan, LTX-Video) render `validation_num_video_frames` frames per prompt, saved as an MP4 and a frame
grid PNG (`validation_video`).

With `validation_using_datasets` the prompts are dataset images with their captions (`validation_datasets`), rendered
through the family's img2img pipeline at strength 0.2, each input saved beside its render (`<name>-WxH-input.png`).

Qwen-Image-Edit (`Family.text_with_reference`) renders with its Qwen2.5-VL and processor loaded: the pipeline encodes
each prompt, and the negative prompt, together with the reference image it edits, as it does for a user.
The SDXL refiner renders through StableDiffusionXLImg2ImgPipeline from an empty latent image over the whole schedule
(strength 1.0: the refiner's own text-to-image render), with `data_aesthetic_score` as its aesthetic score. With
`flux_attention_masked_training`, the Flux pipelines render with the prompt's T5 mask added to every joint
attention, over the whole sequence each transformer call gets (image, and Kontext's reference, tokens), as training
adds it.

Flux's `validation_guidance_real` > 1 renders with true classifier-free guidance against the cached negative prompt
(FluxPipeline's `true_cfg_scale`: uncond + scale * (cond - uncond), at the same embedded guidance), skipped for the
first `validation_no_cfg_until_timestep` steps as in SimpleTuner's Flux pipeline (step i uses it when
i >= validation_no_cfg_until_timestep). The fluxbooru and libreflux flavours validate as SimpleTuner forces them: true
CFG 6.0 unless set above 1, at least 28 steps (`real_cfg`).

SD3's `validation_guidance_skip_layers` renders with skip-layer guidance, as SimpleTuner does:
StableDiffusion3Pipeline's `skip_guidance_layers`, `skip_layer_guidance_start` / `_stop` / `_scale` from
`validation_guidance_skip_layers_start`, `_stop` and `validation_guidance_skip_scale` (`skip_layer_guidance`). The
pipeline applies it only with classifier-free guidance (validation_guidance > 1), on the steps i with
start < i / steps < stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import itertools
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError
from ..families import Family, flux, load_components, sdxl
from ..log import get_logger
from ..video_settings import family_framerate
from . import validation_adapters, validation_datasets, validation_video
from .family_options import FamilyText
from .offload import model_cpu_offload, note_model_cpu_offload, stream_vae
from .options import ValidationOptions

log = get_logger("train")

SCHEDULERS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler", "unipc": "UniPCMultistepScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}  # fmt: skip


# SimpleTuner's Flux flavours that validate with true CFG (models/flux/model.py forces these settings on).
REAL_CFG_FLAVOURS = ("fluxbooru", "libreflux")
FLAVOUR_REAL_CFG, FLAVOUR_MIN_STEPS = 6.0, 28


def real_cfg(family: Family, options: ValidationOptions) -> tuple[ValidationOptions, float | None]:
    """The validation options as rendered and the true CFG scale (None: off). ConfigError for true CFG, or a
    CFG-skip count, asked of a family other than Flux."""
    scale = float(options.validation_guidance_real)
    if family.name != "flux":
        if scale > 1.0 or options.validation_no_cfg_until_timestep != 2:
            raise ConfigError(f"validation_guidance_real / validation_no_cfg_until_timestep (true classifier-free "
                              f"guidance in validation) are implemented for model_family flux only, not "
                              f"{family.name}: leave them at 1.0 / 2")  # fmt: skip
        return options, None
    if options.model_flavour in REAL_CFG_FLAVOURS:
        if scale <= 1.0:
            log.warning("model_flavour %s validates with true CFG: validation_guidance_real %s (as SimpleTuner)",
                        options.model_flavour, FLAVOUR_REAL_CFG)  # fmt: skip
            scale = FLAVOUR_REAL_CFG
        if options.validation_num_inference_steps < FLAVOUR_MIN_STEPS:
            log.warning("model_flavour %s validates with at least %d steps: validation_num_inference_steps %d (as "
                        "SimpleTuner)", options.model_flavour, FLAVOUR_MIN_STEPS, FLAVOUR_MIN_STEPS)  # fmt: skip
            options = dataclasses.replace(options, validation_num_inference_steps=FLAVOUR_MIN_STEPS)
    return options, (scale if scale > 1.0 else None)


def skip_layer_guidance(family: Family, options: ValidationOptions) -> dict[str, Any]:
    """StableDiffusion3Pipeline's skip-layer guidance arguments ({}: off), as SimpleTuner passes them. ConfigError
    for a family other than SD3 (the config check refuses it first; see config._check_skip_layer_guidance)."""
    from ..config import OPTION_FIELDS, SKIP_LAYER_OPTIONS

    if family.name != "sd3":
        if any(getattr(options, key) != OPTION_FIELDS[key].default for key in SKIP_LAYER_OPTIONS):
            raise ConfigError(f"validation_guidance_skip_layers (skip-layer guidance in validation) is implemented "
                              f"for model_family sd3 only, not {family.name}: remove it")  # fmt: skip
        return {}
    if options.validation_guidance_skip_layers is None:
        return {}
    if options.validation_guidance <= 1.0:
        log.warning("validation_guidance_skip_layers has no effect with validation_guidance %s: "
                    "StableDiffusion3Pipeline applies skip-layer guidance only with classifier-free guidance (> 1)",
                    options.validation_guidance)  # fmt: skip
    return {"skip_guidance_layers": [int(n) for n in options.validation_guidance_skip_layers],
            "skip_layer_guidance_start": float(options.validation_guidance_skip_layers_start),
            "skip_layer_guidance_stop": float(options.validation_guidance_skip_layers_stop),
            "skip_layer_guidance_scale": float(options.validation_guidance_skip_scale)}  # fmt: skip


def render_seed(options: ValidationOptions, label: str) -> int:
    """The seed of a validation's generators: `validation_seed` (else `seed`, else 0); with validation_randomize a new
    one per validation, drawn from `seed` and the validation's label (step-N, base, ...), so runs with the same seed
    render the same images and a resumed run draws what an uninterrupted one does. An EMA twin (`<label>-ema`) uses
    its label's seed, so the comparison differs only in weights.

    DEVIATION: SimpleTuner's validation_randomize passes the pipeline no generator, which then draws from torch's
    global generator: a seed that depends on all that ran before (and a resume), and that no log records."""
    if not options.validation_randomize:
        return options.validation_seed if options.validation_seed is not None else (options.seed or 0)
    name = label.removesuffix("-ema")
    digest = hashlib.sha256(f"st.validation_randomize/{options.seed or 0}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def startup_label(step: int) -> str:
    """validation_on_startup's label: step-0 before a fresh run, step-N-startup before a run resumed at step N (so the
    validation the earlier run rendered at step N stays as it was)."""
    return f"step-{step}" if step == 0 else f"step-{step}-startup"


def timestep_spacing(scheduler: Any, spacing: str, family: Family) -> Any:
    """The validation scheduler with `inference_scheduler_timestep_spacing`, as SimpleTuner passes it to every
    validation scheduler it builds (its default, trailing, too). A scheduler without that setting (flow matching:
    FlowMatchEulerDiscreteScheduler, or sigmas from the flow schedule, where diffusers ignores the spacing) keeps its
    schedule: SimpleTuner ignores the value there, st refuses a value other than the default."""
    from ..config import OPTION_FIELDS

    config = scheduler.config
    if "timestep_spacing" not in config or config.get("use_flow_sigmas"):
        if spacing != OPTION_FIELDS["inference_scheduler_timestep_spacing"].default:
            raise ConfigError(f"inference_scheduler_timestep_spacing {spacing!r}: model_family {family.name} validates "
                              f"with {type(scheduler).__name__}, whose flow-matching schedule has no timestep "
                              f"spacing; remove the option")  # fmt: skip
        return scheduler
    if config["timestep_spacing"] == spacing:
        return scheduler
    return type(scheduler).from_config(config, timestep_spacing=spacing)


def attention_sliced_modules(denoiser: Any, control: Any, family: Family) -> list[Any]:
    """The modules unet_attention_slice slices while validating: the denoiser (and a ControlNet) when diffusers can
    slice their attention (UNet families: sd1x, sd2x, sdxl, kolors, deepfloyd). ConfigError for a denoiser that
    cannot (the transformer families; in SimpleTuner the option reaches no module there)."""
    modules = [denoiser, getattr(control, "controlnet", None)]
    modules = [m for m in modules if hasattr(m, "set_attention_slice") and hasattr(m, "set_attn_processor")]
    if denoiser not in modules:
        raise ConfigError(f"unet_attention_slice: model_family {family.name}'s {type(denoiser).__name__} has no "
                          f"sliced attention (diffusers slices UNet attention only); remove the option")  # fmt: skip
    return modules


def parse_resolutions(value: str, alignment: int = 16) -> list[tuple[int, int]]:
    """`validation_resolution`: "1024", "1024x768" or several separated by commas -> [(W, H)], rounded down to a
    multiple of 16 (what every family's VAE and patch size divide)."""
    sizes = []
    for part in (p.strip() for p in str(value).split(",") if p.strip()):
        match = re.fullmatch(r"(\d+)(?:x(\d+))?", part)
        if not match:
            raise ConfigError(f"validation_resolution {value!r}: {part!r} is not WxH or a number")
        width = int(match.group(1))
        height = int(match.group(2) or width)
        size = (max(alignment, width // alignment * alignment), max(alignment, height // alignment * alignment))
        if size not in sizes:
            sizes.append(size)
    return sizes


class Validator:
    """Builds the family pipeline around the live denoiser once, then renders prompts at each validation.

    `keep_vae_loaded`: the VAE stays on the accelerator between validations; otherwise it waits on the CPU and
    moves to the accelerator only while a validation renders (then the accelerator's cache is emptied), so training
    steps have its memory. On a CPU run both are the same.
    """

    def __init__(self, family: Family, options: ValidationOptions, *, source: str, vae_source: str | None, denoiser,
                 prompts, embeds: dict[str, dict[str, Any]], out_dir: Path, device,
                 text_encoders=None, model_cpu_offload: bool = False, control=None,
                 family_text: FamilyText | None = None, base_dir: Path | None = None) -> None:  # fmt: skip
        """`text_encoders`: the `text_encoders.TextEncoders` being trained (train_text_encoder), which then embed
        the prompts' cached token ids at each validation. `control`: a `controlnet.ValidationControl` (controlnet:
        true), whose ControlNet pipeline renders each prompt with a conditioning image, saved beside the render.
        `family_text`: the run's `FamilyText` (Flux's T5 mask, the refiner's aesthetic score). `base_dir`: where a
        relative validation_adapter_path is looked up after the working folder."""
        options, self.true_cfg = real_cfg(family, options)
        self.skip_layers = skip_layer_guidance(family, options)
        self.family, self.options, self.out_dir, self.device = family, options, out_dir, device
        self.family_text = family_text
        self.text_encoders = text_encoders
        self.model_cpu_offload = model_cpu_offload  # enable_model_cpu_offload (pipeline.train.offload)
        note_model_cpu_offload(device, model_cpu_offload)
        self.prompts = prompts
        self.embeds = embeds
        self.control = control
        self.denoiser = denoiser if control is None else control.denoiser
        self.sliced = attention_sliced_modules(self.denoiser, control, family) if options.unet_attention_slice else []
        layers = getattr(getattr(self.denoiser, "config", None), "num_layers", None)
        if self.skip_layers and isinstance(layers, int) and max(self.skip_layers["skip_guidance_layers"]) >= layers:
            raise ConfigError(f"validation_guidance_skip_layers {self.skip_layers['skip_guidance_layers']} names a "
                              f"layer past the transformer's {layers} (0..{layers - 1})")  # fmt: skip
        parts = load_components(family, source, vae_source=vae_source, which=("vae", "scheduler"))
        pipeline_class = family.load_pipeline_class() if control is None else _diffusers_class(control.pipeline_class)
        # validation_using_datasets: the prompts are dataset images with their captions, rendered img2img
        self.from_datasets = any(isinstance(p, validation_datasets.DatasetPrompt) for p in prompts)
        if self.from_datasets:
            pipeline_class = _diffusers_class(validation_datasets.IMG2IMG[family.pipeline_class])
        scheduler = parts["scheduler"]
        if options.validation_noise_scheduler:
            import diffusers

            scheduler = getattr(diffusers, SCHEDULERS[options.validation_noise_scheduler]).from_config(scheduler.config)
        scheduler = timestep_spacing(scheduler, options.inference_scheduler_timestep_spacing, family)
        self.keep_vae = options.keep_vae_loaded
        stream_vae(parts["vae"], denoiser, device)  # ramtorch_vae: its mid blocks' Linear weights stay in host memory
        vae = parts["vae"].to(device if self.keep_vae else "cpu")
        components = {family.denoiser.subfolder: self.denoiser, "vae": vae, "scheduler": scheduler}
        if control is not None:
            components["controlnet"] = control.controlnet
        if family.validation_components is not None:  # Wan's CLIP or expert slots, DeepFloyd II's noising scheduler
            components.update(family.validation_components(family, source, self.denoiser,
                                                           options.wan_validation_load_other_stage, device))
        for spec in family.text_encoders:
            components[spec.model.subfolder] = None
            components[spec.tokenizer.subfolder] = None
        self.text_encoder = None
        if family.text_with_reference:  # Qwen-Image-Edit: the pipeline encodes each prompt with its reference image
            texts = load_components(family, source, which=("text_encoders",))
            for spec, encoder, tokenizer in zip(family.text_encoders, texts["text_encoders"], texts["tokenizers"],
                                                strict=True):  # fmt: skip
                self.text_encoder = encoder.eval().requires_grad_(False).to(device if self.keep_vae else "cpu",
                                                                             dtype=vae.dtype)  # the embeddings' dtype
                components[spec.model.subfolder], components[spec.tokenizer.subfolder] = self.text_encoder, tokenizer
            components["tokenizer"] = getattr(components.get("processor"), "tokenizer", None)
        if family.prompt_text:  # OmniGen: the pipeline tokenizes the prompt itself
            texts = load_components(family, source, which=("text_encoders",))
            for spec, tokenizer in zip(family.text_encoders, texts["tokenizers"], strict=True):
                components[spec.tokenizer.subfolder] = tokenizer
        self.refiner = family.pipeline_class == sdxl.REFINER_PIPELINE and control is None
        if self.refiner:
            components["requires_aesthetics_score"] = True  # its time ids hold the aesthetic score
        accepted = inspect.signature(pipeline_class.__init__).parameters
        components = {k: v for k, v in components.items() if k in accepted}
        for name, param in accepted.items():
            if name not in components and name != "self" and param.default is inspect.Parameter.empty:
                components[name] = None
        self.pipe = pipeline_class(**components)
        self.pipe.set_progress_bar_config(disable=True)
        self.call_params = set(inspect.signature(self.pipe.__call__).parameters)
        if self.skip_layers and "skip_guidance_layers" not in self.call_params:  # SD3's ControlNet pipeline
            raise ConfigError(f"validation_guidance_skip_layers: {type(self.pipe).__name__} has no skip-layer "
                              f"guidance; remove it for this run")  # fmt: skip
        self.sizes = parse_resolutions(options.validation_resolution)
        self.adapter_runs = validation_adapters.build_runs(options, base_dir)  # [BASE] without validation adapters
        if any(not run.is_base for run in self.adapter_runs) and not hasattr(self.pipe, "load_lora_weights"):
            raise ConfigError(f"validation_adapter_path / validation_adapter_config: {type(self.pipe).__name__} "
                              f"cannot load LoRA adapters; remove the option")  # fmt: skip
        self.adapter_files = validation_adapters.fetch(self.adapter_runs)  # a hub adapter is fetched now

    @property
    def _generator_device(self) -> Any:
        """validation_seed_source: cpu, or gpu: the device validation renders on (as SimpleTuner, its accelerator's
        device, which is the CPU on a machine without an accelerator)."""
        return "cpu" if self.options.validation_seed_source == "cpu" else self.device

    @property
    def _embeds_dtype(self) -> Any:
        """The dtype prompt embeddings enter the pipeline in: its VAE's, or the denoiser's in a pixel-space pipeline."""
        vae = getattr(self.pipe, "vae", None)
        return (vae if vae is not None else self.denoiser).dtype

    def _collated(self, item: dict[str, Any]) -> dict[str, Any]:
        collated = self.family.collate_text([item])
        return collated if self.text_encoders is None else self.text_encoders.embed(collated)

    def _prompt_kwargs(self, positive: dict[str, Any], negative: dict[str, Any] | None) -> dict[str, Any]:
        names = {"prompt_embeds": "prompt_embeds", "pooled_prompt_embeds": "pooled_prompt_embeds",
                 "attention_mask": "prompt_attention_mask"}  # fmt: skip
        kwargs = {}
        pos = self._collated(positive)
        for key, value in pos.items():
            name = names.get(key, key)
            if name in self.call_params:
                kwargs[name] = value.to(self.device, dtype=value.dtype if not value.is_floating_point() else
                                        self._embeds_dtype)  # fmt: skip
        if negative is not None:
            neg = self._collated(negative)
            for key, value in neg.items():
                name = "negative_" + names.get(key, key)
                if name in self.call_params:
                    kwargs[name] = value.to(self.device, dtype=value.dtype if not value.is_floating_point() else
                                            self._embeds_dtype)  # fmt: skip
        if self.family.list_prompt_embeds:  # one prompt's real tokens per item
            kwargs = {k: list(v.unbind(0)) if k.endswith("prompt_embeds") else v for k, v in kwargs.items()}
        return kwargs

    def render(self, step: int, label: str) -> list[Path]:
        """Images for every prompt and resolution; returns the PNG paths (the grid last)."""
        from .grid import image_grid

        options = self.options
        folder = self.out_dir / label
        folder.mkdir(parents=True, exist_ok=True)
        negative_text = options.validation_negative_prompt if options.validation_negative_prompt is not None else ""
        negative = self.embeds.get(negative_text)
        if self.true_cfg is not None and negative is None:
            raise InputError(f"validation_guidance_real needs the negative prompt {negative_text!r} in the cache, "
                             f"which has no embeddings for it: re-run `st cache` with this validation_negative_prompt")
        seed = render_seed(options, label)
        with self._vae_on_device(), self._lycoris_strength(), self._attention_slicing(), \
                model_cpu_offload(self.pipe, self.device, self.model_cpu_offload):
            paths = []
            for run in self.adapter_runs:  # the base run and/or each validation adapter set (validation_adapters)
                with validation_adapters.attached(self.pipe, self.denoiser, run, self.adapter_files):
                    paths += self._render_all(folder, negative, seed, run.tag)
        if paths:
            grid = folder / "grid.png"
            image_grid(paths, columns=max(1, options.num_validation_images * len(self.sizes))).save(grid)
            paths.append(grid)
        log.info("validation: %d %s at step %d (seed %d) -> %s", len(paths) - 1,
                 "video(s)" if self.family.video else "image(s)", step, seed, folder)  # fmt: skip
        return paths

    @contextlib.contextmanager
    def _attention_slicing(self):
        """unet_attention_slice: diffusers' sliced attention ("auto": half the head dimension per slice) while
        rendering; the trained modules get their attention processors back after, so training is unchanged."""
        saved = [(module, module.attn_processors) for module in self.sliced]
        try:
            for module, _ in saved:
                module.set_attention_slice("auto")
            yield
        finally:
            for module, processors in saved:
                module.set_attn_processor(processors)

    @contextlib.contextmanager
    def _lycoris_strength(self):
        """A LyCORIS network renders at `validation_lycoris_strength`, and trains on at its own multiplier."""
        from .lycoris import network_of

        network = network_of(self.denoiser)
        if network is None:
            yield
            return
        trained = network.multiplier
        network.set_multiplier(self.options.validation_lycoris_strength)
        try:
            yield
        finally:
            network.set_multiplier(trained)

    @contextlib.contextmanager
    def _vae_on_device(self):
        """The VAE (and a text encoder the pipeline runs) on the accelerator while rendering; back on the CPU after,
        unless keep_vae_loaded."""
        vae = getattr(self.pipe, "vae", None)
        if vae is None or self.keep_vae or str(self.device) == "cpu":  # None: a pixel-space pipeline (DeepFloyd IF)
            yield
            return
        moved = [m for m in (vae, self.text_encoder) if m is not None]
        for module in moved:
            module.to(self.device)
        try:
            yield
        finally:
            for module in moved:
                module.to("cpu")
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _render_all(self, folder: Path, negative: dict[str, Any] | None, seed: int, tag: str = "") -> list[Path]:
        """`tag`: what a validation adapter run adds to each prompt's file names (`__<slug>`)."""
        import torch
        from PIL import Image

        options = self.options
        paths: list[Path] = []
        for n, prompt in enumerate(self.prompts):
            stem = prompt.name + tag
            for width, height in self.sizes:
                if self.text_encoder is not None:  # the pipeline encodes prompt and negative with the image
                    kwargs = {"prompt": prompt.text, "negative_prompt": options.validation_negative_prompt or ""}
                elif self.family.prompt_text:  # OmniGenPipeline takes no negative prompt (its processor has its own)
                    kwargs = {"prompt": prompt.text}
                else:
                    kwargs = self._prompt_kwargs(self._embeds_of(prompt), negative)
                clip = None  # a control clip (Wan VACE's `video`): its frames at this size, saved as MP4 beside
                if self.control is not None and isinstance(self.control.image_for(n), list):
                    import numpy as np

                    clip = [frame.resize((width, height)) for frame in self.control.image_for(n)]
                    kwargs[self.control.argument] = clip
                    rate = family_framerate(options.framerate, self.family.name) or validation_video.DEFAULT_FPS
                    validation_video.write_mp4(np.stack([np.asarray(f) for f in clip]),
                                               folder / f"{stem}-{width}x{height}-control.mp4", rate)
                    for name, clips in self.control.extra.items():  # its mask clip, saved beside it too
                        kwargs[name] = [frame.resize((width, height), 0) for frame in clips[n % len(clips)]]  # nearest
                        validation_video.write_mp4(np.stack([np.asarray(f) for f in kwargs[name]]),
                                                   folder / f"{stem}-{width}x{height}-{name}.mp4", rate)
                elif self.control is not None:  # the conditioning image, saved beside the render (input / output)
                    kwargs[self.control.argument] = self.control.image_for(n)
                    path = folder / f"{stem}-{width}x{height}-control.png"
                    self.control.image_for(n).resize((width, height)).save(path)
                    for name, images in self.control.extra.items():  # Wan FLF2V's last_image, saved beside it too
                        kwargs[name] = images[n % len(images)]
                        kwargs[name].resize((width, height)).save(folder / f"{stem}-{width}x{height}-{name}.png")
                extra = {"num_inference_steps": options.validation_num_inference_steps,
                         "guidance_scale": options.validation_guidance, "height": height, "width": width,
                         "num_images_per_prompt": options.num_validation_images, "output_type": "pil",
                         "generator": torch.Generator(device=self._generator_device).manual_seed(seed)}  # fmt: skip
                if options.validation_guidance_rescale and "guidance_rescale" in self.call_params:
                    extra["guidance_rescale"] = options.validation_guidance_rescale
                if "use_resolution_binning" in self.call_params:
                    extra["use_resolution_binning"] = False
                if "max_area" in self.call_params:  # Kontext: the asked size, and the reference at its cached size
                    extra.update(max_area=width * height, _auto_resize=False)
                if self.refiner:
                    extra.update(self._refiner_inputs(extra.pop("width"), extra.pop("height")))
                if self.true_cfg is not None:  # FluxPipeline: true CFG with the negative embeddings
                    extra["true_cfg_scale"] = self.true_cfg
                extra.update(self.skip_layers)  # SD3 skip-layer guidance (skip_layer_guidance)
                if "negative_prompt_embeds" in kwargs and "negative_prompt" in self.call_params:
                    extra["negative_prompt"] = None  # Sana and PixArt default it to "", which clashes with the embeds
                if self.family.video:  # MP4 + frame grid PNG per video (validation_video)
                    frames = validation_video.frame_count(
                        options.validation_num_video_frames, self.family.temporal_compression,
                        validation_video.FAMILY_FRAMES.get(self.family.name, validation_video.DEFAULT_FRAMES))
                    frames = len(clip) if clip is not None else frames  # the control clip's frames, as cached
                    rate = family_framerate(options.framerate, self.family.name)
                    if rate is not None and "frame_rate" in self.call_params:
                        # LTXPipeline's RoPE time scale, as training used it. DEVIATION: SimpleTuner leaves the
                        # pipeline at its default 25 whatever framerate says.
                        extra["frame_rate"] = rate
                    paths += validation_video.render(self.pipe, kwargs, extra, folder / f"{stem}-{width}x{height}",
                                                     frames, fps=rate or validation_video.DEFAULT_FPS)  # fmt: skip
                    continue
                if isinstance(prompt, validation_datasets.DatasetPrompt):  # img2img from the dataset image
                    width, height = validation_datasets.input_size(prompt.image, width, height)
                    kwargs["image"] = prompt.image.resize((width, height), Image.Resampling.LANCZOS)
                    kwargs["image"].save(folder / f"{stem}-{width}x{height}-input.png")
                    extra.update(strength=validation_datasets.STRENGTH, height=height, width=width)
                    extra = {k: v for k, v in extra.items() if k in self.call_params}  # Img2Img: size from the image
                with torch.no_grad(), self._transformer_calls(self._embeds_of(prompt), negative), \
                        self._vae_encodes_in_own_dtype():
                    images = self.pipe(**kwargs, **extra).images
                for i, image in enumerate(images):
                    path = folder / f"{stem}-{width}x{height}-{i}.png"
                    image.save(path)
                    paths.append(path)
        return paths

    @contextlib.contextmanager
    def _vae_encodes_in_own_dtype(self):
        """An img2img pipeline casts its input image to the denoiser's dtype before its VAE encodes it; the VAE's
        encoder gets it in its own dtype (a VAE kept in float32 beside a bf16 denoiser), as the cache encoded. The
        SDXL-type pipelines' `force_upcast` (which would leave the VAE cast to the denoiser's dtype after encoding) is
        off meanwhile, so the VAE keeps its dtype."""
        vae = getattr(self.pipe, "vae", None)
        encoder = getattr(vae, "encoder", None)
        if not self.from_datasets or encoder is None:
            yield
            return
        dtype = next(encoder.parameters()).dtype
        handle = encoder.register_forward_pre_hook(lambda module, args: tuple(a.to(dtype) for a in args))
        upcast = vae.config.get("force_upcast")
        if upcast:
            vae.register_to_config(force_upcast=False)
        try:
            yield
        finally:
            handle.remove()
            if upcast:
                vae.register_to_config(force_upcast=upcast)

    def _embeds_of(self, prompt: Any) -> dict[str, Any]:
        """A prompt's cached embeddings: a dataset input's own caption's, else the shared ones of its text."""
        own = getattr(prompt, "embeds", None)
        return own if own is not None else self.embeds[prompt.text]

    def _refiner_inputs(self, width: int, height: int) -> dict[str, Any]:
        """The SDXL refiner's img2img inputs: an all-zero latent image of the asked size, denoised from pure noise."""
        import torch

        scale = self.pipe.vae_scale_factor
        image = torch.zeros(1, self.family.latent_channels, height // scale, width // scale, dtype=self._embeds_dtype,
                            device=self.device)  # fmt: skip
        score = self.family_text.aesthetic_score if self.family_text is not None else None
        return {"image": image, "strength": 1.0,
                "aesthetic_score": sdxl.DEFAULT_AESTHETIC_SCORE if score is None else score}  # fmt: skip

    @contextlib.contextmanager
    def _transformer_calls(self, item: dict[str, Any], negative: dict[str, Any] | None):
        """Hooks on the pipeline's transformer calls. With flux_attention_masked_training, each call gets its text's
        stored T5 mask (the prompt's; with true CFG, the negative prompt's on the unconditional call) as its
        `joint_attention_kwargs`, built for the tokens of that call (`flux.joint_attention_mask`). With true CFG,
        FluxPipeline calls the transformer twice a step (conditional, then unconditional); on the first
        `validation_no_cfg_until_timestep` steps the unconditional call returns the conditional output, so the
        pipeline's uncond + scale * (cond - uncond) is exactly the conditional prediction: no CFG on those steps,
        as SimpleTuner's pipeline. (The skipped call still runs: a forward hook cannot skip the forward.)"""
        masked = self.family_text is not None and self.family_text.attention_mask
        cfg = self.true_cfg is not None
        until = self.options.validation_no_cfg_until_timestep if cfg else 0
        if not masked and until <= 0:
            yield
            return
        texts = [item, negative] if cfg else [item]
        masks = [self.family_text.denoiser_text([t], {})["attention_mask"].to(self.device) for t in texts] \
            if masked else []  # fmt: skip
        calls, state = itertools.count(), {}

        def before(module: Any, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            n = next(calls)
            state["uncond"], state["step"] = (n % 2 == 1, n // 2) if cfg else (False, n)
            if masked:
                tokens = kwargs["hidden_states"]
                kwargs["joint_attention_kwargs"] = {"attention_mask": flux.joint_attention_mask(
                    masks[int(state["uncond"])], tokens.shape[1], tokens.dtype)}  # fmt: skip
            return args, kwargs

        def after(module: Any, args: Any, output: Any) -> Any:
            if not state["uncond"]:
                state["cond"] = output
                return None
            return state.pop("cond") if state["step"] < until else None

        handles = [self.denoiser.register_forward_pre_hook(before, with_kwargs=True),
                   self.denoiser.register_forward_hook(after)]  # fmt: skip
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _diffusers_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)

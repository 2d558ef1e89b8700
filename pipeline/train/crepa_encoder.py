"""What CREPA compares a video transformer's hidden states with: the frozen vision encoder's features of the decoded
clean frames (`FrameEncoder`, `LatentDecoder`), as SimpleTuner computes them.

SimpleTuner loads DINOv2 through torch.hub (`facebookresearch/dinov2`), which needs the network and runs hub code;
st loads the same weights from transformers' `Dinov2Model` instead (a local folder or a hub id, offline from the hub
cache). `crepa_model` names map as `DINOV2_HUB_IDS` says (SimpleTuner's aliases `ALIASES` first). The torch.hub
model called as SimpleTuner calls it returns the final-norm class token of each frame (`x_norm_clstoken` through an
identity head); transformers' `pooler_output` is that same token, so each frame gives one D-dimensional feature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InputError
from ..log import get_logger

log = get_logger("train")

# SimpleTuner's crepa_model choices and aliases -> transformers' ports of the same DINOv2 checkpoints.
DINOV2_HUB_IDS = {
    "dinov2_vits14": "facebook/dinov2-small",
    "dinov2_vitb14": "facebook/dinov2-base",
    "dinov2_vitl14": "facebook/dinov2-large",
    "dinov2_vitg14": "facebook/dinov2-giant",
}
ALIASES = {
    "dino_v2_g": "dinov2_vitg14", "dinov2_g": "dinov2_vitg14", "dinov2-vitg14": "dinov2_vitg14",
    "dino_v2_s": "dinov2_vits14", "dinov2_s": "dinov2_vits14", "dinov2-vitb14": "dinov2_vitb14",
}  # fmt: skip
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def encoder_source(name: str, base_dir: Path | None = None) -> str:
    """The folder or hub id `crepa_model` names: a DINOv2 name (or alias) maps to its transformers hub id; an
    existing folder (relative to `base_dir`) is used as it is; anything else is taken as a hub id."""
    key = ALIASES.get(name.strip().lower(), name.strip())
    if key in DINOV2_HUB_IDS:
        return DINOV2_HUB_IDS[key]
    path = Path(key).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return str(path) if path.is_dir() else key


class FrameEncoder:
    """The frozen DINOv2 (float32, eval mode): frames B x T x 3 x H x W in [0, 1] -> features B x T x 1 x D."""

    def __init__(self, model: Any, image_size: int) -> None:
        self.model, self.image_size = model, image_size
        self.dim = int(model.config.hidden_size)

    @classmethod
    def load(cls, name: str, image_size: int, device: Any, base_dir: Path | None = None) -> FrameEncoder:
        from transformers import Dinov2Model

        from ..families.hub import hub_errors, hub_offline, looks_like_path

        source = encoder_source(name, base_dir)
        local = Path(source).is_dir()
        if not local and looks_like_path(source):
            raise InputError(f"crepa_model {name!r}: the folder {source} does not exist")
        try:
            model = Dinov2Model.from_pretrained(source, local_files_only=False if local else hub_offline())
        except hub_errors() as error:
            raise InputError(f"crepa_model {name!r}: could not load a Dinov2Model from {source} ({error}); download it "
                             "first (`hf download`), or point crepa_model at a local folder") from error  # fmt: skip
        model.requires_grad_(False).eval().to(device=device, dtype=_float32())
        log.info("CREPA encoder: %s (%d features per frame, frames at %d px)", source, model.config.hidden_size,
                 image_size)  # fmt: skip
        return cls(model, image_size)

    def __call__(self, frames: Any) -> Any:
        import torch
        import torch.nn.functional as F

        b, t, c, h, w = frames.shape
        flat = frames.reshape(b * t, c, h, w).float()
        flat = F.interpolate(flat, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=flat.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=flat.device).view(1, 3, 1, 1)
        with torch.no_grad():
            tokens = self.model(pixel_values=(flat - mean) / std).pooler_output  # the class token after the final norm
        return tokens.view(b, t, 1, -1)


class LatentDecoder:
    """A video family's VAE: cached (normalised) latents B x C x f x h x w -> frames B x T x 3 x H x W in [0, 1],
    de-normalised as the family's diffusers pipeline does before `vae.decode` (Wan: per-channel latents_mean and
    latents_std of the VAE config; LTX-Video: the VAE's latents_mean / latents_std buffers and scaling_factor, decode
    timestep 0 where the VAE is timestep-conditioned)."""

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        self.kind = type(vae).__name__
        if self.kind not in ("AutoencoderKLWan", "AutoencoderKLLTXVideo"):
            raise InputError(f"CREPA decodes Wan and LTX-Video latents only, not those of a {self.kind}")

    @classmethod
    def load(cls, family: Any, source: str, vae_source: str | None, device: Any) -> LatentDecoder:
        from ..families import load_components

        vae = load_components(family, source, vae_source=vae_source, which=("vae",))["vae"]
        vae.requires_grad_(False).eval().to(device=device, dtype=_float32())
        return cls(vae)

    def __call__(self, latents: Any) -> Any:
        import torch

        vae = self.vae
        latents = latents.detach().to(dtype=next(vae.parameters()).dtype)
        timestep = None
        if self.kind == "AutoencoderKLWan":
            shape = (1, vae.config.z_dim, 1, 1, 1)
            mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
            inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents)
            latents = latents / inverse_std + mean
        else:
            mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(latents)
            std = vae.latents_std.view(1, -1, 1, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
            if vae.config.timestep_conditioning:
                timestep = torch.zeros(latents.shape[0], device=latents.device, dtype=latents.dtype)
        args = (latents,) if timestep is None else (latents, timestep)
        with torch.no_grad():
            video = vae.decode(*args, return_dict=False)[0]
        video = (video.float().clamp(-1, 1) + 1) / 2  # B x 3 x T x H x W
        return video.permute(0, 2, 1, 3, 4)


def write_tiny_dinov2(folder: Path, seed: int = 0) -> Path:
    """A random-weight `Dinov2Model` folder (a few KB; patch 4, so a 16 px frame has 16 patches) for tests and
    demos: `crepa_model` may name it."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from .seeding import isolated_rng

    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=4,
                          image_size=16)  # fmt: skip
    with isolated_rng(seed=seed):
        model = Dinov2Model(config)
    model.to(torch.float32).save_pretrained(folder)
    return Path(folder)


def _float32() -> Any:
    import torch

    return torch.float32

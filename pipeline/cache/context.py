"""What a cache run (or a merge of parts) works from, resolved once: the prepare manifest and its samples, the model
and its identity (config + weight-header hashes, no model load), the options, the validation prompts and the stage
key; then the shard plan and the encoders built from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ..config import CACHE, LoadedConfig
from ..distributed import local_rank
from ..errors import NotSupportedError
from ..families import Family, check_model_family, get_family, without_source
from ..families.identity import ModelSources, model_identity, model_sources
from ..families.text_training import trainable_text
from ..families.wan_i2v import PIPELINE_CLASS as I2V_PIPELINE
from ..families.wan_i2v import is_flf2v
from ..families.wan_vace import check_cache as check_conditioning_clips
from ..hashing import sha256_json
from ..lineage import verify_outputs
from ..manifest import MANIFEST_NAME, read_manifest
from ..precision import default_bf16_on_device
from ..prompts import texts_to_encode, validation_prompts
from ..quantise import NO_CHANGE
from ..quantise_modules import check_text_encoder_precisions
from ..ramtorch_layers import ComponentOptions, check_components
from .encode import Encoders
from .options import CacheOptions
from .plan import FORMAT_VERSION, CachePlan, build_plan, identities


@dataclass
class CacheContext:
    """Everything a cache run works from. The plan is built on first use: an up-to-date run never needs it."""

    options: CacheOptions
    family: Family
    sources: ModelSources
    vae_dtype: str  # the configured one, "default" resolved for this machine
    parent: dict[str, Any]
    parent_path: Path
    rows: list[dict[str, Any]]
    roots: dict[str, str]  # dataset id -> the folder its sample paths are relative to
    model: dict[str, Any]
    stage_config: dict[str, Any]
    prompts: list[str]  # validation prompt texts, embedded once in the shared embeds file
    key: str

    @cached_property
    def plan(self) -> CachePlan:
        latent_id, text_id = identities(self.model, self.options, self.vae_dtype)
        precisions = self.options.text_encoder_precisions
        if any(p != NO_CHANGE for p in precisions):  # quantised encoders give other embeddings; no_change keeps the ids
            text_id = sha256_json({"text": text_id, "text_encoder_precisions": precisions})
        if self.family.text_with_reference:  # captions encoded with their sample's reference image (Qwen-Image-Edit)
            text_id = sha256_json({"text": text_id, "encoded_with_reference": self.family.pipeline_class})
        return build_plan(self.rows, latent_identity=latent_id, text_identity=text_id,
                          control_latents=self.family.control_input == "latents",
                          temporal_compression=self.family.temporal_compression,
                          first_frame=self.family.pipeline_class == I2V_PIPELINE,
                          last_frame=is_flf2v(self.family),
                          per_sample_text=self.family.text_with_reference,
                          shard_samples=self.options.cache_shard_samples, extra_prompts=self.prompts,
                          compression_level=self.options.cache_compression_level)  # fmt: skip

    def encoders(self, device: Any) -> Encoders:
        """The run's encoders on `device` (nothing is loaded until first used)."""
        sources, options = self.sources, self.options
        return Encoders(self.family, sources.model, sources.vae, sources.t5, sources.revision, options.variant,
                        self.vae_dtype, device, offload=options.offload_during_startup,
                        speed=options.speed, precisions=options.text_encoder_precisions,
                        ramtorch=ComponentOptions.from_config(options))  # fmt: skip


def validation_prompt_texts(loaded: LoadedConfig) -> list[str]:
    """Prompts st train renders at validation: their embeddings are cached once in the shared embeds file."""
    config = loaded.config
    prompts = validation_prompts(config.validation_prompt, config.user_prompt_library, loaded.resolve_path)
    return texts_to_encode(prompts, config.validation_negative_prompt)


def encode_device():
    """This process's GPU (its local rank's) when there is one, else the CPU."""
    import torch

    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def _resolved_vae_dtype(configured: str) -> str:
    if configured != "default":
        return configured
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def _read_rows(samples_path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(samples_path).to_pylist()


def build_context(loaded: LoadedConfig, input_path: Path) -> CacheContext:
    """Read and check the prepare manifest at `input_path` (file or folder), identify the model and compute the key."""
    loaded = default_bf16_on_device(loaded, "vae_dtype", "fp32")
    config = loaded.config
    options = CacheOptions.from_config(config)
    # Absolute, because it goes into provenance: a later stage looks for this manifest there to check lineage.
    parent_path = Path(input_path).absolute()
    parent_path = parent_path / MANIFEST_NAME if parent_path.is_dir() else parent_path
    parent = read_manifest(parent_path, stage="prepare")
    verify_outputs(parent, parent_path.parent, parent_path, writer="prepare")
    rows = _read_rows(parent_path.parent / "samples.parquet")
    family = get_family(config.model_family) if config.model_family else None
    sources = model_sources(loaded)
    check_model_family(family, sources.model)
    family = family.for_run(config.model_flavour, sources.model)  # the encoders of the variant trained (SDXL refiner)
    check_conditioning_clips(family, rows)  # a video dataset's conditioning clips: Wan VACE's control videos only
    check_text_encoder_precisions(options.text_encoder_precisions, family, trained=options.train_text_encoder)
    check_components(ComponentOptions.from_config(options), encode_device(), "encodes", options.text_encoder_precisions)
    model = model_identity(family, sources)
    vae_dtype = _resolved_vae_dtype(options.vae_dtype)
    stage_config = config.stage_keys(CACHE)
    # The prompt texts (not just the user_prompt_library path) decide what the shared embeddings hold.
    prompts = validation_prompt_texts(loaded)
    stripped = {part: ([without_source(i) for i in v] if isinstance(v, list) else without_source(v)) for part, v in model.items()}
    token_ids = {"token_ids": True} if options.train_text_encoder else {}  # train_text_encoder: the ids are stored
    if token_ids:
        trainable_text(family.name if family else config.model_family)
        if family is not None and family.text_encoders != get_family(family.name).text_encoders:
            raise NotSupportedError(f"st does not implement train_text_encoder for {family.pipeline_class} (the SDXL "
                                    "refiner) yet; set train_text_encoder false")  # fmt: skip
    key = sha256_json({"format": FORMAT_VERSION, "parent": parent["digest"], "config": stage_config,
                       "model": stripped, "vae_dtype": vae_dtype, "prompts": sorted(prompts), **token_ids})  # fmt: skip
    roots = {d["id"]: d["root"] for d in [*parent["datasets"], *parent.get("conditioning_datasets", [])]}
    return CacheContext(options, family, sources, vae_dtype, parent, parent_path, rows, roots, model, stage_config,
                        prompts, key)  # fmt: skip

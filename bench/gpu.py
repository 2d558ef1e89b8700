"""GPU benchmark: `st train`'s step and `st cache`'s VAE encode against plain loops, in one process on one card.

Train cases (models built from the real configs, written inline below, with random weights created directly on the
device in bf16: no download, no CPU initialisation):

- sd15:  SD 1.5 UNet, batch 8, 512 px (64x64 latents), LoRA rank 16 on to_q/to_k/to_v/to_out.0, epsilon.
- sdxl:  SDXL UNet, batch 4, 1024 px (128x128 latents), LoRA rank 16 on the same targets, epsilon.
- flux:  Flux.1-dev transformer, batch 1, 1024 px (4096 image + 512 text tokens), LoRA rank 16 on st's default
         targets (flux_lora_target "all"), flow matching, gradient checkpointing on both sides (without it a 12B
         model's activations at 1024 px do not fit next to its weights on an 80 GB card).

Variants per train case, each timed after warm-up steps (compilation happens there):

- plain eager: a bare diffusers + peft loop as diffusers' LoRA training scripts write it: `add_adapter(LoraConfig)`,
  LoRA parameters cast to fp32, `torch.optim.AdamW`, bf16 autocast, DDPM noise + MSE on epsilon (flow matching + MSE
  on noise - latents for Flux), backward, `clip_grad_norm_`, step, zero_grad. Latents and text come from CPU tensors
  each step, as from a data loader.
- plain compiled: the same loop with the model wrapped in `torch.compile` (whole model, inductor, default mode).
- st: `st train`'s step: the trainer's own `_attention()` and `_forward_loss()` (family.denoiser_forward,
  `pipeline.train.objectives.Objective`), `accelerator.backward`, st's gradient clipping, st's optimizer (adamw_bf16)
  and LR scheduler, the per-step loss read-back and cache clearing, on a model set up by `pipeline.speed`
  (`setup_denoiser`, `pipeline.train.adapters.attach`, `compile_module`) with st's defaults, mixed_precision bf16.
- st+compile: the same with dynamo_backend=inductor (regional compilation, st's default for it).

Cache cases: SD VAE at 512 px and SDXL VAE at 1024 px, bf16, batch 4 (st's vae_batch_size), pixels from CPU:
- bare eager: `vae.encode(x.to(device)).latent_dist.sample()`, latents left on the device.
- bare compiled: the same with `vae.encoder` wrapped in `torch.compile`.
- st / st+compile: `pipeline.cache.encode.Encoders.encode_latents` (per-sample seeded noise, latents back on the CPU)
  with `pipeline.speed` options (defaults; + dynamo_backend=inductor).

Figures: samples/s; ratios st/plain-eager and st/plain-compiled; achieved TFLOP/s (FLOPs of one plain eager step
counted with `torch.utils.flop_counter.FlopCounterMode`, recomputation by checkpointing included, divided by each
variant's step time); peak memory (`torch.cuda.max_memory_allocated`, reset before each variant). cuDNN SDPA is
disabled for the plain loops (`torch.backends.cuda.enable_cudnn_sdp(False)`; its backward crashed on H100 with
Flux shapes); st never picks it implicitly. Models are built in bf16 on both sides (st's trainer itself loads the
denoiser in fp32 today).

Run: `.venv/bin/python bench/gpu.py [--cases sd15,sdxl,flux,sd-vae,sdxl-vae] [--json out.json]` on one H100
(aimed at under 5 minutes, most of it compilation), or `--smoke` for the same code at tiny sizes (CPU or GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# ------------------------------------------------------------------------------------------------ model configs

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)  # fmt: skip
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)  # fmt: skip
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215,
)  # fmt: skip
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

# The same architectures at tiny sizes for --smoke.
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
TINY_SDXL_UNET = {**TINY_UNET, "use_linear_projection": True, "addition_embed_type": "text_time",
                  "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32,
                  "transformer_layers_per_block": (1, 2)}  # fmt: skip
TINY_FLUX = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)  # fmt: skip
TINY_VAE = {**SD_VAE, "block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1}  # fmt: skip

DDPM_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}  # fmt: skip
FLOW_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}


@dataclass
class TrainCase:
    name: str
    family: str
    model_class: str
    config: dict[str, Any]
    batch: int
    latent: int  # latent edge (pixels / 8)
    text_len: int
    text_dim: int
    pooled_dim: int | None
    checkpointing: bool = False
    description: str = ""


@dataclass
class CacheCase:
    name: str
    config: dict[str, Any]
    pixels: int
    images: int
    batch: int = 4
    description: str = ""


def train_cases(smoke: bool) -> dict[str, TrainCase]:
    if smoke:
        return {
            "sd15": TrainCase("sd15", "sd1x", "UNet2DConditionModel", TINY_UNET, 2, 16, 77, 32, None,
                              description="tiny SD1.5-style UNet, batch 2, 128 px"),
            "sdxl": TrainCase("sdxl", "sdxl", "UNet2DConditionModel", TINY_SDXL_UNET, 2, 16, 77, 32, 32,
                              description="tiny SDXL-style UNet, batch 2, 128 px"),
            "flux": TrainCase("flux", "flux", "FluxTransformer2DModel", TINY_FLUX, 1, 16, 16, 32, 32,
                              checkpointing=True, description="tiny Flux-style transformer, batch 1, 128 px"),
        }  # fmt: skip
    return {
        "sd15": TrainCase("sd15", "sd1x", "UNet2DConditionModel", SD15_UNET, 8, 64, 77, 768, None,
                          description="SD 1.5 UNet, batch 8, 512 px, LoRA r16 q/k/v/out"),
        "sdxl": TrainCase("sdxl", "sdxl", "UNet2DConditionModel", SDXL_UNET, 4, 128, 77, 2048, 1280,
                          description="SDXL UNet, batch 4, 1024 px, LoRA r16 q/k/v/out"),
        "flux": TrainCase("flux", "flux", "FluxTransformer2DModel", FLUX_DEV, 1, 128, 512, 4096, 768,
                          checkpointing=True, description="Flux.1-dev transformer, batch 1, 1024 px, LoRA r16 'all', "
                                                          "gradient checkpointing"),
    }  # fmt: skip


def cache_cases(smoke: bool) -> dict[str, CacheCase]:
    if smoke:
        return {
            "sd-vae": CacheCase("sd-vae", TINY_VAE, 64, 8, description="tiny VAE, 64 px"),
            "sdxl-vae": CacheCase("sdxl-vae", {**TINY_VAE, "scaling_factor": 0.13025}, 96, 8,
                                  description="tiny VAE, 96 px"),
        }  # fmt: skip
    return {
        "sd-vae": CacheCase("sd-vae", SD_VAE, 512, 64, description="SD VAE encode, 512 px, batch 4"),
        "sdxl-vae": CacheCase("sdxl-vae", SDXL_VAE, 1024, 32, description="SDXL VAE encode, 1024 px, batch 4"),
    }


# -------------------------------------------------------------------------------------------------------- helpers


@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype
    warmup: int
    steps: int
    compile_backend: str
    smoke: bool
    st_sets: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_memory(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(class_name: str, config: dict[str, Any], env: Env, seed: int = 0):
    """The model with random weights, created on the device in the bench dtype (no CPU copy, no download)."""
    import diffusers

    torch.manual_seed(seed)
    with env.device, default_dtype(env.dtype):
        model = getattr(diffusers, class_name)(**config)
    return model


def count_flops(step: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def timed(env: Env, step: Callable[[int], Any], samples_per_step: int) -> dict[str, Any]:
    """Warm-up steps (compilation) then `env.steps` timed steps; peak memory over both."""
    started = time.perf_counter()
    for i in range(env.warmup):
        step(i)
    env.sync()
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(env.warmup, env.warmup + env.steps):
        step(i)
    env.sync()
    elapsed = time.perf_counter() - started
    return {"samples_per_s": samples_per_step * env.steps / elapsed, "step_s": elapsed / env.steps,
            "warmup_s": warm, "peak_gib": env.peak_gib()}  # fmt: skip


def st_config(case_family: str, env: Env, **extra: Any):
    """st's defaults, as `st train` would run this case (mixed precision bf16 on the GPU), plus --st-set."""
    from pipeline.config import build_config, parse_set

    raw: dict[str, Any] = {"model_family": case_family, "lora_rank": 16, "train_batch_size": 1,
                           "mixed_precision": "bf16" if env.cuda else "no", "seed": 0}  # fmt: skip
    raw.update(extra)
    for item in env.st_sets:
        key, value = parse_set(item)
        raw[key] = value
    config, _ = build_config(raw)
    return config


# ---------------------------------------------------------------------------------------------------- train data


@dataclass
class Batch:
    latents: torch.Tensor  # CPU, float32
    texts: list[dict[str, torch.Tensor]]  # per sample, CPU, bf16 (as st's cache stores them)
    meta: list[dict[str, Any]]
    text: dict[str, torch.Tensor]  # the same, batched (for the plain loop)
    time_ids: torch.Tensor | None


def make_batch(case: TrainCase) -> Batch:
    g = torch.Generator().manual_seed(0)
    channels = 16 if case.family == "flux" else 4
    latents = torch.randn(case.batch, channels, case.latent, case.latent, generator=g)
    texts = []
    for _ in range(case.batch):
        item = {"prompt_embeds": torch.randn(case.text_len, case.text_dim, generator=g).to(torch.bfloat16)}
        if case.pooled_dim:
            item["pooled_prompt_embeds"] = torch.randn(case.pooled_dim, generator=g).to(torch.bfloat16)
        texts.append(item)
    size = case.latent * 8
    meta = [{"original_size": [size, size], "crop_top_left": [0, 0], "target_size": [size, size]}] * case.batch
    text = {k: torch.stack([t[k] for t in texts]) for k in texts[0]}
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * case.batch, dtype=torch.float32)
    return Batch(latents, texts, meta, text, time_ids if case.family == "sdxl" else None)


# ---------------------------------------------------------------------------------------------------- plain loop


def plain_model(case: TrainCase, env: Env):
    from peft import LoraConfig

    from pipeline.families import get_family

    model = build(case.model_class, case.config, env)
    model.requires_grad_(False)
    if case.checkpointing:
        model.enable_gradient_checkpointing()
    targets = list(get_family(case.family).lora_target_modules("all" if case.family == "flux" else None))
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # diffusers' cast_training_params: trainable LoRA weights in fp32
        p.data = p.data.float()
    model.train()
    return model, params


def plain_step_fn(case: TrainCase, env: Env, model, params, batch: Batch) -> Callable[[int], Any]:
    from pipeline.families.flux import predict as flux_predict

    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    alphas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - alphas, 0).float().to(env.device)
    flow = case.family == "flux"
    g = torch.Generator(device=env.device).manual_seed(0)
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=env.cuda)

    def step(_: int) -> None:
        latents = batch.latents.to(env.device, non_blocking=True)
        text = {k: v.to(env.device, dtype=env.dtype) for k, v in batch.text.items()}
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=g, device=env.device)
        if flow:
            sigmas = torch.sigmoid(torch.randn(b, generator=g, device=env.device))
            s = sigmas.view(b, 1, 1, 1)
            noisy, target, timesteps = (1 - s) * latents + s * noise, noise - latents, sigmas * 1000
        else:
            timesteps = torch.randint(0, 1000, (b,), generator=g, device=env.device)
            a = alphas_cumprod[timesteps].view(b, 1, 1, 1)
            noisy, target = a.sqrt() * latents + (1 - a).sqrt() * noise, noise
        with autocast:
            if flow:
                guidance = torch.ones(b, device=env.device)
                pred = flux_predict(model, noisy.to(env.dtype), timesteps, text, None, guidance)
            elif batch.time_ids is not None:
                added = {"text_embeds": text["pooled_prompt_embeds"], "time_ids": batch.time_ids.to(env.device)}
                pred = model(noisy.to(env.dtype), timesteps, encoder_hidden_states=text["prompt_embeds"],
                             added_cond_kwargs=added, return_dict=False)[0]  # fmt: skip
            else:
                pred = model(noisy.to(env.dtype), timesteps, encoder_hidden_states=text["prompt_embeds"],
                             return_dict=False)[0]  # fmt: skip
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ------------------------------------------------------------------------------------------------------- st step


def st_step_fn(case: TrainCase, env: Env, batch: Batch, **options: Any):
    """`st train`'s step on a fresh model: pipeline.speed set-up, adapters.attach, the trainer's own _attention and
    _forward_loss, then the rest of Trainer.run's step (clip, optimizer, scheduler, zero_grad, loss read-back,
    cache clearing)."""
    from accelerate import Accelerator

    from pipeline import speed
    from pipeline.families import get_family
    from pipeline.train import adapters
    from pipeline.train.objectives import Objective
    from pipeline.train.optim import build_lr_scheduler, build_optimizer, clip_gradients, optimizer_train_mode
    from pipeline.train.options import AdapterOptions, ObjectiveOptions, OptimizerOptions
    from pipeline.train.trainer import Trainer, _reset_accelerator_state

    family = get_family(case.family)
    config = st_config(case.family, env, gradient_checkpointing=case.checkpointing, **options)
    _reset_accelerator_state()
    accelerator = Accelerator(cpu=not env.cuda, mixed_precision=config.mixed_precision)
    device = accelerator.device
    speed.check_train_options(config, device)
    model = build(case.model_class, case.config, env)
    speed.setup_denoiser(model, config)
    params = adapters.attach(model, AdapterOptions.from_config(config), family)
    model.to(device)
    model.train()
    compiled = speed.compile_module(model, config)
    objective = Objective(ObjectiveOptions.from_config(config), kind=family.prediction_type,
                          scheduler_config=FLOW_SCHEDULER if family.prediction_type == "flow_matching"
                          else DDPM_SCHEDULER, default_shift=family.default_flow_shift)  # fmt: skip
    optimizer_options = OptimizerOptions.from_config(config)
    optimizer = build_optimizer(params, optimizer_options, device_type=device.type)
    lr_scheduler = build_lr_scheduler(optimizer, optimizer_options, 10_000)
    model, optimizer = accelerator.prepare(model, optimizer)
    optimizer_train_mode(optimizer)
    trainer = Trainer.__new__(Trainer)  # only what _attention and _forward_loss read
    trainer.__dict__.update(config=config, family=family, device=device, objective=objective, accelerator=accelerator,
                            model=model, generator=torch.Generator(device="cpu").manual_seed(0))  # fmt: skip
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(i: int) -> float:
        with trainer._attention():
            loss = trainer._forward_loss(batch.latents, batch.texts, batch.meta, i)
            accelerator.backward(loss)
        value = float(loss.detach())
        clip_gradients(trainable, optimizer_options)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=config.set_grads_to_none)
        value = float(accelerator.reduce(torch.tensor(value, device=device), reduction="mean"))
        speed.maybe_clear_cache(i + 1, config.accelerator_cache_clear_interval)
        return value

    return step, {"compiled_blocks": len(compiled), "mixed_precision": config.mixed_precision,
                  "optimizer": config.optimizer, "attention_mechanism": config.attention_mechanism}  # fmt: skip


# ----------------------------------------------------------------------------------------------------- runners


def run_train_case(case: TrainCase, env: Env, variants: list[str]) -> list[dict[str, Any]]:
    batch = make_batch(case)
    rows: list[dict[str, Any]] = []
    flops = None

    def row(variant: str, result: dict[str, Any], **extra: Any) -> None:
        rows.append({"case": case.name, "kind": "train", "variant": variant, "description": case.description,
                     "batch": case.batch, **result, **extra})  # fmt: skip
        print(f"  {case.name:8s} {variant:15s} {result['samples_per_s']:9.2f} samples/s  "
              f"(warm-up {result['warmup_s']:.1f} s)", flush=True)

    if "plain" in variants or "plain+compile" in variants:
        env.reset_memory()
        model, params = plain_model(case, env)
        step = plain_step_fn(case, env, model, params, batch)
        step(0)  # the first step allocates the optimizer state; FLOPs are counted on the next
        env.sync()
        flops = count_flops(lambda: step(1))
        if "plain" in variants:
            env.reset_memory()
            row("plain", timed(env, step, case.batch))
        if "plain+compile" in variants:
            compiled = torch.compile(model, backend=env.compile_backend)
            cstep = plain_step_fn(case, env, compiled, params, batch)
            env.reset_memory()
            row("plain+compile", timed(env, cstep, case.batch))
            del compiled, cstep
        del model, params, step
        torch._dynamo.reset()
    for variant in ("st", "st+compile"):
        if variant not in variants:
            continue
        env.reset_memory()
        options = {"dynamo_backend": env.compile_backend} if variant == "st+compile" else {}
        step, info = st_step_fn(case, env, batch, **options)
        row(variant, timed(env, step, case.batch), st=info)
        del step
        torch._dynamo.reset()
    for r in rows:
        r["flops_per_step"] = flops
        r["tflops"] = flops / r["step_s"] / 1e12 if flops else None
    return rows


def run_cache_case(case: CacheCase, env: Env, variants: list[str]) -> list[dict[str, Any]]:
    from pipeline import speed
    from pipeline.cache.encode import Encoders
    from pipeline.families import get_family

    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(case.batch, 3, case.pixels, case.pixels, generator=g) * 2 - 1
               for _ in range(max(1, case.images // case.batch))]  # fmt: skip
    rows: list[dict[str, Any]] = []
    samples = case.batch
    flops = None

    def row(variant: str, result: dict[str, Any]) -> None:
        rows.append({"case": case.name, "kind": "cache", "variant": variant, "description": case.description,
                     "batch": case.batch, **result})  # fmt: skip
        print(f"  {case.name:8s} {variant:15s} {result['samples_per_s']:9.2f} images/s  "
              f"(warm-up {result['warmup_s']:.1f} s)", flush=True)

    if "plain" in variants or "plain+compile" in variants:
        env.reset_memory()
        vae = build("AutoencoderKL", case.config, env).eval().requires_grad_(False)

        def bare(encode):
            def step(i: int):
                with torch.no_grad():
                    return encode(batches[i % len(batches)].to(env.device, dtype=env.dtype)).latent_dist.sample()

            return step

        flops = count_flops(lambda: bare(vae.encode)(0))
        if "plain" in variants:
            env.reset_memory()
            row("plain", timed(env, bare(vae.encode), samples))
        if "plain+compile" in variants:
            vae.encoder = torch.compile(vae.encoder, backend=env.compile_backend)
            env.reset_memory()
            row("plain+compile", timed(env, bare(vae.encode), samples))
        del vae
        torch._dynamo.reset()
    ids = [[f"{i}-{j}" for j in range(case.batch)] for i in range(len(batches))]
    for variant in ("st", "st+compile"):
        if variant not in variants:
            continue
        env.reset_memory()
        options = speed.SpeedOptions.from_config(st_config("sd1x", env, **(
            {"dynamo_backend": env.compile_backend} if variant == "st+compile" else {})))  # fmt: skip
        encoders = Encoders(get_family("sd1x"), "unused", None, None, None, None,
                            "bf16" if env.dtype == torch.bfloat16 else "fp32", env.device, speed=options)  # fmt: skip
        encoders.use_vae(build("AutoencoderKL", case.config, env))

        def step(i: int, encoders=encoders):
            return encoders.encode_latents(batches[i % len(batches)], ids[i % len(batches)], seed=0)

        row(variant, timed(env, step, samples))
        del encoders, step
        torch._dynamo.reset()
    for r in rows:
        r["flops_per_step"] = flops
        r["tflops"] = flops / r["step_s"] / 1e12 if flops else None
    return rows


# ----------------------------------------------------------------------------------------------------- report


TARGETS = {  # (case kind or name, variant, against, minimum ratio of samples/s)
    "train": [("st", "plain", 2.0), ("st", "plain+compile", 1.1)],
    "flux": [("st", "plain", 1.2)],
    "cache": [("st", "plain", 0.9), ("st+compile", "plain", 1.2)],
}


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["case"], r["variant"]): r for r in rows}
    checks = []
    for r in rows:
        for base in ("plain", "plain+compile"):
            other = by.get((r["case"], base))
            if other and r["variant"].startswith("st"):
                r[f"ratio_vs_{base}"] = r["samples_per_s"] / other["samples_per_s"]
                if r.get("peak_gib") and other.get("peak_gib"):
                    r[f"memory_vs_{base}"] = r["peak_gib"] / other["peak_gib"]
    for case in sorted({r["case"] for r in rows}):
        kind = by.get((case, "plain"), by.get((case, "st"), {})).get("kind")
        targets = TARGETS.get(case) or TARGETS.get(kind, [])
        for variant, base, minimum in targets:
            a, b = by.get((case, variant)), by.get((case, base))
            if a and b:
                ratio = a["samples_per_s"] / b["samples_per_s"]
                checks.append({"case": case, "check": f"{variant} / {base} >= {minimum}", "value": round(ratio, 3),
                               "ok": ratio >= minimum})  # fmt: skip
        a, b = by.get((case, "st")), by.get((case, "plain"))
        if kind == "train" and a and b and a.get("peak_gib") and b.get("peak_gib"):
            checks.append({"case": case, "check": "st peak memory <= plain eager", "value": round(a["peak_gib"], 2),
                           "ok": a["peak_gib"] <= b["peak_gib"]})  # fmt: skip
    return checks


def print_table(rows: list[dict[str, Any]], checks: list[dict[str, Any]], smoke: bool = False) -> None:
    head = f"{'case':9s} {'variant':15s} {'samples/s':>10s} {'st/plain':>9s} {'st/compiled':>12s} {'TFLOP/s':>8s} " \
           f"{'peak GiB':>9s} {'warm-up s':>10s}"  # fmt: skip
    print("\n" + head + "\n" + "-" * len(head))

    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    for r in rows:
        print(f"{r['case']:9s} {r['variant']:15s} {r['samples_per_s']:10.2f} {fmt(r.get('ratio_vs_plain'), '9.2f'):>9s} "
              f"{fmt(r.get('ratio_vs_plain+compile'), '12.2f'):>12s} {fmt(r.get('tflops'), '8.3f'):>8s} "
              f"{fmt(r.get('peak_gib'), '9.2f'):>9s} {r['warmup_s']:10.1f}")  # fmt: skip
    if checks:
        print("\ntargets" + (" (smoke: tiny models, not meaningful):" if smoke else ":"))
        for c in checks:
            print(f"  {'ok  ' if c['ok'] else 'MISS'} {c['case']:9s} {c['check']:34s} {c['value']}")


def machine(env: Env) -> dict[str, Any]:
    import diffusers

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "device": str(env.device), "dtype": str(env.dtype).replace("torch.", ""), "smoke": env.smoke,
            "warmup_steps": env.warmup, "timed_steps": env.steps, "compile_backend": env.compile_backend,
            "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled(), "st_sets": env.st_sets,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.machine()}  # fmt: skip
    if env.cuda:
        props = torch.cuda.get_device_properties(env.device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)  # fmt: skip
    else:
        info.update(cpu_threads=torch.get_num_threads())
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models (CPU or GPU), same code")
    parser.add_argument("--cases", default="sd15,sdxl,flux,sd-vae,sdxl-vae")
    parser.add_argument("--variants", default="plain,plain+compile,st,st+compile")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 2)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke on "
                                                                "the CPU: eager, dynamo without code generation)")
    parser.add_argument("--st-set", action="append", default=[], help="override an st option: key=value (TOML)")
    parser.add_argument("--allow-cudnn-sdp", action="store_true", help="leave cuDNN SDPA on for the plain loops")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--json", default="gpu_bench.json", help="where to write the results")
    args = parser.parse_args(argv)

    import logging

    logging.getLogger("st").setLevel(logging.WARNING)
    # An indexed device: torch.cuda.set_device refuses a bare "cuda" on PyTorch 2.11.
    default = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device or default)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if not args.allow_cudnn_sdp:
            torch.backends.cuda.enable_cudnn_sdp(False)
    backend = args.compile_backend or ("eager" if args.smoke and device.type != "cuda" else "inductor")
    env = Env(device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
              warmup=args.warmup if args.warmup is not None else (1 if args.smoke else 3),
              steps=args.steps if args.steps is not None else (2 if args.smoke else 10),
              compile_backend=backend, smoke=args.smoke, st_sets=args.st_set)  # fmt: skip
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    trains, caches = train_cases(args.smoke), cache_cases(args.smoke)
    unknown = [c for c in wanted if c not in trains and c not in caches]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join([*trains, *caches])}")
    started = time.perf_counter()
    print(f"bench/gpu.py on {device} ({'smoke' if args.smoke else 'full'}), compile backend {backend}", flush=True)
    rows: list[dict[str, Any]] = []
    for name in wanted:
        case_started = time.perf_counter()
        if name in trains:
            rows += run_train_case(trains[name], env, variants)
        else:
            rows += run_cache_case(caches[name], env, variants)
        print(f"  {name}: {time.perf_counter() - case_started:.1f} s", flush=True)
        env.reset_memory()
    checks = add_ratios(rows)
    print_table(rows, checks, smoke=env.smoke)
    total = time.perf_counter() - started
    print(f"\ntotal {total:.1f} s")
    doc = {"machine": machine(env), "total_s": total, "rows": rows, "targets": checks,
           "targets_meaningful": not env.smoke}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

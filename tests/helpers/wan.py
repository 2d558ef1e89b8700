"""What the Wan tests share: the tiny models' sizes and the stage runs' options, the pipelines loaded from a tiny Wan
folder (the folders themselves: `tiny_model("wan", flavour=...)`), st's text inputs for them, the pipeline's
transformer calls recorded for replay, its renders (with a LoRA or not), a LoRA trained by hand through a family's
call, the Wan 2.2 stage files of an offline hub cache, and the cached runs of generated clips with what they wrote
(samples, losses, validation videos)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

FRAMES, SIZE = 5, 32  # two latent frames of 8 x 8 with the tiny VAE
PROMPT = "a red circle"
# Validation of a run: FRAMES frames at SIZE px in 2 steps; the stage chains add their training options (SETS).
VALIDATION = ("validation_num_video_frames=5", 'validation_resolution="32"', "validation_num_inference_steps=2")
SETS = (*VALIDATION, "checkpoint_step_interval=1", "learning_rate=0.01", "lora_dropout=0.0",
        "caption_dropout_probability=0.0", 'mixed_precision="no"')  # fmt: skip
VALIDATE_AT_2 = ("validation_disable=false", "validation_step_interval=2")


def pipeline(folder: Path, cls: str = "WanPipeline", **components: Any):
    """The diffusers pipeline `cls` loaded from `folder` (`components` replace its own), progress bars off."""
    import diffusers

    loaded = getattr(diffusers, cls).from_pretrained(str(folder), **components)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def prompt_inputs(pipe, prompt: str = PROMPT) -> dict:
    """st's text inputs for `prompt` (the wan family's encode_prompts + collate_text) from `pipe`'s text encoder."""
    from pipeline.families import get_family

    family = get_family("wan")
    return family.collate_text(family.encode_prompts([pipe.text_encoder], [pipe.tokenizer], [prompt]))


def random_frames(count: int = 2) -> tuple:
    """`count` random SIZE x SIZE PIL images (seed 0: the first is the same for any count)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return tuple(Image.fromarray(rng.uniform(0, 255, (SIZE, SIZE, 3)).astype("uint8")) for _ in range(count))


def pixels(pipe, image, size: int = SIZE):
    """`image` as the pipeline preprocesses it (1 x 3 x size x size, float32 in -1..1)."""
    return pipe.video_processor.preprocess(image, height=size, width=size).float()


class Call(NamedTuple):
    """One recorded transformer call: the pipeline's slot, the module, its keyword arguments and its output."""

    slot: str
    module: Any
    kwargs: dict
    output: Any


@contextmanager
def recorded(pipe, *slots: str) -> Iterator[list[Call]]:
    """The calls of `pipe`'s transformers in `slots` ("transformer" unless named) while the block runs, in order."""
    calls: list[Call] = []

    def recorder(slot: str):
        def record(module, args, kwargs, output):
            calls.append(Call(slot, module, dict(kwargs), output[0]))

        return record

    handles = [getattr(pipe, slot).register_forward_hook(recorder(slot), with_kwargs=True)
               for slot in slots or ("transformer",)]  # fmt: skip
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def call_inputs(steps: int, output_type: str, **inputs: Any) -> dict:
    """A pipeline call at SIZE x SIZE x FRAMES, `steps` steps, guidance 1 and seed 0, updated by `inputs`."""
    import torch

    return {"height": SIZE, "width": SIZE, "num_frames": FRAMES, "num_inference_steps": steps, "guidance_scale": 1.0,
            "output_type": output_type, "generator": torch.Generator().manual_seed(0), **inputs}  # fmt: skip


def pipeline_calls(pipe, *slots: str, steps: int = 1, **inputs: Any) -> list[Call]:
    """The transformer calls (of `slots`, see `recorded`) of one latent-output run of `pipe` (`call_inputs`)."""
    import torch

    with recorded(pipe, *slots) as calls, torch.no_grad():
        pipe(**call_inputs(steps, "latent", **inputs))
    return calls


def render(pipe, steps: int = 2, **inputs: Any) -> np.ndarray:
    """The video frames (1 x FRAMES x SIZE x SIZE x 3, numpy) `pipe` renders (`call_inputs`)."""
    import torch

    with torch.no_grad():
        return pipe(**call_inputs(steps, "np", **inputs)).frames


def render_lora(model: Path, lora: Path | None = None, *, cls: str = "WanPipeline", components: dict | None = None,
                into_transformer_2: bool = False, steps: int = 2, **inputs: Any) -> np.ndarray:  # fmt: skip
    """`render` of a freshly loaded `cls` from `model`, with the LoRA file `lora` loaded (into `transformer_2` when
    asked) and PROMPT's embeddings unless `inputs` hold a prompt."""
    pipe = pipeline(model, cls, **(components or {}))
    if lora is not None:
        load = {"load_into_transformer_2": True} if into_transformer_2 else {}
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, **load)
    if "prompt" not in inputs:
        inputs["prompt_embeds"] = prompt_inputs(pipe)["prompt_embeds"]
    return render(pipe, steps, **inputs)


def lora_by_hand(transformer, latents, predict: Callable, out: Path) -> tuple[list[float], Path]:
    """Two flow-matching steps (AdamW, lr 0.05, seed 3) of a rank-4 LoRA on Wan's targets added to `transformer`,
    `predict(noisy, timesteps)` giving its prediction for `latents`; the losses and the weights file st writes into
    `out`."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    from pipeline.families import get_family, lora, wan

    config = LoraConfig(r=4, lora_alpha=4, target_modules=list(wan.LORA_TARGETS), lora_dropout=0.0)
    lora.add_adapter(transformer, config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=0.05)
    generator = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(2):
        noise = torch.randn(latents.shape, generator=generator)
        sigma = torch.rand(1, generator=generator)
        noisy = (1 - sigma) * latents + sigma * noise
        loss = torch.nn.functional.mse_loss(predict(noisy, sigma * 1000), noise - latents)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(float(loss.detach()))
    return losses, lora.save_weights(get_family("wan"), out, get_peft_model_state_dict(transformer), config)


def sample_clips(root: Path, model: Path) -> Path:
    """Two `st sample-data --video` clips for the tiny Wan model at `model` under root/data (the config as that
    command writes it), prepared into root/prepare and cached into root/cache. Returns the config path."""
    from pipeline.cache.stage import run_cache
    from pipeline.config import load_config
    from pipeline.prepare.stage import run_prepare
    from pipeline.sampledata import write_sample_dataset

    config = write_sample_dataset(root / "data", family="wan", model=model, videos=2)
    loaded = load_config(config)
    run_prepare(loaded, root / "prepare")
    run_cache(loaded, root / "prepare", root / "cache")
    return config


def trained_run(root: Path, model: Path, flavour: str | None, *sets: str, run: str = "run") -> tuple[Path, Path]:
    """Two generated clips cached under `root` for the tiny Wan folder `model` (model_flavour `flavour`), and a
    2-step LoRA run with `sets` validating at step 2 into root/`run`: (config, run folder)."""
    from tests.helpers.training import train
    from tests.helpers.videos import cached_video_dataset

    config = cached_video_dataset(root, "wan", model, videos=2, **({"--model_flavour": flavour} if flavour else {}))
    train(config, root / "cache", root / run, *sets, *VALIDATE_AT_2)
    return config, root / run


def stage_config(flavour: str, **extra: Any):
    """The config fields `denoiser_source` reads, for a run of `flavour` with no transformer override."""
    from types import SimpleNamespace

    return SimpleNamespace(model_flavour=flavour, pretrained_transformer_model_name_or_path=None,
                           pretrained_transformer_subfolder="transformer", pretrained_unet_model_name_or_path=None,
                           pretrained_unet_subfolder="unet", **extra)  # fmt: skip


def assert_same_weights(ours, theirs) -> None:
    """`ours` and `theirs` hold the same tensors, bit for bit, in the same order."""
    import torch

    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"

# diffusers' WanTransformer3DModel names -> Wan's original ones (the inverse of diffusers'
# convert_wan_transformer_to_diffusers for the text-to-video keys)
_TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"), ("attn2", "cross_attn"), (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."),
    (".to_v.", ".v."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), (".norm2.", ".norm3."),
    ("scale_shift_table", "modulation"), ("proj_out", "head.head"),
)  # fmt: skip


def original_state_dict(transformer) -> dict:
    """`transformer`'s weights under Wan's original names, with ComfyUI's `model.diffusion_model.` prefix."""
    out = {}
    for name, tensor in transformer.state_dict().items():
        new = "head.modulation" if name == "scale_shift_table" else name
        for old, replacement in _TO_ORIGINAL:
            new = new.replace(old, replacement)
        out[f"model.diffusion_model.{new}"] = tensor.contiguous()
    return out


def animegen_cache(root: Path, high, low, *, original: bool = True) -> Path:
    """A hub cache holding aidealab/AnimeGen-T2V's high_noise.safetensors / low_noise.safetensors: `high` and `low`'s
    weights in Wan's original format (or diffusers' layout)."""
    from safetensors.torch import save_file

    from pipeline.families import wan22

    repo = root / ("models--" + wan22.ANIMEGEN_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    (repo / "snapshots" / SNAPSHOT).mkdir(parents=True)
    for name, model in (("high_noise.safetensors", high), ("low_noise.safetensors", low)):
        tensors = original_state_dict(model) if original else {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, repo / "snapshots" / SNAPSHOT / name)
    return root


def shifted(transformer, by: float):
    """A copy of `transformer` with every weight moved by `by` (another fine-tune of the same expert)."""
    import copy

    import torch

    other = copy.deepcopy(transformer)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(by)
    return other


def cached_samples(cache: Path) -> list:
    """Every sample of the cache at `cache`, decoded as the trainer's reader decodes it, in key order."""
    from pipeline.manifest import read_manifest
    from pipeline.train.data import CacheIndex, SampleReader

    index = CacheIndex(cache, read_manifest(cache))
    reader = SampleReader()
    try:
        return [reader.sample(index.samples[key]) for key in sorted(index.samples)]
    finally:
        reader.close()


def run_losses(run: Path) -> list[float]:
    """The training losses of a run's metrics.jsonl, in order."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def video_frames(path: Path) -> list[np.ndarray]:
    """The decoded RGB frames of the MP4 at `path`."""
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def vace_control(pipe, size: tuple[int, int] = (SIZE, SIZE), frames: int = FRAMES, **inputs: Any):
    """The `control_hidden_states` WanVACEPipeline hands its transformer at `size` (width, height) x `frames` for
    `inputs` (video / mask), from its first call (`pipeline_calls`)."""
    prompt = prompt_inputs(pipe)["prompt_embeds"]
    calls = pipeline_calls(pipe, height=size[1], width=size[0], num_frames=frames, prompt_embeds=prompt, **inputs)
    return calls[0].kwargs["control_hidden_states"]

"""Wan VACE control latents follow the VACE transformer's `patch_size` (its transformer/config.json), as
`WanVACEPipeline` reads `self.transformer.config.patch_size`: a tiny VACE folder with a real-size (8x) spatial VAE and
patch size (1, 1, 1) caches 40 x 40 clips (multiples of 8, not of 16, so the Wan 2.1 default (1, 2, 2) cannot fold
their masks) with the pipeline's control latents, bit for bit, and trains on them; frames off the VAE x patch grid are
refused with the option to change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.families import wan_vace
from pipeline.manifest import read_manifest
from tests.helpers.training import train
from tests.helpers.videos import moving_square, video_dataset
from tests.helpers.wan import vace_control

PATCH = (1, 1, 1)
FRAMES, SIZE = 5, 40  # the sample clips' window (8 frames) trimmed to 1 + 4k, at a 40 x 40 bucket (alignment 8)
CONTROL = {"id": "controls", "type": "local", "dataset_type": "conditioning", "conditioning_type": "controlnet",
           "instance_data_dir": "controls"}  # fmt: skip
MASK = {"id": "holes", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask",
        "instance_data_dir": "holes"}  # fmt: skip


def _tiny_vace(out: Path) -> None:
    """A tiny WanVACEPipeline folder: the tiny Wan text parts, a Wan VAE with the real 8x spatial factor (three
    down-sampling levels, two temporal) and a VACE transformer of patch size PATCH."""
    from diffusers import AutoencoderKLWan, WanVACEPipeline, WanVACETransformer3DModel

    from pipeline.families import tiny_parts, wan
    from pipeline.families.tokenizers import t5_tokenizer

    tokenizer = t5_tokenizer(wan.MAX_LENGTH)
    tiny_parts.seed_everything(0)
    encoder = tiny_parts.t5_encoder(tokenizer, umt5=True)
    tiny_parts.seed_everything(2)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True], scale_factor_spatial=8,
                           scale_factor_temporal=wan.TEMPORAL_COMPRESSION).eval()  # fmt: skip
    tiny_parts.seed_everything(1)
    transformer = WanVACETransformer3DModel(
        patch_size=PATCH, num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=encoder.config.d_model, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=list(wan_vace.TINY_VACE_LAYERS),
        vace_in_channels=2 * 16 + 8**2,
    ).eval()  # fmt: skip
    pipe = WanVACEPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=wan.tiny_scheduler(),
                           transformer=transformer)  # fmt: skip
    tiny_parts.save(pipe, out)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wan-vace-patch") / "model"
    _tiny_vace(out)
    return out


def _pipe(folder: Path):
    from diffusers import WanVACEPipeline

    pipe = WanVACEPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _paired(root: Path, folder: Path) -> Path:
    """Two sample clips under root/videos at a 40 x 40 bucket (resolution 40, aspect_bucket_alignment 8), each paired
    with a control clip (root/controls) and a mask clip (root/holes) of the same frames and size; the config."""
    from pipeline.sampledata import write_video

    config = video_dataset(root, "wan", folder, videos=2, **{"--model_flavour": "vace-1.3b-2.1",
                                                              "--aspect_bucket_alignment": 8,
                                                              "--validation_resolution": str(SIZE),
                                                              "--cache_dtype": "fp32"})  # fmt: skip
    for spec in (CONTROL, MASK):
        (root / spec["instance_data_dir"]).mkdir()
    for i, video in enumerate(sorted((root / "videos").glob("0*.mp4"))):
        write_video(root / "controls" / video.name, moving_square((64, 64), 16, (40, 40 + 100 * i, 250)), fps=12)
        square = [np.repeat(((f == 255).all(-1, keepdims=True) * 255).astype(np.uint8), 3, axis=-1)
                  for f in moving_square((64, 64), 16, (255, 255, 255))]  # fmt: skip
        write_video(root / "holes" / video.name, square, fps=12)
    datasets = json.loads((root / "multidatabackend.json").read_text())
    datasets[0].update({"resolution": SIZE, "conditioning_data": [CONTROL["id"], MASK["id"]]})
    datasets[1:1] = [dict(CONTROL), dict(MASK)]
    (root / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
    return config


@pytest.fixture(scope="module")
def chain(tmp_path_factory, folder):
    """The paired clips prepared, cached in fp32 and trained for one LoRA step (root, run)."""
    from pipeline.cache.stage import run_cache
    from pipeline.config import load_config
    from pipeline.prepare.stage import run_prepare

    root = tmp_path_factory.mktemp("wan-vace-patch-run")
    config = _paired(root / "data", folder)
    loaded = load_config(config)
    run_prepare(loaded, root / "prepare")
    run_cache(loaded, root / "prepare", root / "cache")
    train(config, root / "cache", root / "run", "max_train_steps=1", "learning_rate=0.01", "lora_dropout=0.0",
          "caption_dropout_probability=0.0")  # fmt: skip
    return root, root / "run"


def test_the_patch_size_is_read_from_the_transformer_config(folder, tmp_path):
    assert wan_vace.transformer_patch_size(str(folder)) == PATCH
    bare = tmp_path / "bare"  # no transformer/config.json: the Wan 2.1 VACE default
    bare.mkdir()
    assert wan_vace.transformer_patch_size(str(bare)) == wan_vace.PATCH_SIZE == (1, 2, 2)


def test_the_cache_holds_the_pipelines_control_latents_for_the_transformers_patch_size(chain, folder):
    """Each cached clip's control latents are WanVACEPipeline's for its control and mask clips (patch (1, 1, 1):
    5 x 5 latent cells of 40 x 40 frames), max difference 0; with the Wan 2.1 default patch size the mask could not
    be folded (refused, naming aspect_bucket_alignment)."""
    from pipeline.cache_reader import COND
    from pipeline.train.data import CacheIndex, SampleReader

    root, _ = chain
    index = CacheIndex(root / "cache", read_manifest(root / "cache"))
    pipe = _pipe(folder)
    assert tuple(pipe.transformer.config.patch_size) == PATCH
    reader = SampleReader()
    try:
        refs = sorted(index.samples.values(), key=lambda r: r.key)
        assert len(refs) == 2
        for ref in refs:
            assert [p["kind"] for p in ref.meta["conditioning"]] == ["controlnet", "mask"]
            stored = reader.tensors(ref, COND)  # the clips' frames as st fitted them to the 40 x 40 bucket
            clip, mask = wan_vace.frames_of(stored["0.pixels"]), wan_vace.frames_of(stored["1.pixels"])
            assert len(clip) == len(mask) == FRAMES and clip[0].size == mask[0].size == (SIZE, SIZE)
            expected = vace_control(pipe, (SIZE, SIZE), FRAMES, video=clip, mask=mask)[0]
            assert stored["0.latent"].shape == expected.shape == (2 * 16 + 64, 2, 5, 5)
            assert float((stored["0.latent"] - expected).abs().max()) == 0.0
    finally:
        reader.close()
    with pytest.raises(InputError, match=r"multiples of 16 x 16 .* patch_size \(1, 2, 2\).* got 40 x 40: set "
                                         "aspect_bucket_alignment"):  # fmt: skip
        wan_vace.control_latents(pipe.vae, wan_vace.PATCH_SIZE, FRAMES, SIZE, SIZE, video=clip, mask=mask)


def test_the_run_trains_a_step_on_the_cached_control_latents(chain):
    _, run = chain
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]  # fmt: skip
    assert len(losses) == 1 and np.isfinite(losses[0]) and losses[0] > 0
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()

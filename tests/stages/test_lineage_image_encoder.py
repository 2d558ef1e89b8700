"""The CLIP image encoder's lineage through the real CLI: `st cache` of a Wan 2.1 image-to-video model records the
`image_encoder/` that made the cached CLIP image embeddings, and `st train` with a model folder whose image encoder
differs (everything else the same) exits 2 naming it, before training."""

from __future__ import annotations

import shutil
import subprocess

from tests.helpers.training import ST, st_env

SETS = ("train_batch_size=1", 'mixed_precision="no"', 'vae_dtype="fp32"', "validation_disable=true",
        "max_train_steps=1", 'report_to="none"')  # fmt: skip


def _st(*args) -> subprocess.CompletedProcess:
    return subprocess.run([ST, *map(str, args)], env=st_env(), capture_output=True, text=True, timeout=600)


def _sets() -> list[str]:
    return [item for s in SETS for item in ("--set", s)]


def test_train_refuses_a_model_whose_clip_image_encoder_differs_from_the_caches(tmp_path):
    import torch
    from transformers import CLIPVisionModel

    from pipeline.families import wan_i2v
    from pipeline.manifest import read_manifest
    from pipeline.sampledata import write_sample_dataset

    cached_model = tmp_path / "cached-model"
    wan_i2v.tiny(cached_model, 0)  # what `st tiny-model wan DIR --flavour i2v` writes
    config = write_sample_dataset(tmp_path / "data", videos=1, family="wan", model=cached_model)  # `st sample-data`
    prepare, cache = tmp_path / "prepare", tmp_path / "cache"
    for command in (["prepare", "-c", config, "-o", prepare, *_sets()],
                    ["cache", "-c", config, "-i", prepare, "-o", cache, *_sets()]):  # fmt: skip
        done = _st(*command)
        assert done.returncode == 0, done.stderr[-3000:]
    recorded = read_manifest(cache)["model"]["image_encoder"]
    assert [part["subfolder"] for part in recorded] == ["image_encoder", "image_processor"]

    # The same model, but one weight of its CLIP vision encoder changed (its VAE, text encoder and transformer equal).
    other = tmp_path / "other-model"
    shutil.copytree(cached_model, other)
    encoder = CLIPVisionModel.from_pretrained(str(other), subfolder="image_encoder")
    with torch.no_grad():
        next(p for n, p in encoder.named_parameters() if n.endswith("post_layernorm.weight")).add_(1.0)
    encoder.save_pretrained(str(other / "image_encoder"))
    for part in ("vae", "text_encoder", "transformer", "image_processor"):
        assert sorted(p.read_bytes() for p in (other / part).iterdir()) == \
            sorted(p.read_bytes() for p in (cached_model / part).iterdir()), part  # fmt: skip

    out = tmp_path / "train"
    done = _st("train", "-c", config, "-i", cache, "-o", out, *_sets(),
               "--set", f'pretrained_model_name_or_path="{other}"')  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert "the CLIP image_encoder of" in message and "differs from the model given" in message, message[-2000:]
    assert "re-run `st cache` with this model" in message
    assert str(other) in "".join(done.stderr.split())  # the folder given (a long path may wrap)
    assert not (out / "final").exists() and not (out / "checkpoints").exists()  # refused before training

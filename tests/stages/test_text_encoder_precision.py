"""`text_encoder_N_precision` in `st cache`: the text encoder that computes the cached embeddings is quantised with
the preset (tiny Flux: 1 = CLIP-L, 2 = T5), which changes the embeddings, the stage key and the manifest; presets and
encoder numbers this machine or the family cannot run stop with exit 2 before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cache.stage import run_cache
from pipeline.cache_reader import CacheReader
from pipeline.config import load_config

# Stated, not SimpleTuner's default (bf16): the embeddings are compared as computed.
FP32 = "cache_dtype='fp32'"
T5_INT8 = "text_encoder_2_precision='int8-quanto'"


def cache(setup: tuple[Path, Path], out: Path, *sets: str):
    root, config = setup
    return run_cache(load_config(config, [FP32, *sets]), root / "prepare", out)


def embeddings(out: Path) -> dict[tuple[str, int], dict]:
    """(sample id, caption index) -> the cached text tensors, plus the shared empty prompt under ("", 0)."""
    reader = CacheReader(out)
    found = {(s.key, i): text for s in reader for i, text in enumerate(s.texts)}
    found[("", 0)] = reader.prompt("")
    return found


@pytest.fixture(scope="module")
def runs(cached, tmp_path_factory):
    """On the flux sample data, in one output folder: a cache with an int8 T5 (its embeddings read), the same run
    again, then a run without quantisation."""
    setup = cached("flux")
    out = tmp_path_factory.mktemp("te-precision") / "cache"
    quantised = cache(setup, out, T5_INT8)
    quantised_embeddings = embeddings(out)
    quantised_latents = {s.key: s.latent for s in CacheReader(out)}
    again = cache(setup, out, T5_INT8)
    plain = cache(setup, out)
    return {"int8": quantised, "int8 again": again, "plain": plain, "int8 embeddings": quantised_embeddings,
            "int8 latents": quantised_latents}  # fmt: skip


def test_int8_t5_changes_the_t5_embeddings_slightly_and_nothing_else(runs):
    import torch

    before, after = embeddings(runs["plain"].out_dir), runs["int8 embeddings"]
    assert before.keys() == after.keys() and len(before) > 1
    for where, text in before.items():
        # CLIP (encoder 1) computes the pooled embedding: untouched.
        assert torch.equal(text["pooled_prompt_embeds"], after[where]["pooled_prompt_embeds"]), where
        t5, t5_int8 = text["prompt_embeds"], after[where]["prompt_embeds"]
        assert not torch.equal(t5, t5_int8), where
        assert torch.allclose(t5, t5_int8, rtol=0.1, atol=0.05 * t5.abs().max().item()), where
    for sample in CacheReader(runs["plain"].out_dir):
        assert torch.equal(sample.latent, runs["int8 latents"][sample.key])


def test_precision_enters_the_key_and_the_manifest(runs):
    quantised, plain = runs["int8"].manifest, runs["plain"].manifest
    assert plain["key"] != quantised["key"]
    assert quantised["config"]["text_encoder_2_precision"] == "int8-quanto"
    assert quantised["config"]["text_encoder_1_precision"] == "no_change"
    assert plain["config"]["text_encoder_2_precision"] == "no_change"


def test_same_precision_is_up_to_date_another_reencodes(runs):
    assert runs["int8 again"].up_to_date
    plain = runs["plain"]
    assert not plain.up_to_date
    assert plain.encoded == runs["int8"].manifest["stats"]["samples"] > 0 and plain.reused == 0


@pytest.mark.parametrize(("setting", "message"), [
    ("text_encoder_3_precision='int8-quanto'", "text_encoder_3_precision is int8-quanto, but flux has 2 text encoder"),
    ("text_encoder_1_precision='int4-torchao'", "text_encoder_1_precision int4-torchao"),
])  # fmt: skip
def test_refused_precisions_exit_2_naming_the_option(cli, cached, tmp_path, setting, message):
    root, config = cached("flux")
    result = cli("cache", "-c", config, "-i", root / "prepare", "-o", tmp_path / "cache", "--set", setting)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "cache").exists()


def test_cuda_preset_is_refused_on_a_cpu(cli, cached, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    root, config = cached("flux")
    result = cli("cache", "-c", config, "-i", root / "prepare", "-o", tmp_path / "cache",
                 "--set", "text_encoder_2_precision='nf4-bnb'")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "text_encoder_2_precision nf4-bnb (bitsandbytes NF4) needs a CUDA GPU" in " ".join(result.output.split())

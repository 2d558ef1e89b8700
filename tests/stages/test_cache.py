"""`st cache` on tiny real models of every family: what a user sees in the shards, re-runs, damage, resume and parts.

Tiny models and one prepared sample dataset are built once per session; tests that change a dataset or an output
work on their own copy. Every cache output made from the shared dataset sits in one folder (`runs`), so outputs
can be compared with each other.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cache_reader import CacheReader
from pipeline.cache.stage import merge_parts, run_cache
from pipeline.config import load_config
from pipeline.errors import ConfigError, InputError, ManifestError
from pipeline.families import get_family
from pipeline.manifest import read_manifest
from pipeline.prepare.stage import run_prepare
from pipeline.sampledata import write_sample_dataset
from tests.helpers.files import make_image

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ("sd1x", "sd2x", "sdxl", "sd3", "flux", "pixart_sigma")
IMAGES = 6
FP32 = "cache_dtype='fp32'"
FP32_VAE = "vae_dtype='fp32'"  # the VAE itself in fp32, where a test compares with an fp32 encode (bf16 is the default
# on a CPU with AVX512-BF16 / AMX)


# ---------------------------------------------------------------------------------------------------- helpers


def make_dataset(folder: Path, model: Path, family: str = "sd1x", images: int = IMAGES) -> Path:
    """`st sample-data` output whose config names the model family and the model (relative to the config file)."""
    config = write_sample_dataset(folder, images=images)
    raw = json.loads(config.read_text())
    raw["--model_family"] = family
    raw["--pretrained_model_name_or_path"] = os.path.relpath(model, folder)
    config.write_text(json.dumps(raw, indent=2) + "\n")
    return config


def prepare(config: Path, out: Path) -> Path:
    run_prepare(load_config(config), out)
    return out


def model_sets(family: str, model: Path) -> list[str]:
    return [f"model_family='{family}'", f"pretrained_model_name_or_path='{model}'"]


def cache(config: Path, prep: Path, out: Path, *sets: str, **kwargs):
    return run_cache(load_config(config, list(sets)), prep, out, **kwargs)


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "shards").rglob("*.tar"))}  # fmt: skip


def file_states(out: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(out).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(out.rglob("*")) if p.is_file()}  # fmt: skip


def read_all(out: Path) -> dict[str, object]:
    """Every sample of a cache output by sample id (reading verifies each shard)."""
    return {sample.key: sample for sample in CacheReader(out)}


def prepared_rows(prep: Path) -> tuple[list[dict], dict[str, str]]:
    manifest = read_manifest(prep, stage="prepare")
    return pq.read_table(prep / "samples.parquet").to_pylist(), {d["id"]: d["root"] for d in manifest["datasets"]}


def vae_config(model: Path) -> dict:
    return json.loads((model / "vae" / "config.json").read_text())


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and on a busy machine two threads can take many times longer. Runs
    compared byte for byte all use one thread (the subprocess gets OMP_NUM_THREADS=1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory, tiny_model):
    """The shared sample dataset (sd1x in its config), prepared once: (config path, prepare folder)."""
    root = tmp_path_factory.mktemp("shapes")
    config = make_dataset(root / "data", tiny_model("sd1x"))
    return config, prepare(config, root / "prepare")


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """`runs(name)`: a new, empty output folder beside every other output of the shared dataset."""
    root = tmp_path_factory.mktemp("runs")
    counter = itertools.count()
    return lambda name: root / f"{next(counter):02d}-{name}"


@pytest.fixture(scope="session")
def shape_cache(shapes, tiny_model, runs):
    """`shape_cache(family, *sets)`: a cache output of the shared dataset, made once per (family, sets). Read only."""
    made: dict[tuple, Path] = {}
    config, prep = shapes

    def get(family: str, *sets: str) -> Path:
        key = (family, sets)
        if key not in made:
            out = runs(family)
            result = cache(config, prep, out, *model_sets(family, tiny_model(family)), *sets)
            assert not result.up_to_date and result.encoded == IMAGES
            made[key] = out
        return made[key]

    return get


@pytest.fixture
def own_dataset(tmp_path, tiny_model):
    """A private copy of the sample dataset (sd1x), prepared: (config path, images folder, prepare folder)."""
    config = make_dataset(tmp_path / "data", tiny_model("sd1x"))
    return config, tmp_path / "data" / "images", prepare(config, tmp_path / "prepare")


# ------------------------------------------------------------------------------------------ shapes and dtypes


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_caches_latents_of_the_bucket_size(family, cached, tiny_model):
    """On the session's shared cache of each family (tests/conftest.py: 8 images, the default cache_dtype)."""
    root, _ = cached(family)
    out, prep = root / "cache", root / "prepare"
    rows, _ = prepared_rows(prep)
    reader = CacheReader(out)
    manifest = reader.manifest
    vae = vae_config(tiny_model(family))
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    channels = get_family(family).latent_channels
    assert manifest["family"] == family and manifest["cache_dtype"] == "bf16"
    assert manifest["vae"]["scaling_factor"] == vae["scaling_factor"]
    assert manifest["vae"]["shift_factor"] == vae.get("shift_factor")
    assert manifest["vae"]["latent_channels"] == channels == vae["latent_channels"]
    assert manifest["stats"] == {"samples": len(rows), "skipped": {}, "shards": len(manifest["shards"])}

    samples = read_all(out)
    assert sorted(samples) == sorted(r["sample_id"] for r in rows)
    by_id = {r["sample_id"]: r for r in rows}
    for sample_id, sample in samples.items():
        row = by_id[sample_id]
        width, height = sample.meta["target_size"]
        assert (width, height) == (row["target_width"], row["target_height"])
        assert sample.meta["bucket"] == row["bucket"] == f"{width}x{height}"
        assert tuple(sample.latent.shape) == (channels, height // factor, width // factor)
        assert sample.latent.dtype.is_floating_point and str(sample.latent.dtype) == "torch.bfloat16"
        assert bool(sample.latent.float().isfinite().all()) and float(sample.latent.float().std()) > 0
        assert sample.meta["captions"] == list(row["captions"]) and len(sample.texts) == len(row["captions"])
        for text in sample.texts:
            assert {str(t.dtype) for t in text.values() if t.is_floating_point()} == {"torch.bfloat16"}
    assert reader.prompt("")  # the empty prompt is always among the shared prompts


# --------------------------------------------------------------------------------------- embeddings, latents


def _pipeline_embeddings(family: str, pipe, caption: str) -> dict:
    """What the family's diffusers pipeline gives the denoiser for one caption (batch of one)."""
    if family in ("sd1x", "sd2x"):
        embeds, _ = pipe.encode_prompt(caption, "cpu", 1, False)
        return {"prompt_embeds": embeds}
    if family == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(caption, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)  # fmt: skip
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(caption, None, None, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)  # fmt: skip
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if family == "flux":
        embeds, pooled, _ = pipe.encode_prompt(caption, None, device="cpu", num_images_per_prompt=1)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    assert family == "pixart_sigma"
    embeds, mask, _, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False, device="cpu",
                                            clean_caption=False)  # fmt: skip
    # The transformer masks padded positions: what it sees there does not matter, and the cache stores zeros.
    return {"prompt_embeds": embeds.masked_fill(mask[..., None] == 0, 0.0), "attention_mask": mask}


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_embeddings_equal_the_pipelines_encode_prompt(family, shape_cache, tiny_model):
    import torch

    fam = get_family(family)
    model = tiny_model(family)
    reader = CacheReader(shape_cache(family, FP32))
    pipe = fam.load_pipeline_class().from_pretrained(str(model))
    checked = 0
    with torch.no_grad():
        for sample in reader:
            for i, caption in enumerate(sample.meta["captions"]):
                got = fam.collate_text([sample.texts[i]])
                expected = _pipeline_embeddings(family, pipe, caption)
                assert sorted(got) == sorted(expected), caption
                for name, want in expected.items():
                    assert got[name].dtype == want.dtype and got[name].shape == want.shape, (caption, name)
                    assert torch.allclose(got[name], want, atol=1e-6, rtol=0), (caption, name)
                checked += 1
        empty = fam.collate_text([reader.prompt("")])
        for name, want in _pipeline_embeddings(family, pipe, "").items():
            assert torch.allclose(empty[name], want, atol=1e-6, rtol=0), name
    assert checked == IMAGES


@pytest.mark.parametrize("family", ["sd1x", "flux"])
def test_cached_latent_is_the_scaled_vae_sample_of_the_prepared_pixels(family, shapes, shape_cache, tiny_model):
    import torch
    from diffusers import AutoencoderKL

    from pipeline.cache.encode import sample_seed
    from pipeline.cache.images import job_for, load_pixels

    config, prep = shapes
    out = shape_cache(family, FP32, FP32_VAE)
    vae = AutoencoderKL.from_pretrained(str(tiny_model(family)), subfolder="vae").eval()
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    seed = load_config(config).config.seed or 0
    rows, roots = prepared_rows(prep)
    samples = read_all(out)
    for row in rows:
        pixels = load_pixels(job_for(row, roots[row["dataset_id"]]))
        assert tuple(pixels.shape) == (3, row["target_height"], row["target_width"])
        with torch.no_grad():
            dist = vae.encode(pixels[None]).latent_dist
        generator = torch.Generator().manual_seed(sample_seed(seed, row["sample_id"]))
        noise = torch.randn(dist.mean.shape[1:], generator=generator)
        expected = (dist.mean[0] + dist.std[0] * noise - (shift or 0.0)) * scale
        latent = samples[row["sample_id"]].latent
        assert latent.dtype == torch.float32
        assert torch.allclose(latent, expected, atol=1e-5, rtol=1e-5), row["path"]


# ----------------------------------------------------------------------------------------------------- re-runs


def test_only_new_or_changed_images_are_encoded(own_dataset, tiny_model, tmp_path):
    from PIL import Image

    config, images, prep = own_dataset
    out = tmp_path / "cache"
    first = cache(config, prep, out)
    assert (first.encoded, first.reused) == (IMAGES, 0)
    before = read_all(out)

    make_image(images / "new_0.png", size=(128, 128), colour=(1, 2, 3))
    (images / "new_0.txt").write_text("a new dark square\n")
    make_image(images / "new_1.jpg", size=(160, 120), colour=(250, 250, 5))
    (images / "new_1.txt").write_text("a new yellow rectangle\n")
    prepare(config, prep)
    added = cache(config, prep, out)
    assert not added.up_to_date
    assert (added.encoded, added.reused) == (2, IMAGES)
    after = read_all(out)
    assert len(after) == IMAGES + 2
    for sample_id, sample in before.items():  # untouched samples keep their exact latents
        assert after[sample_id].latent.equal(sample.latent)

    edited = sorted(images.glob("*.png"))[0]
    with Image.open(edited) as img:
        img = img.convert("RGB")
    img.paste((0, 255, 255), (0, 0, 40, 40))
    img.save(edited)
    prepare(config, prep)
    changed = cache(config, prep, out)
    assert (changed.encoded, changed.reused) == (1, IMAGES + 1)
    assert len(read_all(out)) == IMAGES + 2

    vae = cache(config, prep, out, f"pretrained_vae_model_name_or_path='{tiny_model('sd1x', seed=1)}'")
    assert (vae.encoded, vae.reused) == (IMAGES + 2, 0)
    relatents = read_all(out)
    assert len(relatents) == IMAGES + 2
    common = set(relatents) & set(after)  # all but the edited image
    assert len(common) == IMAGES + 1
    assert not any(relatents[k].latent.equal(after[k].latent) for k in common)


def test_another_vae_dtype_encodes_every_image_again(tiny_model, tmp_path):
    """Two small images: bf16 is emulated on CPUs without it, several seconds per encoded image."""
    config = write_sample_dataset(tmp_path / "data", images=2, resolution=64, family="sd1x", model=tiny_model("sd1x"))
    prep = prepare(config, tmp_path / "prepare")
    out = tmp_path / "cache"
    assert cache(config, prep, out, "vae_dtype='fp32'").encoded == 2
    dtype = cache(config, prep, out, "vae_dtype='bf16'")
    assert (dtype.encoded, dtype.reused) == (2, 0)
    assert dtype.manifest["vae"]["dtype"] == "bf16"


def test_unchanged_inputs_are_up_to_date_and_touch_nothing(shapes, runs, tiny_model, tmp_path):
    config, prep = shapes
    out = runs("up-to-date")
    assert not cache(config, prep, out).up_to_date
    states = file_states(out)
    again = cache(config, prep, out)
    assert again.up_to_date and again.encoded == 0
    assert file_states(out) == states
    # Options that cannot change the cached bytes, and where the model lives, do not matter.
    moved_model = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_model("sd1x"), moved_model)
    for sets in (["learning_rate=3e-4"], ["max_workers=0"],
                 [f"pretrained_model_name_or_path='{moved_model}'"]):  # fmt: skip
        result = cache(config, prep, out, *sets)
        assert result.up_to_date, sets
        assert file_states(out) == states, sets


def test_two_runs_write_identical_bytes(shapes, runs, tmp_path):
    config, prep = shapes
    first = cache(config, prep, runs("identical"))
    second = cache(config, prep, tmp_path / "somewhere" / "else")  # another folder, at another depth
    assert shard_hashes(first.out_dir) == shard_hashes(second.out_dir) != {}
    assert first.manifest["outputs"] == second.manifest["outputs"]
    assert first.manifest["digest"] == second.manifest["digest"]


# Runs `st` with the arguments after the marker path; at st's "wrote shard" log line (the first shard and its sidecar
# are under their final names) it creates the marker file and waits to be killed.
STOP_AFTER_FIRST_SHARD = """\
import logging, pathlib, sys, threading
from pipeline.cli import main

marker = pathlib.Path(sys.argv[1])

class StopAfterFirstShard(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("wrote shard "):
            marker.write_text(record.getMessage())
            threading.Event().wait()

logging.getLogger("st").addHandler(StopAfterFirstShard())
sys.argv = ["st", *sys.argv[2:]]
main()
"""


def test_killed_run_resumes_to_the_same_output(tmp_path, tiny_model):
    images = 8
    config = make_dataset(tmp_path / "data", tiny_model("sd1x"), images=images)
    prep = prepare(config, tmp_path / "prepare")
    sets = ["cache_shard_samples=1", "vae_batch_size=1", "max_workers=0"]
    killed, marker = tmp_path / "killed", tmp_path / "first-shard-written"
    command = [sys.executable, "-c", STOP_AFTER_FIRST_SHARD, str(marker), "-v", "cache", "-c", str(config), "-i",
               str(prep), "-o", str(killed), *itertools.chain.from_iterable(("--set", s) for s in sets)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as this process (see one_thread): the same bytes
    log = tmp_path / "stderr.txt"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, f"st cache ended before writing a shard:\n{log.read_text()}"
            assert time.monotonic() < deadline, "st cache wrote no shard in 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "manifest.json").exists()
    # Whatever lies under a final shard name is a whole shard with its sidecar.
    from pipeline.shards import read_shard

    finished = sorted(killed.rglob("*.tar"))
    assert finished
    for path in finished:
        assert path.with_suffix(".json").is_file()
        samples = list(read_shard(path, expected_sha256=None))
        assert len(samples) == 1 and set(samples[0][1]) >= {"json", "latent.safetensors.zst"}

    resumed = cache(config, prep, killed, *sets)
    reference = cache(config, prep, tmp_path / "uninterrupted", *sets)
    assert reference.encoded == images
    assert not resumed.up_to_date and resumed.manifest["provenance"]["kept_shards"] >= 1
    assert resumed.encoded < images and resumed.encoded + resumed.reused == images
    assert resumed.manifest["digest"] == reference.manifest["digest"]
    assert shard_hashes(killed) == shard_hashes(reference.out_dir)
    assert not list(killed.rglob("*.tmp"))
    assert len(read_all(killed)) == images


def test_damaged_shard_is_refused_and_rebuilt(shape_cache, shapes, tmp_path):
    config, prep = shapes
    good = shape_cache("sd1x")
    out = tmp_path / "damaged"
    shutil.copytree(good, out)
    shard = out / CacheReader(out).shards[1]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ManifestError) as error:
        read_all(out)
    assert str(shard) in str(error.value)

    result = cache(config, prep, out)
    assert not result.up_to_date
    assert any("damaged" in reason for reason in result.reasons), result.reasons
    assert shard_hashes(out) == shard_hashes(good)
    assert result.manifest["digest"] == read_manifest(good)["digest"]
    assert len(read_all(out)) == IMAGES


def test_moved_output_needs_nothing_else(own_dataset, tmp_path):
    config, images, prep = own_dataset
    out = tmp_path / "cache"
    cache(config, prep, out)
    before = read_all(out)
    moved = tmp_path / "far" / "away" / "cache"
    shutil.copytree(out, moved)
    for folder in (out, prep, images):
        shutil.rmtree(folder)
    after = read_all(moved)
    assert sorted(after) == sorted(before)
    for key, sample in before.items():
        assert after[key].latent.equal(sample.latent)
        assert after[key].meta == sample.meta
    assert CacheReader(moved).prompt("")


def test_reshard_without_source_images_reuses_every_entry(own_dataset, tmp_path):
    """Entries the previous output holds need no source image, even when shard membership changes."""
    config, images, prep = own_dataset
    out = tmp_path / "cache"
    cache(config, prep, out)
    before = read_all(out)
    for path in images.rglob("*.png"):
        path.unlink()
    for path in images.rglob("*.jpg"):
        path.unlink()
    again = cache(config, prep, out, "cache_shard_samples=1")
    assert (again.encoded, again.reused) == (0, len(before))
    after = read_all(out)
    assert {k: v.latent for k, v in after.items()}.keys() == before.keys()
    assert all(after[k].latent.equal(before[k].latent) for k in before)


def test_parts_merge_into_the_single_run_output(shapes, runs, shape_cache):
    config, prep = shapes
    single = shape_cache("sd1x")
    a, b = runs("part-a"), runs("part-b")
    first = cache(config, prep, a, part="0/2")
    second = cache(config, prep, b, part="1/2")
    assert first.manifest is None and second.manifest is None
    assert first.encoded + second.encoded == IMAGES and first.encoded and second.encoded
    merged = merge_parts(load_config(config), prep, [a, b], runs("merged"))
    assert merged.manifest["digest"] == read_manifest(single)["digest"]
    assert shard_hashes(merged.out_dir) == shard_hashes(single)
    assert len(read_all(merged.out_dir)) == IMAGES

    with pytest.raises(InputError, match=r"1 of 2.*missing|missing.*1 of 2"):
        merge_parts(load_config(config), prep, [a], runs("merged-incomplete"))


# -------------------------------------------------------------------------------------------------- bad input


def test_prepare_manifest_of_another_schema_version_is_refused(shapes, tmp_path):
    config, prep = shapes
    copy = tmp_path / "prepare"
    shutil.copytree(prep, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema"] = "st.prepare/99"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"st\.prepare/99"):
        cache(config, copy, tmp_path / "cache")
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_missing_source_image_stops_or_is_skipped(own_dataset, tmp_path):
    config, images, prep = own_dataset
    rows, _ = prepared_rows(prep)
    gone = rows[0]
    (images / gone["path"]).unlink()
    with pytest.raises(InputError, match="ignore_missing_files") as error:
        cache(config, prep, tmp_path / "cache")
    assert gone["path"] in str(error.value)
    assert not (tmp_path / "cache" / "manifest.json").exists()

    result = cache(config, prep, tmp_path / "cache", "ignore_missing_files=true")
    assert result.manifest["stats"]["skipped"] == {"missing_source": 1}
    assert result.manifest["stats"]["samples"] == IMAGES - 1
    samples = read_all(tmp_path / "cache")
    assert len(samples) == IMAGES - 1 and gone["sample_id"] not in samples


def test_incomplete_model_folder_names_the_missing_component(shapes, tiny_model, tmp_path):
    config, prep = shapes
    broken = tmp_path / "model"
    shutil.copytree(tiny_model("sd1x"), broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(InputError) as error:
        cache(config, prep, tmp_path / "cache", f"pretrained_model_name_or_path='{broken}'")
    assert "vae" in str(error.value).replace(str(tmp_path), "")


def test_unknown_or_missing_model_family_lists_the_families(shapes, tmp_path):
    config, prep = shapes
    with pytest.raises(ConfigError) as error:
        cache(config, prep, tmp_path / "cache", "model_family='sd9'")
    assert all(name in str(error.value) for name in FAMILIES)
    raw = json.loads(config.read_text())
    del raw["--model_family"]
    no_family = tmp_path / "config.json"
    no_family.write_text(json.dumps(raw))
    (tmp_path / "multidatabackend.json").write_text((config.parent / "multidatabackend.json").read_text())
    with pytest.raises(ConfigError) as error:
        cache(no_family, prep, tmp_path / "cache")
    assert "model_family" in str(error.value) and all(name in str(error.value) for name in FAMILIES)


# ---------------------------------------------------------------------------------------------------------- CLI


def test_cli_flow_reports_the_shards_then_up_to_date(cli, tmp_path):
    assert cli("tiny-model", "sd1x", tmp_path / "model").exit_code == 0
    assert cli("sample-data", tmp_path / "data", "--images", IMAGES).exit_code == 0
    config = tmp_path / "data" / "config.json"
    raw = json.loads(config.read_text())
    raw.update({"--model_family": "sd1x", "--pretrained_model_name_or_path": "../model"})
    config.write_text(json.dumps(raw))
    assert cli("prepare", "-c", config, "-o", tmp_path / "out" / "prepare").exit_code == 0

    args = ("cache", "-c", config, "-i", tmp_path / "out" / "prepare", "-o", tmp_path / "out" / "cache")
    first = cli(*args)
    assert first.exit_code == 0, first.output
    for column in ("dataset", "bucket", "shards", "samples", "bytes", "total"):
        assert column in first.stdout
    assert "skipped: none" in first.stdout
    assert f"cache: wrote ({IMAGES} encoded, 0 reused)" in first.stdout
    second = cli(*args)
    assert second.exit_code == 0, second.output
    assert "cache: up to date" in second.stdout
    assert len(read_all(tmp_path / "out" / "cache")) == IMAGES

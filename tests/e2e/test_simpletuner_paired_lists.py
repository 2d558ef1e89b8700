"""SimpleTuner's own paired-data dataset lists (the ControlNet guide's, the Dreambooth guide's masked-loss and
regularisation lists) prepare unchanged once their folders exist. The lists are copied from SimpleTuner's
documentation; only absolute folders (/training/...) are moved under the test's folder, which a test cannot create."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from PIL import Image

from tests.helpers.training import ST, st_env

# documentation/CONTROLNET.md, "Example dataloader configuration".
CONTROLNET_LIST = [
    {"id": "antelope-data", "type": "local", "dataset_type": "image", "conditioning_data": "antelope-conditioning",
     "instance_data_dir": "datasets/animals/antelope-data", "caption_strategy": "instanceprompt",
     "instance_prompt": "an antelope", "metadata_backend": "discovery", "minimum_image_size": 512,
     "maximum_image_size": 1024, "target_downsample_size": 1024, "cache_dir_vae": "cache/vae/sdxl/antelope-data",
     "crop": True, "crop_aspect": "square", "crop_style": "center", "resolution": 1024, "resolution_type": "pixel_area",
     "cache_file_suffix": "controlnet-sdxl"},
    {"id": "antelope-conditioning", "type": "local", "dataset_type": "conditioning",
     "instance_data_dir": "datasets/animals/antelope-conditioning", "caption_strategy": "instanceprompt",
     "instance_prompt": "an antelope", "metadata_backend": "discovery", "crop": True, "crop_aspect": "square",
     "crop_style": "center", "resolution": 1024, "minimum_image_size": 512, "maximum_image_size": 1024,
     "target_downsample_size": 1024, "resolution_type": "pixel_area", "cache_file_suffix": "controlnet-sdxl"},
    {"id": "an example backend for text embeds.", "dataset_type": "text_embeds", "default": True, "type": "local",
     "cache_dir": "cache/text/sdxl-base/controlnet"},
]  # fmt: skip

# documentation/CONTROLNET.md, "Example: Multi-Task Conditioning Dataset".
MULTITASK_LIST = [
    {"id": "multitask-training", "type": "local", "instance_data_dir": "/datasets/high-quality-images",
     "caption_strategy": "filename", "resolution": 512,
     "conditioning": [
         {"type": "superresolution", "blur_radius": 2.0, "noise_level": 0.02,
          "captions": ["enhance image quality", "increase resolution", "sharpen"]},
         {"type": "jpeg_artifacts", "quality_range": [20, 40], "captions": ["remove compression", "fix jpeg artifacts"]},
         {"type": "canny", "low_threshold": 50, "high_threshold": 150},
     ]},
    {"id": "text-embed-cache", "dataset_type": "text_embeds", "default": True, "type": "local",
     "cache_dir": "cache/text/sdxl"},
]  # fmt: skip

# documentation/DREAMBOOTH.md, "Masked loss".
MASKED_LIST = [
    {"id": "dreambooth-data", "type": "local", "dataset_type": "image", "conditioning_data": "dreambooth-conditioning",
     "instance_data_dir": "/training/datasets/test_datasets/dreambooth",
     "cache_dir_vae": "/training/cache/vae/sdxl/dreambooth-data", "caption_strategy": "instanceprompt",
     "instance_prompt": "an dreambooth", "metadata_backend": "discovery", "resolution": 1024,
     "minimum_image_size": 1024, "maximum_image_size": 1024, "target_downsample_size": 1024, "crop": True,
     "crop_aspect": "square", "crop_style": "center", "resolution_type": "pixel_area"},
    {"id": "dreambooth-conditioning", "type": "local", "dataset_type": "conditioning",
     "instance_data_dir": "/training/datasets/test_datasets/dreambooth_mask", "resolution": 1024,
     "minimum_image_size": 1024, "maximum_image_size": 1024, "target_downsample_size": 1024, "crop": True,
     "crop_aspect": "square", "crop_style": "center", "resolution_type": "pixel_area", "conditioning_type": "mask"},
    {"id": "an example backend for text embeds.", "dataset_type": "text_embeds", "default": True, "type": "local",
     "cache_dir": "/training/cache/text/sdxl-base/masked_loss"},
]  # fmt: skip

# documentation/DREAMBOOTH.md, "Regularisation data" (the 512 px pair).
REGULARISATION_LIST = [
    {"id": "subjectname-data-512px", "type": "local", "instance_data_dir": "/training/datasets/subjectname",
     "caption_strategy": "instanceprompt", "instance_prompt": "subjectname",
     "cache_dir_vae": "/training/vae_cache/subjectname", "repeats": 100, "crop": False, "resolution": 512,
     "resolution_type": "pixel_area", "minimum_image_size": 192},
    {"id": "regularisation-data", "type": "local", "instance_data_dir": "/training/datasets/regularisation",
     "caption_strategy": "instanceprompt", "instance_prompt": "a picture of a man",
     "cache_dir_vae": "/training/vae_cache/regularisation", "repeats": 0, "resolution": 512,
     "resolution_type": "pixel_area", "minimum_image_size": 192, "is_regularisation_data": True},
    {"id": "textembeds", "type": "local", "dataset_type": "text_embeds", "default": True,
     "cache_dir": "/training/text_cache/sdxl_base"},
]  # fmt: skip


def _moved(entries: list[dict], root: Path) -> list[dict]:
    """The list with its absolute folders moved under `root`."""
    moved = []
    for entry in entries:
        entry = dict(entry)
        for key in ("instance_data_dir", "cache_dir", "cache_dir_vae"):
            if str(entry.get(key, "")).startswith("/"):
                entry[key] = str(root) + entry[key]
        moved.append(entry)
    return moved


def _images(folder: Path, size: int, names=("a.png", "b.png"), colour=(180, 60, 60)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (size, size), (colour[0], colour[1] + 40 * i, colour[2])).save(folder / name)


def _prepare(tmp_path: Path, entries: list[dict], **options) -> dict:
    (tmp_path / "multidatabackend.json").write_text(json.dumps(entries))
    config = {"--data_backend_config": "multidatabackend.json", "--train_batch_size": 1, **options}
    (tmp_path / "config.json").write_text(json.dumps(config))
    done = subprocess.run([ST, "prepare", "-c", str(tmp_path / "config.json"), "-o", str(tmp_path / "prepare")],
                          env=st_env(), capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((tmp_path / "prepare/manifest.json").read_text())


def test_the_controlnet_guide_list_pairs_each_image_with_its_conditioning_image(tmp_path):
    _images(tmp_path / "datasets/animals/antelope-data", 640)
    _images(tmp_path / "datasets/animals/antelope-conditioning", 640, colour=(10, 10, 10))
    manifest = _prepare(tmp_path, CONTROLNET_LIST)
    [conditioning] = manifest["conditioning_datasets"]
    assert (conditioning["id"], conditioning["conditioning_type"], conditioning["paired"]) == (
        "antelope-conditioning", "controlnet", 2)
    assert manifest["datasets"][0]["conditioning_data"] == ["antelope-conditioning"]


def test_the_dreambooth_masked_loss_list_pairs_each_image_with_its_mask(tmp_path):
    entries = _moved(MASKED_LIST, tmp_path)
    _images(Path(entries[0]["instance_data_dir"]), 1024)
    _images(Path(entries[1]["instance_data_dir"]), 1024, colour=(255, 215, 215))
    manifest = _prepare(tmp_path, entries)
    [masks] = manifest["conditioning_datasets"]
    assert (masks["conditioning_type"], masks["paired"]) == ("mask", 2)


def test_the_dreambooth_regularisation_list_marks_its_regularisation_dataset(tmp_path):
    entries = _moved(REGULARISATION_LIST, tmp_path)
    _images(Path(entries[0]["instance_data_dir"]), 512)
    _images(Path(entries[1]["instance_data_dir"]), 512, colour=(60, 60, 180))
    manifest = _prepare(tmp_path, entries)
    by_id = {d["id"]: d for d in manifest["datasets"]}
    assert by_id["regularisation-data"]["is_regularisation_data"] is True
    assert "is_regularisation_data" not in by_id["subjectname-data-512px"]
    assert by_id["regularisation-data"]["samples"] == 2


def test_the_controlnet_guide_multitask_list_generates_its_three_datasets(tmp_path):
    entries = _moved(MULTITASK_LIST, tmp_path)
    _images(Path(entries[0]["instance_data_dir"]), 512, names=("a_red_square.png",))
    manifest = _prepare(tmp_path, entries)
    generated = {c["id"]: c for c in manifest["conditioning_datasets"]}
    assert sorted(generated) == ["multitask-training_conditioning_canny", "multitask-training_conditioning_jpeg_artifacts",
                                 "multitask-training_conditioning_superresolution"]  # fmt: skip
    assert all(c["paired"] == 1 and c["generator"] for c in generated.values())
    import pyarrow.parquet as pq

    [row] = pq.read_table(tmp_path / "prepare/samples.parquet").to_pylist()
    assert row["captions"][0] == "a red square" and "sharpen" in row["captions"]


def test_st_check_lists_the_conditioning_datasets_and_names_a_missing_folder(tmp_path, tiny_model):
    _images(tmp_path / "datasets/animals/antelope-data", 640)
    (tmp_path / "multidatabackend.json").write_text(json.dumps(CONTROLNET_LIST))
    (tmp_path / "config.json").write_text(json.dumps({
        "--data_backend_config": "multidatabackend.json", "--model_family": "sd1x",
        "--pretrained_model_name_or_path": str(tiny_model("sd1x"))}))  # fmt: skip
    done = subprocess.run([ST, "check", "-c", str(tmp_path / "config.json")], env=st_env(), capture_output=True,
                          text=True, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "dataset 'antelope-conditioning': instance_data_dir" in done.stdout + done.stderr
    _images(tmp_path / "datasets/animals/antelope-conditioning", 640)
    done = subprocess.run([ST, "check", "-c", str(tmp_path / "config.json")], env=st_env(), capture_output=True,
                          text=True, cwd=tmp_path)  # fmt: skip
    assert "1 conditioning dataset(s): antelope-conditioning (controlnet)" in done.stdout + done.stderr

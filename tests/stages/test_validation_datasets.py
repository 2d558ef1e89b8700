"""validation_using_datasets (pipeline.train.validation_datasets): validation renders img2img from the first
num_eval_images images of each dataset, by path, with their captions, named `<dataset>_<n>`, reproducibly under the
seed; a dataset with `disable_validation: true` gives none; families and modes st does not render this way stop with
exit 2 naming the option."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cache.images import fitted_pixels
from pipeline.config import load_config
from pipeline.errors import ConfigError, InputError
from pipeline.families import get_family
from tests.helpers.training import train

VALIDATE = ["validation_disable=false", "validation_using_datasets=true", "num_eval_images=2",
            "validation_step_interval=1", "validation_num_inference_steps=10", "validation_resolution=64",
            "max_train_steps=2", "learning_rate=0", "seed=3"]  # fmt: skip


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _collect(root: Path, config: Path, *sets: str):
    from pipeline.cache_reader import CacheReader
    from pipeline.train.validation_datasets import collect

    loaded = load_config(config, ["num_eval_images=3", "validation_num_inference_steps=10", *sets])
    reader = CacheReader(root / "cache")
    return collect(loaded, get_family("sd1x"), reader.root, reader.manifest, reader.shared_embeds())


def _dataset_list(tmp_path: Path, root: Path, **keys) -> str:
    entries = json.loads((root / "data" / "multidatabackend.json").read_text())
    entries[0].update(instance_data_dir=str(root / "data" / "images"), **keys)
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(entries))
    return f'data_backend_config="{path}"'


def test_validation_renders_dataset_images_reproducibly(cached, tmp_path):
    root, config = cached("sd1x")
    out = tmp_path / "out"
    train(config, root / "cache", out, *VALIDATE)
    images = root / "data" / "images"
    firsts = sorted(p for p in images.iterdir() if p.suffix != ".txt")[:2]
    for step in ("step-1", "step-2"):
        names = sorted(p.name for p in (out / "validation" / step).glob("*.png"))
        # The dataset images replace the validation prompt: no render of validation_prompt.
        assert names == ["grid.png", "shapes_0-64x64-0.png", "shapes_0-64x64-input.png", "shapes_1-64x64-0.png",
                         "shapes_1-64x64-input.png"], names  # fmt: skip
        for n, source in enumerate(firsts):  # the input is the dataset image as training saw it (96x96 bucket)
            fitted = fitted_pixels(Image.open(source).convert("RGB"), (96, 96), (0, 0, 96, 96))
            expected = Image.fromarray(((fitted + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
            expected = np.asarray(expected.resize((64, 64), Image.Resampling.LANCZOS), dtype=np.int16)
            assert np.array_equal(_pixels(out / "validation" / step / f"shapes_{n}-64x64-input.png"), expected)
    # learning_rate 0: the weights do not change, so each step's renders are the same under the seed.
    folder = out / "validation"
    for name in ("shapes_0-64x64-0.png", "shapes_1-64x64-0.png"):
        assert np.array_equal(_pixels(folder / "step-1" / name), _pixels(folder / "step-2" / name))
    # ... and img2img starts from the image: two different dataset images give different renders.
    render = [_pixels(out / "validation" / "step-1" / f"shapes_{n}-64x64-0.png") for n in (0, 1)]
    assert np.abs(render[0] - render[1]).mean() > 1.0


def test_inputs_are_the_first_images_by_path_with_their_cached_captions(cached):
    from pipeline.cache_reader import CacheReader
    from pipeline.train.data import CacheIndex, SampleReader

    root, config = cached("sd1x")
    prompts = _collect(root, config)
    images = root / "data" / "images"
    captions = [p.read_text().strip() for p in sorted(images.glob("*.txt"))[:3]]
    assert [p.name for p in prompts] == ["shapes_0", "shapes_1", "shapes_2"]
    assert [p.text for p in prompts] == captions
    reader = CacheReader(root / "cache")
    index, samples = CacheIndex(reader.root, reader.manifest), SampleReader()
    try:
        by_caption = {ref.meta["captions"][0]: samples.sample(ref).captions[0] for ref in index.samples.values()}
    finally:
        samples.close()
    for prompt in prompts:  # the caption's embeddings as `st cache` stored them for that image
        stored = by_caption[prompt.text]
        assert stored.keys() == prompt.embeds.keys() and all(stored[k].equal(prompt.embeds[k]) for k in stored)


def test_disable_validation_and_eval_dataset_id_choose_the_datasets(cached, tmp_path):
    root, config = cached("sd1x")
    assert len(_collect(root, config, _dataset_list(tmp_path, root, disable_validation=False))) == 3
    with pytest.raises(InputError, match="disable_validation"):
        _collect(root, config, _dataset_list(tmp_path, root, disable_validation=True))
    with pytest.raises(ConfigError, match="eval_dataset_id.*names no image dataset"):
        _collect(root, config, 'eval_dataset_id="elsewhere"')
    assert [p.name for p in _collect(root, config, 'eval_dataset_id="shapes"')][:1] == ["shapes_0"]


@pytest.mark.parametrize(("family", "sets", "message"), [
    ("kolors", [], "model_family kolors has no img2img validation pipeline"),
    ("pixart_sigma", [], "model_family pixart_sigma has no img2img validation pipeline"),
    ("flux", ['model_flavour="kontext"'], "Flux Kontext validates through its paired reference images"),
    ("wan", [], "model_family wan validates from its conditioning"),
    ("sd1x", ["controlnet=true"], "with controlnet"),
    ("sd1x", ["validation_num_inference_steps=4"], "at least 5"),
])  # fmt: skip
def test_unsupported_families_and_modes_are_refused(cached, family, sets, message):
    from pipeline.train.validation_datasets import check

    _, config = cached("sd1x")
    loaded = load_config(config, ["validation_using_datasets=true", "validation_num_inference_steps=10",
                                  f'model_family="{family}"', *sets])  # fmt: skip
    with pytest.raises(ConfigError, match=f"validation_using_datasets.*{message}"):
        check(loaded.config, get_family(family))


def test_st_train_stops_with_exit_2_before_any_step(cached, cli, tmp_path):
    root, config = cached("sd1x")
    out = tmp_path / "train"
    result = cli("train", "-c", config, "-i", root / "cache", "-o", out, "--set", "validation_using_datasets=true",
                 "--set", "validation_disable=false", "--set", "validation_num_inference_steps=4")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "validation_num_inference_steps 4 gives no step" in result.output
    assert not (out / "checkpoints").exists()

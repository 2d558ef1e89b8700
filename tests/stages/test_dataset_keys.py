"""SimpleTuner's caption and sample-count dataset keys through `st prepare` on tiny image folders:
caption_filter_list (on the text_embeds entry), max_num_samples, disable_multiline_split and caption_shuffle."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError, InputError
from pipeline.prepare.stage import run_prepare
from tests.helpers.files import make_image, write_config


def run(config_path: Path, out: Path, *sets: str, **kwargs):
    return run_prepare(load_config(config_path, list(sets)), out, **kwargs)


def captions(out: Path) -> dict[str, list[str]]:
    return {r["path"]: r["captions"] for r in pq.read_table(out / "samples.parquet").to_pylist()}


def folder(root: Path, name: str, texts: list[str], shade: int = 0) -> Path:
    data = root / name
    for i, text in enumerate(texts):
        make_image(data / f"img_{i}.png", size=(64, 64), colour=(20 * i, 90, 160 - shade))
        (data / f"img_{i}.txt").write_text(text)
    return data


def config_with(root: Path, entries: list[dict], **options) -> Path:
    return write_config(root, entries, resolution=64, aspect_bucket_alignment=32, **options)


def test_filter_file_rewrites_every_caption_and_a_changed_file_reruns(tmp_path, caplog):
    folder(tmp_path, "data", ["arafed cat sitting on a mat\nthere is a dog", "a photo of a cat, blurry"])
    filters = tmp_path / "filters.txt"
    # SimpleTuner's forms: text to remove (its trailing space kept), a regular expression, a substitution.
    filters.write_text("arafed \n^there is \ns/cat/kitten/\n, blurry$\n")
    config = config_with(tmp_path, [
        {"id": "main", "instance_data_dir": "data", "caption_strategy": "textfile"},
        {"id": "embeds", "dataset_type": "text_embeds", "default": True, "caption_filter_list": "filters.txt"},
    ])  # fmt: skip
    out = tmp_path / "out"
    first = run(config, out)
    assert captions(out) == {"img_0.png": ["kitten sitting on a mat", "a dog"], "img_1.png": ["a photo of a kitten"]}
    assert run(config, out).up_to_date

    filters.write_text("s/cat/tiger/\n")
    edited = run(config, out)
    assert not edited.up_to_date and edited.manifest["key"] != first.manifest["key"]
    assert edited.manifest["provenance"]["reused_files"] == 2  # the images are not read again
    assert captions(out) == {"img_0.png": ["arafed tiger sitting on a mat", "there is a dog"],
                             "img_1.png": ["a photo of a tiger, blurry"]}  # fmt: skip


def test_filters_follow_the_text_embeds_entry_a_dataset_uses(tmp_path):
    folder(tmp_path, "a", ["a red car"])
    folder(tmp_path, "b", ["a red bus"], shade=50)
    (tmp_path / "filters.json").write_text(json.dumps(["red "]))
    config = config_with(tmp_path, [
        {"id": "uses_alt", "instance_data_dir": "a", "caption_strategy": "textfile", "text_embeds": "alt"},
        {"id": "uses_default", "instance_data_dir": "b", "caption_strategy": "textfile",
         "prepend_instance_prompt": True, "instance_prompt": "red"},
        {"id": "plain", "dataset_type": "text_embeds", "default": True},
        {"id": "alt", "dataset_type": "text_embeds", "caption_filter_list": "filters.json"},
    ])  # fmt: skip
    out = tmp_path / "out"
    run(config, out)
    rows = pq.read_table(out / "samples.parquet").to_pylist()
    assert {r["dataset_id"]: r["captions"] for r in rows} == {"uses_alt": ["a car"], "uses_default": ["red a red bus"]}

    # An inline list on the default entry: the instance prompt prepended first, then filtered (SimpleTuner filters
    # the finished prompt).
    config = config_with(tmp_path, [
        {"id": "d", "instance_data_dir": "b", "caption_strategy": "textfile", "prepend_instance_prompt": True,
         "instance_prompt": "red"},
        {"id": "embeds", "dataset_type": "text_embeds", "caption_filter_list": ["^red ", "s/bus/tram"]},
    ])  # fmt: skip
    run(config, tmp_path / "inline")
    assert captions(tmp_path / "inline") == {"img_0.png": ["a red tram"]}


def test_filter_list_mistakes_stop_with_exit_2(tmp_path, cli):
    folder(tmp_path, "data", ["a cat"])
    image = {"id": "main", "instance_data_dir": "data", "caption_strategy": "textfile"}
    config = config_with(tmp_path, [image, {"id": "embeds", "dataset_type": "text_embeds",
                                            "caption_filter_list": "missing.txt"}])  # fmt: skip
    result = cli("prepare", "-c", config, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert "dataset 'main'" in message and "caption_filter_list" in message
    assert str(tmp_path / "missing.txt") in message and "does not exist" in message
    assert not (tmp_path / "out").exists()

    with pytest.raises(ConfigError, match=r"caption_filter_list is read on a `dataset_type: text_embeds` entry only"):
        run(config_with(tmp_path, [{**image, "caption_filter_list": ["x"]}]), tmp_path / "o2")
    with pytest.raises(ConfigError, match=r"substitution 's/\(cat/dog' is not a valid regular expression"):
        run(config_with(tmp_path, [image, {"id": "e", "dataset_type": "text_embeds",
                                           "caption_filter_list": ["s/(cat/dog"]}]), tmp_path / "o3")  # fmt: skip
    (tmp_path / "filters.csv").write_text("cat\n")
    with pytest.raises(ConfigError, match=r"a \.txt file .* or a \.json file"):
        run(config_with(tmp_path, [image, {"id": "e", "dataset_type": "text_embeds",
                                           "caption_filter_list": "filters.csv"}]), tmp_path / "o4")  # fmt: skip


def simpletuner_subset(data: Path, dataset_id: str, limit: int) -> set[str]:
    """SimpleTuner's `_apply_max_num_samples_limit`, written out: sorted paths, shuffled by the dataset id."""
    paths = sorted(str(p) for p in data.resolve().glob("*.png"))
    random.Random(dataset_id).shuffle(paths)
    return {Path(p).name for p in paths[:limit]}


def test_max_num_samples_keeps_simpletuners_fixed_subset(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="st")
    data = folder(tmp_path, "data", [f"caption {i}" for i in range(8)])
    config = config_with(tmp_path, [{"id": "reg", "instance_data_dir": "data", "caption_strategy": "textfile",
                                     "max_num_samples": 3}])  # fmt: skip
    result = run(config, tmp_path / "out")
    kept = set(captions(tmp_path / "out"))
    assert kept == simpletuner_subset(data, "reg", 3) and len(kept) == 3
    (entry,) = result.manifest["datasets"]
    assert (entry["files"], entry["samples"], entry["skipped"], entry["capped"]) == (8, 3, 0, 5)
    assert result.manifest["stats"]["files"] == 8 and result.manifest["stats"]["skipped"] == {}
    assert result.manifest["provenance"]["probed_files"] == 3  # the files left out are never read
    assert "dataset 'reg': max_num_samples 3 keeps 3 of 8 files" in caplog.text

    assert set(captions(run(config, tmp_path / "again", force=True).out_dir)) == kept  # same subset every run
    lifted = run(config, tmp_path / "out", "resolution=64", force=False)
    assert lifted.up_to_date
    config = config_with(tmp_path, [{"id": "reg", "instance_data_dir": "data", "caption_strategy": "textfile",
                                     "max_num_samples": 0}])  # fmt: skip
    result = run(config, tmp_path / "out")
    assert not result.up_to_date and len(captions(tmp_path / "out")) == 8
    assert "capped" not in result.manifest["datasets"][0]


def test_disable_multiline_split_reads_one_caption(tmp_path):
    folder(tmp_path, "data", ["first line\n\n  second   line\n"])
    entry = {"id": "main", "instance_data_dir": "data", "caption_strategy": "textfile"}
    run(config_with(tmp_path, [entry]), tmp_path / "split")
    assert captions(tmp_path / "split") == {"img_0.png": ["first line", "second line"]}
    run(config_with(tmp_path, [{**entry, "disable_multiline_split": True}]), tmp_path / "whole")
    assert captions(tmp_path / "whole") == {"img_0.png": ["first line\nsecond line"]}


def test_caption_shuffle_adds_simpletuners_tag_orders(tmp_path):
    folder(tmp_path, "data", ["dog, running, park, sunny day"])
    entry = {"id": "main", "instance_data_dir": "data", "caption_strategy": "textfile",
             "caption_shuffle": {"enable": True, "count": 2, "seed": 42, "position_start": 1}}  # fmt: skip
    run(config_with(tmp_path, [entry]), tmp_path / "out")
    # SimpleTuner's CaptionShuffler gives these three for this caption and block.
    assert captions(tmp_path / "out") == {"img_0.png": [
        "dog, running, park, sunny day", "dog, park, running, sunny day", "dog, sunny day, running, park"]}
    # The instance prompt is prepended to each variant after shuffling; enable false shuffles nothing.
    prompted = {**entry, "prepend_instance_prompt": True, "instance_prompt": "sks"}
    run(config_with(tmp_path, [prompted]), tmp_path / "prompted")
    assert captions(tmp_path / "prompted")["img_0.png"][1] == "sks dog, park, running, sunny day"
    off = {**entry, "caption_shuffle": {**entry["caption_shuffle"], "enable": False}}
    run(config_with(tmp_path, [off]), tmp_path / "off")
    assert captions(tmp_path / "off") == {"img_0.png": ["dog, running, park, sunny day"]}
    with pytest.raises(ConfigError, match=r"caption_shuffle.split_on must be one of comma, space, period"):
        run(config_with(tmp_path, [{**entry, "caption_shuffle": {"enable": True, "split_on": "tab"}}]), tmp_path / "x")
    with pytest.raises(ConfigError, match=r"caption_shuffle.count must be a positive whole number"):
        run(config_with(tmp_path, [{**entry, "caption_shuffle": {"enable": True, "count": 0}}]), tmp_path / "y")


def test_missing_filter_file_is_an_input_error(tmp_path):
    folder(tmp_path, "data", ["a cat"])
    config = config_with(tmp_path, [{"id": "main", "instance_data_dir": "data", "caption_strategy": "textfile"},
                                    {"id": "e", "dataset_type": "text_embeds", "caption_filter_list": "gone.json"}])
    with pytest.raises(InputError, match=r"dataset 'main': caption_filter_list of text_embeds dataset 'e'"):
        run(config, tmp_path / "out")


def test_filters_warn_that_validation_prompts_stay_as_written(tmp_path, caplog):
    folder(tmp_path, "data", ["a cat"])
    config = config_with(tmp_path, [{"id": "main", "instance_data_dir": "data", "caption_strategy": "textfile"},
                                    {"id": "e", "dataset_type": "text_embeds", "caption_filter_list": ["cat"]}],
                         validation_prompt="a cat")  # fmt: skip
    caplog.set_level(logging.INFO, logger="st")
    run(config, tmp_path / "out")
    assert "caption_filter_list of text_embeds dataset 'e' rewrites dataset captions only" in caplog.text
    assert captions(tmp_path / "out") == {"img_0.png": ["a"]}


def test_cache_encodes_every_caption_the_keys_make(tmp_path, tiny_model):
    """`st cache` on such a prepare output: one stored text per caption (shuffled copies, a multi-line caption), and a
    caption the filters empty is the empty prompt."""
    import torch

    from pipeline.cache.stage import run_cache
    from pipeline.cache_reader import CacheReader

    folder(tmp_path, "data", ["red, green, blue\nsecond line", "arafed"])
    config = config_with(tmp_path, [
        {"id": "main", "instance_data_dir": "data", "caption_strategy": "textfile", "disable_multiline_split": True,
         "caption_shuffle": {"enable": True, "count": 1, "seed": 3}},
        {"id": "embeds", "dataset_type": "text_embeds", "caption_filter_list": ["arafed"]},
    ])  # fmt: skip
    prep = tmp_path / "prep"
    run(config, prep)
    by_path = captions(prep)
    assert by_path["img_1.png"] == [""] and len(by_path["img_0.png"]) == 2
    assert "\n" in by_path["img_0.png"][0]
    sets = ["model_family='sd1x'", f"pretrained_model_name_or_path='{tiny_model('sd1x')}'", "cache_dtype='fp32'"]
    run_cache(load_config(config, sets), prep, tmp_path / "cache")
    reader = CacheReader(tmp_path / "cache")
    rows = {r["sample_id"]: r for r in pq.read_table(prep / "samples.parquet").to_pylist()}
    empty = reader.prompt("")
    for sample in reader:
        assert len(sample.texts) == len(rows[sample.key]["captions"])
        if rows[sample.key]["path"] == "img_1.png":
            assert torch.equal(sample.texts[0]["prompt_embeds"], empty["prompt_embeds"])

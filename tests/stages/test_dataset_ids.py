"""Dataset ids with dots, as SimpleTuner's own examples write them (`ltxvideo2-2.5-disney-video-768x512-49f`), through
`st prepare`, `st cache` and `st train`: the cache stores each dataset's samples under its id (and in shards named
after it), training reads them, and the eval loss of a dotted eval dataset is reported under its id."""

from __future__ import annotations

import json

from PIL import Image

from pipeline.cache_reader import CacheReader
from pipeline.config import load_config
from pipeline.prepare.stage import run_prepare
from pipeline.sampledata import write_images
from tests.helpers.files import write_config
from tests.helpers.training import QUICK

SUBJECT, MASKS, HELD = "subject-v1.5", "masks.v2", "held.out-2.0"


def test_dotted_ids_through_prepare_cache_and_train(cli, tiny_model, tmp_path):
    data = tmp_path / "data"
    images = write_images(data / "subject", 2)
    write_images(data / "held", 1, seed=1)
    (data / "masks").mkdir()
    for path in images:  # all-white masks: every pixel counts, so the loss is the plain one
        Image.new("L", Image.open(path).size, 255).save(data / "masks" / f"{path.stem}.png")
    datasets = [
        {"id": SUBJECT, "type": "local", "instance_data_dir": str(data / "subject"), "caption_strategy": "textfile",
         "conditioning_data": MASKS},
        {"id": MASKS, "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask",
         "instance_data_dir": str(data / "masks")},
        {"id": HELD, "type": "local", "dataset_type": "eval", "instance_data_dir": str(data / "held"),
         "caption_strategy": "textfile"},
        {"id": "text-embeds.sd1x", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]  # fmt: skip
    config = write_config(tmp_path / "config", datasets, model_family="sd1x",
                          pretrained_model_name_or_path=str(tiny_model("sd1x")), resolution=64,
                          resolution_type="pixel_area", aspect_bucket_alignment=32, seed=0, model_type="lora",
                          lora_rank=4, learning_rate=1e-3, caption_dropout_probability=0.0, mixed_precision="no",
                          eval_steps_interval=2, num_eval_images=1)  # fmt: skip
    sets = [item for s in QUICK for item in ("--set", s)]
    for command in (["prepare", "-c", config, "-o", tmp_path / "prepare"],
                    ["cache", "-c", config, "-i", tmp_path / "prepare", "-o", tmp_path / "cache"],
                    ["train", "-c", config, "-i", tmp_path / "cache", "-o", tmp_path / "train", *sets]):  # fmt: skip
        result = cli(*command)
        assert result.exit_code == 0, result.output[-3000:]

    prepared = json.loads((tmp_path / "prepare" / "manifest.json").read_text())
    assert [d["id"] for d in prepared["datasets"]] == [SUBJECT, HELD]
    cache = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert sorted(d["id"] for d in cache["datasets"]) == sorted([SUBJECT, HELD])
    # One shard per (dataset, bucket), named `<id>-<12 hex>-000000.tar` with the id as written.
    shards = {s["dataset_id"]: s for s in cache["shards"]}
    assert sorted(shards) == sorted([SUBJECT, HELD]) and len(cache["shards"]) == 2
    for ident, shard in shards.items():
        folder, name = shard["path"].rsplit("/", 1)
        assert folder == f"shards/{shard['bucket']}" and name.startswith(f"{ident}-") and name.endswith("-000000.tar")
        assert len(name) == len(ident) + len("-0123456789ab-000000.tar")
    # Each cached sample carries its dataset's id; the subject's carry their dotted mask partner.
    by_dataset: dict[str, set[str]] = {}
    for sample in CacheReader(tmp_path / "cache"):
        by_dataset.setdefault(sample.meta["dataset_id"], set()).add(sample.key)
        if sample.meta["dataset_id"] == SUBJECT:
            assert [c["kind"] for c in sample.meta["conditioning"]] == ["mask"]
    assert {d: len(k) for d, k in by_dataset.items()} == {SUBJECT: 2, HELD: 1}

    # Training read the subject's two samples (and never the eval sample), and evaluated the dotted eval dataset.
    trained = {k for line in (tmp_path / "train" / "logs" / "data-rank0.jsonl").read_text().splitlines()
               for k in json.loads(line).get("keys", [])}  # fmt: skip
    assert trained == by_dataset[SUBJECT]
    records = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(r["loss"] > 0 for r in records if "loss" in r)
    evals = [r for r in records if "eval_loss" in r]
    assert evals and all(r[f"eval_loss/{HELD}"] == r["eval_loss"] > 0 for r in evals)


def test_a_generated_dataset_of_a_dotted_id_is_written_under_its_id(tmp_path):
    data = tmp_path / "data"
    write_images(data / "images", 1)
    datasets = [{"id": "photos.v2", "instance_data_dir": "images", "caption_strategy": "textfile",
                 "conditioning": [{"type": "canny"}]}]  # fmt: skip
    config = write_config(data, datasets, resolution=64, resolution_type="pixel_area", aspect_bucket_alignment=32)
    out = tmp_path / "prepare"
    run_prepare(load_config(config), out)
    import pyarrow.parquet as pq

    [row] = pq.read_table(out / "samples.parquet").to_pylist()
    [partner] = row["conditioning"]
    assert partner["dataset_id"] == "photos.v2_conditioning_canny"
    assert (out / "conditioning" / "photos.v2_conditioning_canny" / partner["path"]).is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert any(o["path"] == f"conditioning/photos.v2_conditioning_canny/{partner['path']}" for o in manifest["outputs"])

"""Parsing `type: aws|huggingface|csv` dataset entries (SimpleTuner's keys), offline; the download store's rules on
names and changed objects, on a local folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.datasets import load_datasets
from pipeline.errors import ConfigError, NotSupportedError
from pipeline.sources import CsvSource, HubSource, S3Source
from pipeline.sources.store import DownloadStore, RemoteObject, safe_rel


def _load(tmp_path: Path, entry: dict):
    (tmp_path / "multidatabackend.json").write_text(json.dumps([{"id": "remote", **entry}]))
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": "multidatabackend.json"}))
    return load_datasets(load_config(tmp_path / "config.json"))


AWS = {"type": "aws", "aws_bucket_name": "bucket", "aws_data_prefix": "images/", "aws_endpoint_url": "http://127.0.0.1:9000",
       "aws_region_name": None, "aws_access_key_id": "id", "aws_secret_access_key": "secret",
       "aws_max_pool_connections": "16", "caption_strategy": "textfile"}  # fmt: skip


def test_an_aws_entry_takes_simpletuners_keys_and_records_no_credential(tmp_path):
    [spec] = _load(tmp_path, AWS)
    assert spec.source == S3Source("bucket", "images", "http://127.0.0.1:9000", None, "id", "secret", None, 16)
    assert spec.caption_strategy == "textfile"
    described = json.dumps(spec.describe())
    assert "secret" not in described and '"bucket": "bucket"' in described
    # SimpleTuner reads the prefix from instance_data_dir when aws_data_prefix is absent.
    [spec] = _load(tmp_path, {**{k: v for k, v in AWS.items() if k != "aws_data_prefix"}, "instance_data_dir": "x/"})
    assert spec.source.prefix == "x"


@pytest.mark.parametrize("change, message", [
    ({"aws_bucket_name": None}, "needs 'aws_bucket_name'"),
    ({"aws_secret_access_key": None}, "give both aws_access_key_id and aws_secret_access_key"),
    ({"aws_max_pool_connections": 0}, "aws_max_pool_connections must be at least 1"),
    ({"dataset_name": "user/set"}, "unknown dataset key 'dataset_name'"),
    ({"caption_strategy": "huggingface"}, "caption_strategy 'huggingface' is only for `type: huggingface`"),
])  # fmt: skip
def test_bad_aws_entries_name_the_key(tmp_path, change, message):
    entry = {k: v for k, v in {**AWS, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, entry)


def test_a_huggingface_entry_reads_its_block_and_top_level_keys(tmp_path):
    entry = {"type": "huggingface", "dataset_name": "user/set", "caption_strategy": "huggingface",
             "metadata_backend": "huggingface", "num_proc": 4,
             "huggingface": {"image_column": "Image", "caption_column": ["short", "long"], "file_extension": "jpg",
                             "fallback_caption_column": "tags", "revision": "v1", "width_column": "w"}}  # fmt: skip
    [spec] = _load(tmp_path, entry)
    assert spec.source == HubSource("user/set", "train", "v1", "Image", ("short", "long"), "tags")
    assert spec.caption_strategy == "parquet" and spec.parquet.filename_column == "filename"
    [spec] = _load(tmp_path, {**entry, "caption_strategy": "instanceprompt", "instance_prompt": "a domokun"})
    assert spec.caption_strategy == "instanceprompt"


@pytest.mark.parametrize("change, error, message", [
    ({"streaming": True}, NotSupportedError, "`streaming: true` is not supported"),
    ({"huggingface": {"filter_func": {"collection": "a"}}}, NotSupportedError, "`filter_func`"),
    ({"caption_strategy": "textfile"}, ConfigError, "takes caption_strategy 'huggingface'"),
    ({"dataset_name": ""}, ConfigError, "needs 'dataset_name'"),
    ({"huggingface": {"colour": 1}}, ConfigError, "unknown key 'huggingface.colour'"),
])  # fmt: skip
def test_bad_huggingface_entries_are_refused(tmp_path, change, error, message):
    with pytest.raises(error, match=message):
        _load(tmp_path, {"type": "huggingface", "dataset_name": "user/set", **change})


def test_a_csv_entry_resolves_its_file_beside_the_list(tmp_path):
    [spec] = _load(tmp_path, {"type": "csv", "csv_file": "list.csv", "csv_caption_column": "caption",
                              "csv_cache_dir": "/elsewhere", "caption_strategy": "csv"})  # fmt: skip
    assert spec.source == CsvSource(tmp_path / "list.csv", "url", "caption")


def test_remote_conditioning_datasets_and_other_storage_types_are_refused(tmp_path):
    with pytest.raises(NotSupportedError, match="storage type 'webshart' is not supported yet"):
        _load(tmp_path, {"type": "webshart", "source": "user/set"})
    (tmp_path / "pics").mkdir()
    entries = [{"id": "pics", "instance_data_dir": "pics", "conditioning_data": "edges"},
               {"id": "edges", "type": "aws", "dataset_type": "conditioning", "aws_bucket_name": "b"}]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(entries))
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": "multidatabackend.json"}))
    with pytest.raises(NotSupportedError, match="storage type 'aws' is not supported yet for this dataset"):
        load_datasets(load_config(tmp_path / "config.json"))


def test_names_that_would_leave_the_view_are_refused():
    assert safe_rel("a/b.png") and not any(map(safe_rel, ["../a.png", "/a.png", "a//b.png", "a/./b.png", ""]))


def test_the_store_fetches_only_new_or_changed_objects_and_drops_unlisted_ones(tmp_path):
    calls = []

    def source(name: str, data: bytes):
        def fetch() -> bytes:
            calls.append(name)
            return data

        return fetch

    store = DownloadStore(tmp_path / "store")
    first = [RemoteObject("a.png", "v1", source("a", b"\x89PNG one")), RemoteObject("b", "v1", source("b", b"\xff\xd8\xffjpg"),
             name_by_content=True), RemoteObject("../c.png", "v1", source("c", b"x"))]  # fmt: skip
    result = store.sync("d", first, [])
    assert sorted(p.name for p in result.root.iterdir()) == ["a.png", "b.jpg"]
    assert [(f.rel, f.reason) for f in result.failures] == [("../c.png", "unsafe_name")]
    assert calls == ["a", "b"]
    again = store.sync("d", [RemoteObject("a.png", "v2", source("a2", b"\x89PNG two")), first[1]], [])
    assert calls == ["a", "b", "a2"] and again.stats["downloaded"] == 1 and again.stats["reused"] == 1
    assert (again.root / "a.png").read_bytes() == b"\x89PNG two"
    store.sync("d", [first[0]], [])  # b is gone from the source, and the view; its blob is collected
    assert sorted(p.name for p in result.root.iterdir()) == ["a.png"]
    assert len([p for p in (tmp_path / "store/blobs").rglob("*") if p.is_file()]) == 1

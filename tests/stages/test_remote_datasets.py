"""Remote datasets (`type: aws`, `huggingface`, `csv`): st prepare downloads them into OUT/.st/downloads and st cache
reads them from there; against moto's S3 server and an HTTP server on loopback, and a `datasets` folder on disk."""

from __future__ import annotations

import csv
import io
import json
import uuid
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.manifest import read_manifest
from tests.helpers.servers import file_server, moto_s3

SECRET = "st-test-secret-" + uuid.uuid4().hex[:8]
SD = "sd1x"


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """No credentials from a profile or instance metadata: only what the dataset entry gives."""
    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture(scope="module")
def sample(tmp_path_factory, tiny_model):
    """Four sample images with .txt captions and a config for the tiny sd1x model (its dataset list is rewritten by
    each test)."""
    from pipeline.sampledata import write_sample_dataset

    root = tmp_path_factory.mktemp("remote-sample")
    config = write_sample_dataset(root, images=4, family=SD, model=tiny_model(SD), resolution=64)
    return root, config


def _dataset_list(config: Path, entry: dict) -> Path:
    base = {"id": "remote", "crop": False, "resolution": 64, "resolution_type": "pixel_area"}
    (config.parent / "multidatabackend.json").write_text(json.dumps([{**base, **entry}]))
    return config


def _prepare(config: Path, out: Path):
    from pipeline.prepare.stage import run_prepare

    return run_prepare(load_config(config, ["train_batch_size=1"]), out)


def _skipped(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]


def _samples(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(out / "samples.parquet").to_pylist()


def _s3_entry(s3_endpoint: str, bucket: str) -> dict:
    return {"type": "aws", "aws_bucket_name": bucket, "aws_data_prefix": "shapes/", "aws_endpoint_url": s3_endpoint,
            "aws_region_name": None, "aws_access_key_id": "testing", "aws_secret_access_key": SECRET,
            "aws_max_pool_connections": 4, "caption_strategy": "textfile"}  # fmt: skip


def test_aws_dataset_prepares_caches_and_reruns_without_downloads(sample, s3_endpoint, aws_env, tmp_path, st_log):
    import boto3

    from pipeline.cache.stage import run_cache

    root, config = sample
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key=SECRET)  # fmt: skip
    bucket = f"st-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    files = sorted(p for p in (root / "images").iterdir() if p.is_file())
    for path in files:
        s3.put_object(Bucket=bucket, Key=f"shapes/{path.name}", Body=path.read_bytes())
    s3.put_object(Bucket=bucket, Key="elsewhere/not-this.png", Body=files[0].read_bytes())
    _dataset_list(config, _s3_entry(s3_endpoint, bucket))
    out = tmp_path / "prepare"
    logs = st_log()

    first = _prepare(config, out)
    samples = _samples(out)
    assert len(samples) == 4 and all(s["captions"] for s in samples)
    local = {p.stem: p.read_text().strip() for p in files if p.suffix == ".txt"}
    assert {Path(s["path"]).stem: s["captions"][0] for s in samples} == local
    source = first.manifest["datasets"][0]["source"]
    assert source["bucket"] == bucket and source["downloaded"] == 8 and source["failed"] == 0
    written = [p for p in out.rglob("*") if p.is_file()]
    assert not any(SECRET.encode() in p.read_bytes() for p in written)  # never recorded
    assert not any(SECRET in r.getMessage() for r in logs)

    cache = run_cache(load_config(config), out, tmp_path / "cache")
    assert cache.manifest["stats"]["samples"] == 4

    blobs = {p: p.stat().st_mtime_ns for p in (out / ".st/downloads/blobs").rglob("*") if p.is_file()}
    again = _prepare(config, out)
    assert again.up_to_date  # nothing downloaded, nothing rebuilt
    assert {p: p.stat().st_mtime_ns for p in blobs} == blobs

    changed = files[0] if files[0].suffix != ".txt" else files[1]
    from tests.helpers.files import make_image

    make_image(tmp_path / "new.png", size=(80, 64), colour=(10, 200, 40))
    s3.put_object(Bucket=bucket, Key=f"shapes/{changed.name}", Body=(tmp_path / "new.png").read_bytes())
    third = _prepare(config, out)
    assert not third.up_to_date
    source = third.manifest["datasets"][0]["source"]
    assert (source["downloaded"], source["reused"]) == (1, 7)
    new_id = __import__("hashlib").sha256((tmp_path / "new.png").read_bytes()).hexdigest()
    assert new_id in {s["sample_id"] for s in _samples(out)}


def test_aws_dataset_reads_its_caption_parquet_from_the_bucket(sample, s3_endpoint, aws_env, tmp_path):
    import boto3
    import pyarrow as pa
    import pyarrow.parquet as pq

    _root, config = sample
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key=SECRET)  # fmt: skip
    bucket = f"st-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    for name, colour in (("a.png", (200, 0, 0)), ("b.png", (0, 0, 200))):
        s3.put_object(Bucket=bucket, Key=f"shapes/{name}", Body=_png(colour))
    buffer = io.BytesIO()
    pq.write_table(pa.table({"name": ["a", "b"], "text": ["red", "blue"]}), buffer)
    s3.put_object(Bucket=bucket, Key="meta/captions.parquet", Body=buffer.getvalue())
    entry = {**_s3_entry(s3_endpoint, bucket), "caption_strategy": "parquet",
             "parquet": {"path": "meta/captions.parquet", "filename_column": "name", "caption_column": "text"}}
    _dataset_list(config, entry)
    _prepare(config, tmp_path / "prepare")
    assert {s["path"]: s["captions"] for s in _samples(tmp_path / "prepare")} == {"a.png": ["red"], "b.png": ["blue"]}
    _dataset_list(config, {**entry, "parquet": {**entry["parquet"], "path": "meta/missing.parquet"}})
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="cannot download its caption parquet .*meta/missing.parquet"):
        _prepare(config, tmp_path / "prepare")


def test_aws_dataset_without_credentials_is_refused(sample, s3_endpoint, aws_env, tmp_path):
    from pipeline.errors import ConfigError

    root, config = sample
    entry = {k: v for k, v in _s3_entry(s3_endpoint, "no-such").items() if not k.startswith("aws_access")}
    entry.pop("aws_secret_access_key")
    _dataset_list(config, entry)
    with pytest.raises(ConfigError, match="no AWS credentials"):
        _prepare(config, tmp_path / "prepare")


def _png(colour) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_huggingface_dataset_on_disk_prepares_and_caches(sample, tmp_path):
    import datasets

    from pipeline.cache.stage import run_cache

    _root, config = sample
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(c), "path": None} for c in colours],
         "text": ["a red square", "a green square", ""], "tags": ["red", "green", "blue things"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                    "tags": datasets.Value("string")}),
    )  # fmt: skip
    table.save_to_disk(str(tmp_path / "hf"))
    _dataset_list(config, {"type": "huggingface", "dataset_name": str(tmp_path / "hf"), "split": "train",
                           "caption_strategy": "huggingface", "metadata_backend": "huggingface",
                           "caption_column": "text", "fallback_caption_column": "tags",
                           "image_column": "image"})  # fmt: skip
    out = tmp_path / "prepare"
    result = _prepare(config, out)
    captions = sorted(s["captions"][0] for s in _samples(out))
    assert captions == ["a green square", "a red square", "blue things"]
    saved = datasets.load_from_disk(str(tmp_path / "hf"))
    assert result.manifest["datasets"][0]["source"]["fingerprint"] == saved._fingerprint
    assert _prepare(config, out).up_to_date
    cache = run_cache(load_config(config), out, tmp_path / "cache")
    assert cache.manifest["stats"]["samples"] == 3


def test_csv_url_list_prepares_and_skips_a_missing_url(sample, tmp_path):
    _root, config = sample
    served = tmp_path / "served"
    served.mkdir()
    (served / "one.png").write_bytes(_png((250, 0, 0)))
    (served / "two").write_bytes(_png((0, 250, 0)))  # no extension: named by its bytes
    with file_server(served) as base:
        listing = tmp_path / "list.csv"
        with open(listing, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["url", "caption"])
            writer.writerows([[f"{base}/one.png", "a red one"], [f"{base}/two", "a green one"],
                              [f"{base}/gone.png", "never there"]])  # fmt: skip
        _dataset_list(config, {"type": "csv", "csv_file": str(listing), "csv_caption_column": "caption",
                               "csv_cache_dir": str(tmp_path / "unused"), "caption_strategy": "csv"})  # fmt: skip
        out = tmp_path / "prepare"
        result = _prepare(config, out)
    assert sorted(s["captions"][0] for s in _samples(out)) == ["a green one", "a red one"]
    (skip,) = _skipped(out)
    assert skip["reason"] == "download_failed" and "404" in skip["detail"] and f"{base}/gone.png" in skip["detail"]
    assert result.manifest["datasets"][0]["source"]["failed"] == 1
    assert not (tmp_path / "unused").exists()


# SimpleTuner's example dataset lists that use remote types (image datasets; video and audio are other features).
ST_SOURCE = Path("/tmp/simpletuner-src")
PLACEHOLDERS = {"resolution_type": "pixel_area", "crop_style": "random", "crop_aspect": "square"}


def _remote_examples() -> list[Path]:
    found = []
    for path in sorted([*ST_SOURCE.glob("simpletuner/examples/**/*.json"), *ST_SOURCE.glob("config/*.example")]):
        text = path.read_text()
        if any(f'"type": "{t}"' in text for t in ("aws", "huggingface", "csv")) and not any(
                f'"dataset_type": "{t}"' in text for t in ("video", "audio")):  # fmt: skip
            found.append(path)
    return found


def _with_placeholders_set(path: Path, folder: Path) -> list[dict]:
    from tests.helpers.files import make_image

    entries = json.loads(path.read_text())
    for entry in entries:
        for key, value in PLACEHOLDERS.items():
            if isinstance(entry.get(key), str) and "|" in entry[key]:
                entry[key] = value
        if entry.get("type", "local") == "local" and "instance_data_dir" in entry:
            entry["instance_data_dir"] = str(make_image(folder / entry["id"] / "a.png").parent)
    return entries


@pytest.mark.skipif(not ST_SOURCE.is_dir(), reason="SimpleTuner's source is not extracted here")
def test_simpletuner_remote_example_lists_parse(tmp_path):
    from pipeline.datasets import load_dataset_list

    examples = _remote_examples()
    assert len(examples) >= 10
    for number, path in enumerate(examples):
        folder = tmp_path / str(number)
        folder.mkdir()
        (folder / "multidatabackend.json").write_text(json.dumps(_with_placeholders_set(path, folder)))
        (folder / "config.json").write_text(json.dumps({"data_backend_config": "multidatabackend.json"}))
        lists = load_dataset_list(load_config(folder / "config.json"))
        assert any(spec.source is not None for spec in lists.images), path


@pytest.mark.skipif(not ST_SOURCE.is_dir(), reason="SimpleTuner's source is not extracted here")
def test_st_check_passes_a_simpletuner_huggingface_list(tmp_path, tiny_model, cli):
    path = ST_SOURCE / "simpletuner/examples/multidatabackend-small-dreambooth-512px.json"
    (tmp_path / "multidatabackend.json").write_text(json.dumps(_with_placeholders_set(path, tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({
        "--data_backend_config": str(tmp_path / "multidatabackend.json"), "--model_family": SD,
        "--pretrained_model_name_or_path": str(tiny_model(SD))}))  # fmt: skip
    result = cli("check", "-c", tmp_path / "config.json")
    assert result.exit_code == 0, result.stdout + result.stderr

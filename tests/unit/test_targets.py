"""Upload targets: a real S3 API (moto's server on loopback), config parsing, optional SDKs, the Hub at the
huggingface_hub API boundary, the hub pre-flight against a loopback HTTP server, retries and post_upload_script."""

from __future__ import annotations

import http.server
import json
import logging
import random
import shlex
import socket
import sys
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
from moto import server as moto_server

from pipeline.config import Config
from pipeline.errors import ConfigError, InputError, NotSupportedError
from pipeline.remote import (
    HubTarget, check_targets, make_target, parse_publishing_config, publish_to_targets, upload_checkpoint,
)
from pipeline.remote.retry import backoff_delay, is_transient, retry_call
from pipeline.notify.hooks import run_post_upload
from pipeline.notify.options import HookOptions

MB = 1024 * 1024


# Fixtures -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real moto S3 server on a free loopback port for this module."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Dummy credentials from the environment only (no profile, no instance metadata)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def s3(s3_endpoint, aws_env):
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3):
    name = f"st-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def publish_logs(st_log):
    """Records of st's loggers (publishing and the remote targets)."""
    return st_log()


def make_folder(root: Path) -> dict[str, bytes]:
    """A model folder: two small files and one of 9 MB (multipart above a 5 MB threshold)."""
    rng = random.Random(7)
    contents = {
        "README.md": b"# a tiny model\n",
        "unet/config.json": json.dumps({"rank": 4}).encode(),
        "pytorch_lora_weights.safetensors": rng.randbytes(9 * MB),
    }
    for rel, data in contents.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return contents


def recorder_script(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Python script that writes its arguments, as JSON, to the file named by its first argument."""
    script = tmp_path / "record_args.py"
    script.write_text("import json, sys\nopen(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))\n")
    return script, tmp_path / "args.json"


def s3_config_file(tmp_path: Path, endpoint: str, bucket: str, **extra) -> str:
    entry = {"provider": "s3", "bucket": bucket, "prefix": "runs/one", "endpoint_url": endpoint,
             "region": "us-east-1", "multipart_threshold_mb": 5, "multipart_chunksize_mb": 5, **extra}
    (tmp_path / "publishing.json").write_text(json.dumps([entry]))
    return "publishing.json"


# S3 through a real S3 API -----------------------------------------------------------------------------------------


def test_s3_publish_multipart_verify_download_and_skip_unchanged(tmp_path, s3_endpoint, s3, bucket):
    folder = tmp_path / "model"
    contents = make_folder(folder)
    script, args_file = recorder_script(tmp_path)
    config = Config(
        publishing_config=s3_config_file(tmp_path, s3_endpoint, bucket),
        post_upload_script=f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(args_file))} "
                           "{local_path} {remote_path} {huggingface_path}",
        hub_model_id="me/lora",
    )

    [record] = publish_to_targets(config, folder, base_dir=tmp_path)

    assert record == {
        "provider": "s3", "destination": f"s3://{bucket}/runs/one", "files": 3,
        "bytes": sum(len(v) for v in contents.values()), "uploaded": 3, "skipped": 0, "verified": True,
        "remote_objects": 3,
    }
    listed = {o["Key"]: o for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/one/")["Contents"]}
    assert set(listed) == {f"runs/one/{rel}" for rel in contents}
    for rel, data in contents.items():
        assert s3.get_object(Bucket=bucket, Key=f"runs/one/{rel}")["Body"].read() == data
    big = s3.head_object(Bucket=bucket, Key="runs/one/pytorch_lora_weights.safetensors")
    assert big["ETag"].strip('"').endswith("-2"), "a 9 MB file above a 5 MB threshold goes up in 2 parts"
    assert len(big["Metadata"]["sha256"]) == 64
    # post_upload_script ran, without a shell, with the placeholders filled.
    assert json.loads(args_file.read_text()) == [str(folder), f"s3://{bucket}/runs/one", "me/lora"]

    # A second publish finds every object with the same size and sha256: nothing is uploaded again.
    [again] = publish_to_targets(config, folder, base_dir=tmp_path)
    assert (again["uploaded"], again["skipped"], again["verified"]) == (0, 3, True)
    after = {o["Key"]: o for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/one/")["Contents"]}
    assert {k: o["LastModified"] for k, o in after.items()} == {k: o["LastModified"] for k, o in listed.items()}

    # A changed file (same size, other bytes) is uploaded again, alone.
    (folder / "README.md").write_bytes(b"# a tiny modem\n")
    [third] = publish_to_targets(config, folder, base_dir=tmp_path)
    assert (third["uploaded"], third["skipped"]) == (1, 2)
    assert s3.get_object(Bucket=bucket, Key="runs/one/README.md")["Body"].read() == b"# a tiny modem\n"


def test_s3_object_without_sha256_metadata_is_replaced(tmp_path, s3_endpoint, s3, bucket):
    folder = tmp_path / "model"
    (folder).mkdir()
    (folder / "a.txt").write_bytes(b"hello")
    s3.put_object(Bucket=bucket, Key="runs/one/a.txt", Body=b"hello")  # same size, no sha256: not trusted
    config = Config(publishing_config=s3_config_file(tmp_path, s3_endpoint, bucket))
    [record] = publish_to_targets(config, folder, base_dir=tmp_path)
    assert record["uploaded"] == 1
    assert s3.head_object(Bucket=bucket, Key="runs/one/a.txt")["Metadata"]["sha256"]


def test_s3_missing_bucket_is_a_clear_input_error(tmp_path, s3_endpoint, s3):
    folder = tmp_path / "model"
    make_folder(folder)
    config = Config(publishing_config=s3_config_file(tmp_path, s3_endpoint, "no-such-bucket-st"))
    with pytest.raises(InputError, match="bucket 'no-such-bucket-st' does not exist"):
        publish_to_targets(config, folder, base_dir=tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        check_targets(config, tmp_path)


def test_s3_check_targets_passes_for_a_reachable_bucket(tmp_path, s3_endpoint, bucket):
    config = Config(publishing_config=s3_config_file(tmp_path, s3_endpoint, bucket))
    assert check_targets(config, tmp_path) == [f"s3://{bucket}/runs/one: bucket reachable"]


def test_s3_unreachable_endpoint_fails_the_preflight(tmp_path, aws_env):
    entry = {"provider": "s3", "bucket": "b", "endpoint_url": f"http://127.0.0.1:{closed_port()}"}
    with pytest.raises(InputError, match="cannot reach"):
        check_targets(Config(publishing_config=entry), tmp_path)


def test_s3_missing_credentials_say_what_to_set(tmp_path, s3_endpoint, aws_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    folder = tmp_path / "model"
    make_folder(folder)
    config = Config(publishing_config=s3_config_file(tmp_path, s3_endpoint, "whatever"))
    with pytest.raises(ConfigError) as info:
        publish_to_targets(config, folder, base_dir=tmp_path)
    message = str(info.value)
    for name in ("aws_access_key_id", "aws_secret_access_key", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert name in message


def test_s3_credentials_from_config_are_used_and_never_logged(tmp_path, s3_endpoint, bucket, monkeypatch,
                                                              publish_logs):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"x")
    secret = "SECRET-" + uuid.uuid4().hex
    config = Config(publishing_config=s3_config_file(
        tmp_path, s3_endpoint, bucket, aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key=secret))
    [record] = publish_to_targets(config, folder, base_dir=tmp_path)
    assert record["uploaded"] == 1
    assert secret not in json.dumps(record)
    assert publish_logs and all(secret not in r.getMessage() and "AKIDEXAMPLE" not in r.getMessage()
                                for r in publish_logs)


# Retry -------------------------------------------------------------------------------------------------------------


def test_retry_backs_off_with_growing_jittered_delays_then_succeeds():
    calls, delays = [], []

    def flaky():
        calls.append(1)
        if len(calls) <= 2:
            raise ConnectionResetError("connection reset by peer")
        return "done"

    assert retry_call(flaky, sleep=delays.append) == "done"
    assert len(calls) == 3 and len(delays) == 2
    assert 0.25 <= delays[0] <= 0.5 <= delays[1] <= 1.0
    assert delays[1] > delays[0]


def test_retry_gives_up_after_bounded_attempts():
    delays = []

    def always():
        raise TimeoutError("timed out")

    with pytest.raises(TimeoutError):
        retry_call(always, attempts=5, sleep=delays.append, rand=lambda: 1.0)
    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert backoff_delay(20, rand=lambda: 1.0) == 30.0 and 15.0 <= backoff_delay(20) <= 30.0  # capped


def test_retry_never_retries_auth_or_config_errors():
    from botocore.exceptions import ClientError, NoCredentialsError

    for error in (
        ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject"),
        ClientError({"Error": {"Code": "InvalidAccessKeyId"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Put"),
        NoCredentialsError(),
        ConfigError("bad config"),
    ):
        calls, delays = [], []

        def fail(error=error):
            calls.append(1)
            raise error

        with pytest.raises(type(error)):
            retry_call(fail, sleep=delays.append)
        assert (len(calls), delays) == (1, []), error


def test_transient_classification_sees_through_boto3_wrapping():
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, EndpointConnectionError

    slow = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "UploadPart")
    try:
        try:
            raise slow
        except ClientError as exc:
            raise S3UploadFailedError(f"Failed to upload: {exc}")
    except S3UploadFailedError as wrapped:
        assert is_transient(wrapped)
    assert is_transient(EndpointConnectionError(endpoint_url="http://x.example.com"))
    assert not is_transient(ClientError({"Error": {"Code": "NoSuchBucket"},
                                         "ResponseMetadata": {"HTTPStatusCode": 404}}, "HeadBucket"))
    assert not is_transient(ValueError("a bug"))


# Config parsing ------------------------------------------------------------------------------------------------------


def test_publishing_config_forms(tmp_path):
    entry = {"provider": "s3", "bucket": "b", "base_path": "/runs/x/", "access_key": "k", "secret_key": "s"}
    expected = [{"provider": "s3", "bucket": "b", "prefix": "runs/x", "aws_access_key_id": "k",
                 "aws_secret_access_key": "s"}]
    (tmp_path / "targets.json").write_text(json.dumps(entry))
    assert parse_publishing_config(json.dumps([entry]), tmp_path) == expected
    assert parse_publishing_config(json.dumps(entry), tmp_path) == expected
    assert parse_publishing_config(entry, tmp_path) == expected
    assert parse_publishing_config([entry], tmp_path) == expected
    assert parse_publishing_config("targets.json", tmp_path) == expected
    assert parse_publishing_config(tmp_path / "targets.json") == expected
    assert parse_publishing_config(None, tmp_path) == [] and parse_publishing_config("", tmp_path) == []
    assert parse_publishing_config({"provider": "AZURE", "container": "c", "connection_string": "x"})[0][
        "provider"] == "azure_blob"


@pytest.mark.parametrize(("value", "message"), [
    ({"provider": "ftp", "bucket": "b"}, r"unknown provider 'ftp'.*known providers: azure_blob, b2, backblaze_b2, "
                                         r"dropbox, s3"),
    ({"provider": "dropbx", "token": "t"}, r"did you mean 'dropbox'"),
    ({"bucket": "b"}, r"publishing_config\[0\]: missing 'provider'"),
    ({"provider": "s3", "prefix": "x"}, r"publishing_config\[0\]: provider 's3' needs 'bucket'"),
    ([{"provider": "s3", "bucket": "b"}, {"provider": "s3"}], r"publishing_config\[1\].*needs 'bucket'"),
    ({"provider": "s3", "buckt": "b"}, r"unknown key 'buckt'.*did you mean 'bucket'"),
    ({"provider": "s3", "bucket": "b", "multipart_threshold_mb": "lots"}, r"multipart_threshold_mb must be"),
    ({"provider": "s3", "bucket": "b", "multipart_chunksize_mb": 1}, r"at least 5"),
    ({"provider": "s3", "bucket": "b", "aws_access_key_id": "k"}, r"give both"),
    ({"provider": "backblaze_b2", "bucket": "b"}, r"needs 'endpoint_url'"),
    ("[{not json", r"publishing_config is not valid JSON"),
    ("missing.json", r"neither JSON text nor an existing file"),
    (42, r"must be a target object or a list"),
    (["s3"], r"publishing_config\[0\] must be an object"),
])
def test_publishing_config_errors(tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_publishing_config(value, tmp_path)


def test_publishing_config_file_with_bad_json(tmp_path):
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ConfigError, match="cannot read .*bad.json as JSON"):
        parse_publishing_config("bad.json", tmp_path)


# B2, Azure, Dropbox: offline validation and missing SDKs --------------------------------------------------------------


def test_other_providers_validate_offline(monkeypatch):
    for name in ("B2_APPLICATION_KEY_ID", "B2_APPLICATION_KEY", "AZURE_STORAGE_CONNECTION_STRING", "DROPBOX_TOKEN",
                 "DROPBOX_ACCESS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="provider 'b2' needs 'bucket'"):
        parse_publishing_config({"provider": "b2", "application_key_id": "i", "application_key": "k"})
    with pytest.raises(ConfigError, match="B2_APPLICATION_KEY_ID and B2_APPLICATION_KEY"):
        parse_publishing_config({"provider": "b2", "bucket": "b"})
    with pytest.raises(ConfigError, match="provider 'azure_blob' needs 'container'"):
        parse_publishing_config({"provider": "azure_blob", "connection_string": "x"})
    with pytest.raises(ConfigError, match="AZURE_STORAGE_CONNECTION_STRING"):
        parse_publishing_config({"provider": "azure", "container": "c"})
    with pytest.raises(ConfigError, match="needs 'token'.*DROPBOX_TOKEN"):
        parse_publishing_config({"provider": "dropbox", "base_path": "/runs"})

    monkeypatch.setenv("B2_APPLICATION_KEY_ID", "id")
    monkeypatch.setenv("B2_APPLICATION_KEY", "key")
    monkeypatch.setenv("DROPBOX_TOKEN", "sl.token")
    assert parse_publishing_config({"provider": "b2", "bucket": "b", "base_path": "x/"}) == [
        {"provider": "b2", "bucket": "b", "prefix": "x"}]
    assert parse_publishing_config({"provider": "dropbox", "base_path": "SimpleTuner/runs"}) == [
        {"provider": "dropbox", "prefix": "/SimpleTuner/runs"}]
    assert parse_publishing_config({"provider": "azure_blob", "container": "c", "account_url": "https://a.example.com",
                                    "sas_token": "t"})[0]["credential"] == "t"


@pytest.mark.parametrize(("entry", "module", "pip"), [
    ({"provider": "b2", "bucket": "b", "application_key_id": "i", "application_key": "k"}, "b2sdk", "b2sdk"),
    ({"provider": "azure_blob", "container": "c", "connection_string": "x"}, "azure.storage.blob",
     "azure-storage-blob"),
    ({"provider": "dropbox", "token": "t"}, "dropbox", "dropbox"),
])
def test_missing_sdk_is_not_supported_with_the_pip_hint(tmp_path, monkeypatch, entry, module, pip):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed, whether it is or not
    [spec] = parse_publishing_config(entry)  # validation needs no SDK
    with pytest.raises(NotSupportedError, match=f"pip install {pip}"):
        make_target(spec)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"x")
    with pytest.raises(NotSupportedError, match=f"pip install {pip}"):
        publish_to_targets(Config(publishing_config=entry), folder, tmp_path)
    with pytest.raises(NotSupportedError, match=f"pip install {pip}"):
        check_targets(Config(publishing_config=entry), tmp_path)


# Hugging Face Hub at the huggingface_hub API boundary -----------------------------------------------------------------


@pytest.fixture
def hub_online(monkeypatch):
    """huggingface_hub as if online (conftest sets HF_HUB_OFFLINE=1 for the suite); nothing here reaches the hub."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")


class FakeHub:
    """Recording stand-ins for HfApi.create_repo / upload_folder / list_repo_tree, keeping the uploaded tree."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.tree: dict[str, bytes] = {}
        self.threads: list[str] = []
        self.gate: threading.Event | None = None
        self.fail_uploads = 0
        self.error: Exception | None = None

    def install(self, monkeypatch):
        import huggingface_hub

        fake = self

        def create_repo(api, repo_id, **kwargs):
            fake.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(api, **kwargs):
            fake.calls.append(("upload_folder", kwargs))
            fake.threads.append(threading.current_thread().name)
            if fake.gate is not None:
                assert fake.gate.wait(10)
            if fake.error is not None:
                raise fake.error
            if fake.fail_uploads:
                fake.fail_uploads -= 1
                raise ConnectionResetError("connection reset by peer")
            folder = Path(kwargs["folder_path"])
            base = kwargs.get("path_in_repo") or ""
            for path in folder.rglob("*"):
                if path.is_file():
                    rel = path.relative_to(folder).as_posix()
                    fake.tree[f"{base}/{rel}" if base else rel] = path.read_bytes()
            return SimpleNamespace(oid="c0ffee")

        def list_repo_tree(api, repo_id, path_in_repo=None, **kwargs):
            prefix = f"{path_in_repo}/" if path_in_repo else ""
            return [SimpleNamespace(path=p, size=len(data), lfs=None)
                    for p, data in fake.tree.items() if p.startswith(prefix)]

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", list_repo_tree)
        return self


@pytest.fixture
def fake_hub(monkeypatch, hub_online):
    return FakeHub().install(monkeypatch)


def test_push_to_hub_creates_private_repo_and_uploads_the_folder(tmp_path, fake_hub):
    folder = tmp_path / "model"
    contents = make_folder(folder)
    config = Config(push_to_hub=True, hub_model_id="me/my-lora", model_card_private=True)

    [record] = publish_to_targets(config, folder, tmp_path)

    create, upload = fake_hub.calls
    assert create == ("create_repo", {"repo_id": "me/my-lora", "private": True, "exist_ok": True,
                                      "repo_type": "model"})
    assert upload[0] == "upload_folder"
    assert (upload[1]["repo_id"], upload[1]["folder_path"], upload[1]["path_in_repo"]) == (
        "me/my-lora", str(folder), None)
    assert fake_hub.tree == contents
    assert record["provider"] == "huggingface" and record["destination"] == "me/my-lora"
    assert (record["files"], record["bytes"], record["verified"], record["private"]) == (
        3, sum(map(len, contents.values())), True, True)


def test_push_to_hub_needs_hub_model_id(tmp_path, fake_hub):
    folder = tmp_path / "model"
    make_folder(folder)
    with pytest.raises(ConfigError, match="hub_model_id"):
        publish_to_targets(Config(push_to_hub=True), folder, tmp_path)


def test_checkpoint_upload_goes_under_checkpoints(tmp_path, fake_hub):
    ckpt = tmp_path / "checkpoint-120"
    ckpt.mkdir()
    (ckpt / "state.safetensors").write_bytes(b"weights")
    config = Config(push_to_hub=True, push_checkpoints_to_hub=True, hub_model_id="me/my-lora")
    record = upload_checkpoint(config, ckpt, 120).wait()
    upload = dict(fake_hub.calls)["upload_folder"]
    assert upload["path_in_repo"] == "checkpoints/checkpoint-120"
    assert fake_hub.tree == {"checkpoints/checkpoint-120/state.safetensors": b"weights"}
    assert record["destination"] == "me/my-lora/checkpoints/checkpoint-120" and record["verified"]


def test_background_push_returns_at_once_and_wait_gives_the_record(tmp_path, fake_hub):
    ckpt = tmp_path / "checkpoint-5"
    ckpt.mkdir()
    (ckpt / "w.bin").write_bytes(b"12345")
    config = Config(push_to_hub=True, push_to_hub_background=True, hub_model_id="me/bg")
    fake_hub.gate = threading.Event()
    handle = HubTarget.from_config(config, tmp_path).upload_checkpoint(ckpt, 5)
    assert not handle.done()  # the upload waits on the gate in its own thread
    fake_hub.gate.set()
    record = handle.wait(timeout=10)
    assert handle.done() and record["verified"] and record["files"] == 1
    assert fake_hub.threads and fake_hub.threads[0] != threading.current_thread().name


def test_background_push_in_publish_runs_alongside_storage_and_is_awaited(tmp_path, s3_endpoint, bucket,
                                                                          fake_hub):
    folder = tmp_path / "model"
    make_folder(folder)
    config = Config(publishing_config=s3_config_file(tmp_path, s3_endpoint, bucket), push_to_hub=True,
                    push_to_hub_background=True, hub_model_id="me/both")
    records = publish_to_targets(config, folder, tmp_path)
    assert [r["provider"] for r in records] == ["s3", "huggingface"]
    assert all(r["verified"] for r in records)
    assert fake_hub.threads[0].startswith("hub-upload")


def test_background_push_error_is_logged_and_raised_by_wait(tmp_path, fake_hub, publish_logs):
    ckpt = tmp_path / "checkpoint-7"
    ckpt.mkdir()
    (ckpt / "w.bin").write_bytes(b"1")
    forbidden = RuntimeError("forbidden")
    forbidden.response = SimpleNamespace(status_code=403)  # like HfHubHTTPError
    fake_hub.error = forbidden
    handle = HubTarget.from_config(Config(hub_model_id="me/nope", push_to_hub_background=True)).upload_checkpoint(
        ckpt, 7)
    assert handle.join(10)
    with pytest.raises(InputError, match="no write access to me/nope"):
        handle.wait()
    assert any(r.levelno == logging.ERROR and "me/nope" in r.getMessage() for r in publish_logs)


def test_hub_transient_failure_is_retried(tmp_path, fake_hub):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"abc")
    fake_hub.fail_uploads = 1
    delays = []
    [record] = publish_to_targets(Config(push_to_hub=True, hub_model_id="me/r"), folder, tmp_path,
                                  sleep=delays.append)
    assert record["verified"] and len(delays) == 1
    assert [name for name, _ in fake_hub.calls].count("upload_folder") == 2


def test_hub_verification_catches_a_missing_file(tmp_path, fake_hub, monkeypatch):
    import huggingface_hub

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"abc")
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_tree", lambda api, repo_id, **kw: [])
    with pytest.raises(InputError, match="verification of hub me/v failed: a.bin missing"):
        publish_to_targets(Config(push_to_hub=True, hub_model_id="me/v"), folder, tmp_path)


# Hub pre-flight ----------------------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_check_targets_without_token_says_how_to_log_in(tmp_path, hub_online, no_token):
    config = Config(push_to_hub=True, hub_model_id="me/x")
    with pytest.raises(InputError) as info:
        check_targets(config, tmp_path)
    assert "HF_TOKEN" in str(info.value) and "huggingface-cli login" in str(info.value)


def test_check_targets_offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    with pytest.raises(InputError, match="offline"):
        check_targets(Config(push_to_hub=True, hub_model_id="me/x"), tmp_path)


def test_check_targets_unreachable_hub(tmp_path, hub_online, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_dummy_secret")
    with pytest.raises(InputError, match="unreachable") as info:
        check_targets(Config(push_to_hub=True, hub_model_id="me/x"), tmp_path, timeout=3)
    assert "hf_dummy_secret" not in str(info.value)


def test_check_targets_asks_whoami_and_reports_a_rejected_token(tmp_path, hub_online, monkeypatch):
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, self.headers.get("authorization")))
            good = self.headers.get("authorization") == "Bearer hf_good"
            body = json.dumps({"name": "tester"} if good else {"error": "Invalid credentials"}).encode()
            self.send_response(200 if good else 401)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        config = Config(push_to_hub=True, hub_model_id="me/x")
        monkeypatch.setenv("HF_TOKEN", "hf_good")
        assert check_targets(config, tmp_path) == [
            f"hub http://127.0.0.1:{server.server_address[1]}: logged in as tester, pushing to me/x"]
        monkeypatch.setenv("HF_TOKEN", "hf_bad")
        with pytest.raises(InputError, match="rejected the token") as info:
            check_targets(config, tmp_path)
        assert "hf_bad" not in str(info.value)
    finally:
        server.shutdown()
        thread.join()
    assert [path for path, _ in seen] == ["/api/whoami-v2", "/api/whoami-v2"]


def test_check_targets_without_push_to_hub_needs_no_token(tmp_path, monkeypatch, no_token):
    assert check_targets(Config(), tmp_path) == []


# post_upload_script ----------------------------------------------------------------------------------------------


def test_post_upload_script_gets_the_upload_placeholders_without_a_shell(tmp_path):
    script, args_file = recorder_script(tmp_path)
    command = (f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(args_file))} "
               "{local_path} --remote={remote_checkpoint_path} {remote_path} {huggingface_path} {provider} {step} "
               "'two words' {unknown} ';' '$HOME'")
    hooks = HookOptions.from_config(Config(post_upload_script=command, hub_model_id="me/x"))
    status = run_post_upload(hooks, 7, "/tmp/out", "s3://b/p", provider="s3")
    assert status == 0
    assert json.loads(args_file.read_text()) == [
        "/tmp/out", "--remote=s3://b/p", "s3://b/p", "me/x", "s3", "7", "two words", "{unknown}", ";", "$HOME"]


def test_failing_post_upload_script_is_logged_not_raised(tmp_path, st_log):
    records = st_log("notify")
    failing = f"{shlex.quote(sys.executable)} -c 'import sys; sys.exit(3)'"
    for script, status in ((failing, 3), (str(tmp_path / "no-such-program"), None), ("unbalanced 'quote", None)):
        assert run_post_upload(HookOptions.from_config(Config(post_upload_script=script)), None, "/o", "r") == status
    messages = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert any("post_upload_script exited with code 3" in m for m in messages)
    assert any("could not start" in m for m in messages)
    assert any("cannot be parsed" in m for m in messages)


def test_failing_post_upload_script_does_not_fail_the_publish(tmp_path, fake_hub, st_log):
    records = st_log("notify")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"abc")
    config = Config(push_to_hub=True, hub_model_id="me/s",
                    post_upload_script=f"{shlex.quote(sys.executable)} -c 'raise SystemExit(5)' {{huggingface_path}}")
    [record] = publish_to_targets(config, folder, tmp_path)
    assert record["verified"]
    assert any("post_upload_script exited with code 5" in r.getMessage() for r in records)

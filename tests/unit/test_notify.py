"""Webhook notifications against a real local HTTP server, and user hook scripts run without a shell."""

from __future__ import annotations

import email
import json
import logging
import shlex
import socket
import sys
import time
from pathlib import Path

import pytest

from pipeline import notify
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.notify import Notifier, parse_webhook_config, run_hook
from tests.helpers.webhooks import Recorder


@pytest.fixture
def server():
    recorder = Recorder()
    yield recorder
    recorder.close()


@pytest.fixture(autouse=True)
def no_job_id(monkeypatch):
    """No job id unless a test sets one, and no proxy between us and the local server."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    monkeypatch.delenv("ST_JOB_ID", raising=False)
    monkeypatch.delenv("SIMPLETUNER_JOB_ID", raising=False)


@pytest.fixture
def records(st_log):
    """Log records of st.notify."""
    return st_log("notify")


def _json(request: dict) -> dict:
    return json.loads(request["body"])


def _multipart(request: dict) -> dict[str, bytes]:
    content_type = request["headers"]["Content-Type"]
    assert content_type.startswith("multipart/form-data")
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + request["body"])
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in message.get_payload()}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------- webhooks


def test_raw_target_receives_events_with_job_id_and_token(server, monkeypatch, tmp_path):
    monkeypatch.setenv("ST_JOB_ID", "job-42")
    monkeypatch.setenv("SIMPLETUNER_JOB_ID", "not-this-one")
    hook = {"webhook_type": "raw", "callback_url": server.url("/raw"), "auth_token": "s3cret", "log_level": "info"}
    config = Config(webhook_config=json.dumps([hook]), webhook_reporting_interval=0)
    notifier = Notifier.from_config(config, tmp_path, stage="train")
    assert notifier.enabled
    notifier.start({"run": "r1"})
    notifier.progress(5, 10, {"loss": 0.25, "lr": 1e-4})
    notifier.checkpoint(10, tmp_path / "checkpoint-10")
    notifier.finished({"global_step": 10})
    notifier.close(timeout=5)

    got = server.wait(4, "/raw")
    bodies = [_json(r) for r in got]
    assert [b["event"] for b in bodies] == ["start", "progress", "checkpoint", "finished"]
    for request, body in zip(got, bodies):
        assert request["headers"]["Authorization"] == "Bearer s3cret"
        assert request["headers"]["Content-Type"] == "application/json"
        assert body["job_id"] == "job-42"
        assert body["stage"] == "train"
        assert body["message_type"] == body["event"]
        assert body["timestamp"] and body["message"]
    assert bodies[0]["info"] == {"run": "r1"}
    assert bodies[1]["step"] == 5 and bodies[1]["total"] == 10 and bodies[1]["metrics"]["loss"] == 0.25
    assert "step 5/10" in bodies[1]["message"]
    assert bodies[2]["path"] == str(tmp_path / "checkpoint-10") and bodies[2]["step"] == 10
    assert bodies[3]["summary"] == {"global_step": 10}


def test_job_id_falls_back_to_simpletuner_env(server, monkeypatch):
    monkeypatch.setenv("SIMPLETUNER_JOB_ID", "st-job-7")
    config = Config(webhook_config={"webhook_type": "raw", "callback_url": server.url("/raw")})
    with Notifier.from_config(config, None, stage="cache") as notifier:
        notifier.error("out of memory")
    (request,) = server.wait(1, "/raw")
    body = _json(request)
    assert body["job_id"] == "st-job-7" and body["stage"] == "cache" and body["event"] == "error"
    assert body["level"] == "error" and "out of memory" in body["message"]
    assert "Authorization" not in request["headers"]


def test_progress_is_throttled_by_the_reporting_interval(server):
    now = [0.0]
    config = Config(webhook_config={"webhook_type": "raw", "callback_url": server.url("/p")},
                    webhook_reporting_interval=10)  # fmt: skip
    notifier = Notifier.from_config(config, None, stage="train", clock=lambda: now[0])
    sent = []
    for t, step in [(0, 1), (5, 2), (9.9, 3), (10, 4), (15, 5), (25, 6)]:
        now[0] = t
        sent.append(notifier.progress(step, 100, {"loss": 1.0}))
    notifier.close(timeout=5)
    assert sent == [True, False, False, True, False, True]
    assert [_json(r)["step"] for r in server.wait(3, "/p")] == [1, 4, 6]
    assert len(server.requests) == 3


def test_discord_gets_content_and_validation_images_as_multipart(server, tmp_path):
    images = [tmp_path / "a.png", tmp_path / "b b.jpg"]
    images[0].write_bytes(b"\x89PNG fake image bytes A")
    images[1].write_bytes(b"\xff\xd8 fake jpeg B" * 50)
    config = Config(webhook_config=[{"webhook_type": "discord", "webhook_url": server.url("/api/webhooks/1/tok")}],
                    tracker_run_name="my-run", webhook_reporting_interval=0)  # fmt: skip
    with Notifier.from_config(config, tmp_path, stage="train") as notifier:
        notifier.start()
        assert notifier.progress(1, 10, {"loss": 0.5}) is False  # discord at "info" skips progress
        notifier.validation(20, images, ["a cat", "a dog"])
    first, second = server.wait(2, "/api/webhooks/1/tok")
    assert _json(first) == {"content": "`(my-run)` train started"}
    parts = _multipart(second)
    payload = json.loads(parts["payload_json"])
    assert payload["content"].startswith("`(my-run)` validation at step 20 (2 images)")
    assert "a cat" in payload["content"] and "a dog" in payload["content"]
    assert [a["filename"] for a in payload["attachments"]] == ["a.png", "b b.jpg"]
    assert parts["files[0]"] == images[0].read_bytes()
    assert parts["files[1]"] == images[1].read_bytes()
    assert len(server.requests) == 2


def test_raw_validation_event_carries_paths_prompts_and_image_data(server, tmp_path):
    image = tmp_path / "v.png"
    image.write_bytes(b"pixels")
    with Notifier([notify.Target("raw", server.url("/v"))], stage="train") as notifier:
        notifier.validation(3, [image], ["prompt one"])
    body = _json(server.wait(1, "/v")[0])
    assert body["image_paths"] == [str(image)] and body["prompts"] == ["prompt one"]
    assert body["images"] == [{"path": str(image), "data": "cGl4ZWxz"}]


def test_error_level_target_receives_only_errors(server):
    config = Config(webhook_config=[
        {"webhook_type": "raw", "callback_url": server.url("/all"), "log_level": "debug"},
        {"webhook_type": "raw", "callback_url": server.url("/errors"), "log_level": "ERROR"},
    ], webhook_reporting_interval=0)  # fmt: skip
    with Notifier.from_config(config, None, stage="train") as notifier:
        notifier.start()
        notifier.progress(1, 2)
        notifier.checkpoint(1, "/x")
        notifier.validation(1, [], [])
        notifier.finished()
        notifier.error("boom")
    assert [_json(r)["event"] for r in server.wait(6, "/all")] == [
        "start", "progress", "checkpoint", "validation", "finished", "error"]  # fmt: skip
    errors = server.wait(1, "/errors")
    assert len(errors) == 1 and _json(errors[0])["event"] == "error"


def test_dead_and_slow_endpoints_never_slow_the_caller(server, records):
    """The slow endpoint holds its first request until the test ends: every call below returns while it is held."""
    targets = [notify.Target("raw", f"http://127.0.0.1:{_free_port()}/dead"), notify.Target("raw", server.url("/slow"))]
    notifier = Notifier(targets, stage="train", interval=0)
    notifier.checkpoint(0, "/ckpt/0")
    assert server.arrived.wait(30), "the first event never reached the slow endpoint"
    for step in range(1, 100):
        notifier.checkpoint(step, f"/ckpt/{step}")
    assert all(notifier.progress(step, 100) for step in range(100))  # each one queued
    notifier.close(timeout=0.2)
    assert not server.requests, "a call waited for the stalled endpoint to answer"
    assert any("not delivered" in r.getMessage() for r in records)
    assert notifier.send("error", "after close") is False


def test_full_queue_drops_oldest_and_logs_once(server, records):
    notifier = Notifier([notify.Target("raw", server.url("/slow"))], stage="train", max_queue=5)
    for step in range(20):
        notifier.checkpoint(step, "/c")
    assert notifier.dropped >= 14
    full = [r for r in records if "queue is full" in r.getMessage()]
    assert len(full) == 1 and full[0].levelno == logging.WARNING
    server.release.set()  # let the slow endpoint answer: the newest events are the ones delivered
    notifier.close(timeout=5)
    steps = [_json(r)["step"] for r in server.wait(1, "/slow")]
    assert steps[-1] == 19


def test_no_webhook_config_is_a_no_op(tmp_path):
    for value in (None, "", "none", []):
        notifier = Notifier.from_config(Config(webhook_config=value), tmp_path, stage="train")
        assert not notifier.enabled
        notifier.start({"a": 1})
        assert notifier.progress(1, 2) is False
        notifier.error("x")
        notifier.close()
        assert notifier._thread is None


def test_webhook_config_forms_and_aliases(tmp_path):
    (tmp_path / "hooks.json").write_text(json.dumps(
        {"webhook_type": "discord", "callback_url": "https://discord.example.com/api/webhooks/1/t", "message_prefix": "p"}))
    (file_target,) = parse_webhook_config("hooks.json", tmp_path)
    assert file_target.kind == "discord" and file_target.url.endswith("/1/t") and file_target.message_prefix == "p"
    (raw,) = parse_webhook_config('{"webhook_type": "raw", "webhook_url": "http://example.com:1/cb", "auth_token": "t"}')
    assert (raw.kind, raw.url, raw.auth_token, raw.log_level) == ("raw", "http://example.com:1/cb", "t", "info")
    both = parse_webhook_config([{"webhook_type": "raw", "callback_url": "http://a.example.com/"},
                                 {"webhook_type": "discord", "webhook_url": "https://b.example.com/", "log_level": "warning"}])
    assert [t.kind for t in both] == ["raw", "discord"] and both[1].log_level == "warning"
    notifier = Notifier.from_config(Config(webhook_config=str(tmp_path / "hooks.json")), None, stage="train",
                                    main_process=False)  # fmt: skip
    assert not notifier.enabled


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("missing.json", "neither JSON text nor an existing file"),
        ({"callback_url": "http://a.example.com/"}, "webhook_type is missing"),
        ({"webhook_type": "slack", "webhook_url": "http://a.example.com/"}, "webhook_type is 'slack'"),
        ({"webhook_type": "discord"}, "needs 'webhook_url'"),
        ({"webhook_type": "raw", "auth_token": "x"}, "needs 'callback_url'"),
        ({"webhook_type": "raw", "callback_url": "ftp://a/"}, "http:// or https://"),
        ({"webhook_type": "raw", "callback_url": "http://a.example.com/", "log_level": "loud"}, "log_level 'loud'"),
        ([{"webhook_type": "raw", "callback_url": "http://a.example.com/"}, "oops"], "webhook_config[1] must be an object"),
        (5, "not int"),
    ],
)
def test_bad_webhook_config_is_a_config_error(value, fragment, tmp_path):
    with pytest.raises(ConfigError) as info:
        Notifier.from_config(Config(webhook_config=value), tmp_path, stage="train")
    assert fragment in str(info.value)
    assert "webhook_config" in str(info.value)


def test_bad_webhook_config_file_is_a_config_error(tmp_path):
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        parse_webhook_config("bad.json", tmp_path)


# ---------------------------------------------------------------------------------------------------------- hooks

ARGV_SCRIPT = """\
import json, pathlib, sys
pathlib.Path(sys.argv[1]).write_text(json.dumps(sys.argv[2:]))
"""


@pytest.fixture
def argv_script(tmp_path):
    script = tmp_path / "argv.py"
    script.write_text(ARGV_SCRIPT)
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"


def test_hook_substitutes_placeholders_per_argument_without_a_shell(argv_script, tmp_path):
    out = tmp_path / "out.json"
    script = (f"{argv_script} {shlex.quote(str(out))} {{local_checkpoint_path}} --step={{global_step}} "
              "'{tracker_run_name}' {unknown_thing} ';' '$HOME' '{\"json\": 1}' `x` {validation_prompt}")  # fmt: skip
    placeholders = {"local_checkpoint_path": "/out/my checkpoints/checkpoint-10", "global_step": 10,
                    "tracker_run_name": "run; echo hi $HOME", "validation_prompt": "a photo of sks dog"}  # fmt: skip
    assert run_hook(script, placeholders) == 0
    assert json.loads(out.read_text()) == [
        "/out/my checkpoints/checkpoint-10", "--step=10", "run; echo hi $HOME", "{unknown_thing}", ";", "$HOME",
        '{"json": 1}', "`x`", "a photo of sks dog"]  # fmt: skip


def test_failing_or_missing_hooks_are_logged_not_raised(tmp_path, records):
    failing = f"{shlex.quote(sys.executable)} -c 'import sys; sys.exit(3)'"
    assert run_hook(failing, {}, name="post_checkpoint_script") == 3
    assert any("exited with code 3" in r.getMessage() and r.levelno == logging.WARNING for r in records)
    assert run_hook(str(tmp_path / "no-such-program") + " {global_step}", {"global_step": 1}) is None
    assert any("could not start" in r.getMessage() and r.levelno == logging.ERROR for r in records)
    assert run_hook("echo 'unbalanced", {}) is None
    assert run_hook(None, {}) is None and run_hook("   ", {}) is None
    assert run_hook(f"{shlex.quote(sys.executable)} -c pass", {}, background=True, cwd=tmp_path / "nope") is None


def test_background_hook_returns_immediately(tmp_path):
    go, out = tmp_path / "go", tmp_path / "done"
    waiter = tmp_path / "wait.py"
    waiter.write_text("import pathlib, sys, time\n"
                      "go, out = map(pathlib.Path, sys.argv[1:3])\n"
                      "deadline = time.monotonic() + 10\n"
                      "while not go.exists() and time.monotonic() < deadline:\n"
                      "    time.sleep(0.02)\n"
                      "part = out.with_suffix('.part')\n"
                      "part.write_text(sys.argv[3])\n"
                      "part.rename(out)\n")  # fmt: skip  (renamed whole: the reader never sees it half-written)
    result = run_hook(f"{shlex.quote(sys.executable)} {waiter} {go} {out} {{global_step}}", {"global_step": 7},
                      background=True)  # fmt: skip
    assert result is None
    assert not out.exists()  # still waiting for us (for up to 10 s): run_hook did not wait for it
    go.touch()
    deadline = time.monotonic() + 10
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert out.read_text() == "7"


def test_placeholder_helpers_follow_the_config():
    config = Config(model_family="flux", model_type="lora", hub_model_id="me/model", tracker_run_name="run one",
                    tracker_project_name="proj", validation_prompt="a dog", validation_seed=3,
                    validation_negative_prompt=None)  # fmt: skip
    values = notify.checkpoint_placeholders(config, 100, Path("/o/checkpoint-100"), remote_path="s3://b/k")
    assert values == {"tracker_run_name": "run one", "tracker_project_name": "proj", "model_family": "flux",
                      "model_type": "lora", "lora_type": "standard", "huggingface_path": "me/model",
                      "local_checkpoint_path": "/o/checkpoint-100", "global_step": "100",
                      "remote_checkpoint_path": "s3://b/k"}  # fmt: skip
    values = notify.validation_placeholders(config, 5, "/o/checkpoint-5")
    assert values["validation_prompt"] == "a dog" and values["validation_seed"] == "3"
    assert values["validation_negative_prompt"] == "" and values["local_checkpoint_path"] == "/o/checkpoint-5"
    assert values["remote_checkpoint_path"] == "" and values["global_step"] == "5"


def test_trainer_helpers_run_the_configured_scripts(argv_script, tmp_path):
    out = tmp_path / "out.json"
    config = Config(model_family="sdxl", validation_prompt="two words", validation_method="external-script",
                    validation_external_script=f"{argv_script} {out} {{validation_prompt}} {{local_checkpoint_path}}",
                    post_upload_script=f"{argv_script} {out} {{remote_checkpoint_path}} {{model_family}}")  # fmt: skip
    notify.check_hooks(config)
    assert notify.external_validation(config, 3, "/c/checkpoint-3") == 0
    assert json.loads(out.read_text()) == ["two words", "/c/checkpoint-3"]
    assert notify.post_upload(config, 3, "/c/checkpoint-3", "hf://me/m") == 0
    assert json.loads(out.read_text()) == ["hf://me/m", "sdxl"]
    assert notify.post_checkpoint(config, 3, "/c") is None  # unset: nothing runs


def test_check_hooks_rejects_unusable_script_options():
    with pytest.raises(ConfigError, match="needs validation_external_script"):
        notify.check_hooks(Config(validation_method="external-script"))
    with pytest.raises(ConfigError, match="post_checkpoint_script"):
        notify.check_hooks(Config(post_checkpoint_script="upload 'x"))
    notify.check_hooks(Config())

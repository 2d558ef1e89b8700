"""A hook script that hangs is killed, with the processes it started, after `hook_timeout` seconds."""

from __future__ import annotations

import pytest

from pipeline import notify
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.notify import run_hook
from tests.helpers.processes import alive, hanging_hook, wait_until


@pytest.fixture
def records(st_log):
    return st_log("notify")


def test_a_hanging_hook_and_its_children_are_killed_after_the_timeout(tmp_path, records):
    command, pids = hanging_hook(tmp_path)
    # The bound leaves the script time to start and write its pids even on a busy machine.
    assert run_hook(command, {}, name="validation_external_script", timeout=3) is None
    script_pid, child_pid = map(int, pids.read_text().split())
    assert not alive(script_pid)
    assert wait_until(lambda: not alive(child_pid))
    assert any("validation_external_script was still running after 3 s (hook_timeout) and was killed" in r.getMessage()
               for r in records)  # fmt: skip


def test_post_checkpoint_script_runs_in_the_background_and_is_awaited_up_to_its_bound(tmp_path, records):
    command, pids = hanging_hook(tmp_path)
    config = Config(post_checkpoint_script=command, hook_timeout=3)
    assert notify.post_checkpoint(config, 3, tmp_path / "checkpoint-3") is None  # returned while the script runs
    assert wait_until(pids.exists)
    script_pid, child_pid = map(int, pids.read_text().split())
    notify.wait_for_hooks()
    assert not alive(script_pid)
    assert wait_until(lambda: not alive(child_pid))
    messages = [r.getMessage() for r in records]
    assert any("post_checkpoint_script was still running after 3 s (hook_timeout) and was killed" in m
               for m in messages)  # fmt: skip


def test_wait_for_hooks_can_stop_them_at_once(tmp_path):
    command, pids = hanging_hook(tmp_path)
    notify.post_checkpoint(Config(post_checkpoint_script=command), 1, tmp_path / "checkpoint-1")  # bound: an hour
    assert wait_until(pids.exists)
    script_pid, _ = map(int, pids.read_text().split())
    notify.wait_for_hooks(kill=True)
    assert not alive(script_pid)


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf")])
def test_hook_timeout_must_be_a_positive_number_of_seconds(value):
    with pytest.raises(ConfigError, match=r"option 'hook_timeout' is \S+, (outside its range|not a finite number)"):
        notify.check_hooks(Config(hook_timeout=value))

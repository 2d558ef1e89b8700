"""`seed` makes `st train` reproducible across processes, and a resume continues the same run or says why it cannot.

Every run here is a separate `st train` process at the default thread count with prefetch on, on one shared cache of
4 images (tiny sd1x LoRA, 6 steps, LoRA dropout and caption dropout on, a checkpoint every 3 steps).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.training import WEIGHTS, cached_dataset, losses, run_st_train, st_env, st_train_args

COMMON = ["validation_disable=true", "disable_benchmark=true", 'report_to="none"', "lora_dropout=0.1",
          "caption_dropout_probability=0.3", "checkpoint_step_interval=3", "learning_rate=0.001"]  # fmt: skip
OUTPUTS = ("manifest.json", "metrics.jsonl", "final/*", "checkpoints/*/*")


def _args(setup: tuple[Path, Path], out: Path, *sets: str, flags: tuple[str, ...] = ()) -> list[str]:
    return st_train_args(setup, out, *COMMON, *sets, flags=flags)


def st_train(setup, out: Path, *sets: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return run_st_train(setup, out, *COMMON, *sets, flags=flags)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def outputs(out: Path) -> dict[str, bytes]:
    """The bytes of a train output's manifest, metrics, final weights and checkpoints."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for pattern in OUTPUTS for p in out.glob(pattern)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """A prepared and cached 4-image sd1x dataset with its tiny model."""
    root = tmp_path_factory.mktemp("seeded")
    return root, cached_dataset(root, "sd1x", tiny_model("sd1x"), images=4)


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run."""
    out = tmp_path_factory.mktemp("straight") / "train"
    done = st_train(setup, out, "max_train_steps=6")
    assert done.returncode == 0, done.stderr
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    return out


def test_three_steps_then_resume_to_six_equals_six_steps(setup, straight, tmp_path):
    out = tmp_path / "train"
    first = st_train(setup, out, "max_train_steps=3")
    assert first.returncode == 0, first.stderr
    second = st_train(setup, out, "max_train_steps=6", 'resume_from_checkpoint="latest"')
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "checkpoint-3" in second.stderr
    assert losses(out) == losses(straight)  # steps 1-3 kept from the first process, 4-6 trained by the second
    assert (out / WEIGHTS).read_bytes() == (straight / WEIGHTS).read_bytes()
    stats = manifest(out)["stats"]
    assert stats["steps"] == 6 and stats["steps_this_run"] == 3
    assert stats["resumed_from"] == {"checkpoint": "checkpoint-3", "step": 3, "changed": {"max_train_steps": [3, 6]}}


def _logged_steps(path: Path) -> set[int]:
    """The steps with a loss in metrics.jsonl so far; only whole lines count (the file may be mid-write)."""
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []
    return {record["step"] for record in map(json.loads, filter(str.strip, lines)) if "loss" in record}


def _wait_for_step(path: Path, step: int, process: subprocess.Popen, limit_s: float = 300) -> None:
    """Poll metrics.jsonl until it records `step` (fails if the process ends first or nothing comes)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "st train ended before it was killed"
        if step in _logged_steps(path):
            return
        time.sleep(0.01)
    pytest.fail(f"no step {step} in {path} after {limit_s} s")


def test_sigkill_before_the_first_checkpoint_then_rerun_equals_the_uninterrupted_run(setup, straight, tmp_path):
    """The re-run starts from step 0 in a process of its own: two runs with one seed are identical."""
    out = tmp_path / "train"
    # An evaluation after every step widens the gap between step 1 and the checkpoint at step 3; it runs with its own
    # random generators and in eval mode, so it does not change the trajectory (the re-run is compared with a run
    # that never evaluated).
    sets = ("max_train_steps=6", "eval_steps_interval=1", "num_eval_images=2")
    process = subprocess.Popen(_args(setup, out, *sets), env=st_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_for_step(out / "metrics.jsonl", 1, process)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("checkpoints/checkpoint-*"))
    rerun = st_train(setup, out, *sets)
    assert rerun.returncode == 0, rerun.stderr
    assert losses(out) == losses(straight)
    assert (out / WEIGHTS).read_bytes() == (straight / WEIGHTS).read_bytes()


def test_changed_learning_rate_never_resumes_a_finished_run(setup, straight, tmp_path):
    out = tmp_path / "train"
    shutil.copytree(straight, out)
    before = outputs(out)
    changed = ("max_train_steps=6", "learning_rate=0.002", 'resume_from_checkpoint="latest"')

    strict = st_train(setup, out, *changed, flags=("--resume-strict",))
    assert strict.returncode == 2
    assert "not resuming from checkpoint-6: learning_rate changed 0.001 -> 0.002" in strict.stderr
    assert "Traceback" not in strict.stderr
    assert outputs(out) == before

    fresh = st_train(setup, out, *changed)
    assert fresh.returncode == 0, fresh.stderr
    assert "not resuming from checkpoint-6: learning_rate changed 0.001 -> 0.002; starting from step 0" in fresh.stderr
    assert (out / WEIGHTS).read_bytes() != (straight / WEIGHTS).read_bytes()
    record = manifest(out)
    assert record["config"]["learning_rate"] == 0.002
    assert record["stats"]["steps"] == 6 and record["stats"]["steps_this_run"] == 6
    assert record["stats"]["resumed_from"] is None
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6] and losses(out)[1] == losses(straight)[1]
    # The fresh run's checkpoints replaced the old run's of the same steps: every listed one is this run's.
    for entry in record["checkpoints"]:
        info = json.loads((out / entry["path"] / "manifest.json").read_text())
        assert info["run"]["config"]["learning_rate"] == 0.002


def test_a_named_checkpoint_of_another_run_is_refused(setup, straight, tmp_path, cli):
    root, config = setup
    out = tmp_path / "train"
    shutil.copytree(straight, out)
    before = outputs(out)
    common = [item for s in COMMON for item in ("--set", s)]
    result = cli("train", "-c", config, "-i", root / "cache", "-o", out, *common, "--set", "max_train_steps=6",
                 "--set", "learning_rate=0.003", "--set", 'resume_from_checkpoint="checkpoint-3"')  # fmt: skip
    assert result.exit_code == 2
    assert "checkpoint-3 belongs to another run: learning_rate changed 0.001 -> 0.003" in result.output
    assert outputs(out) == before


def test_a_checkpoint_at_the_target_is_reported_and_one_past_it_refused(setup, straight, tmp_path, cli):
    root, config = setup
    out = tmp_path / "train"
    shutil.copytree(straight, out)
    common = [item for s in COMMON for item in ("--set", s)]
    base = ["train", "-c", config, "-i", root / "cache", "-o", out, *common, "--set", 'resume_from_checkpoint="latest"']
    past = cli(*base, "--set", "max_train_steps=5")
    assert past.exit_code == 2
    assert "checkpoint-6 is at step 6, past this run's target of 5 steps" in past.output

    # Another validation seed changes the train key but not the weights: the run resumes at step 6 and trains 0 steps.
    at = cli(*base, "--set", "max_train_steps=6", "--set", "validation_seed=7")
    assert at.exit_code == 0, at.output
    assert "checkpoint-6 is already at the target step 6" in at.output
    assert "0 step(s) trained by this run" in at.output
    assert (out / WEIGHTS).read_bytes() == (straight / WEIGHTS).read_bytes()
    stats = manifest(out)["stats"]
    assert stats["steps"] == 6 and stats["steps_this_run"] == 0
    assert stats["resumed_from"]["checkpoint"] == "checkpoint-6"

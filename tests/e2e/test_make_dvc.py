"""`make demo` and `dvc repro` drive the four stages: everything once, then nothing, then from `st prepare` on after
a caption edit. Small sizes (6 images, 2 steps, no validation images) keep each test to about a minute."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ST = BIN / "st"
STAGES = ("prepare", "cache", "train", "publish")
# What the tests turn off to be quick; none of these keys is one of dvc.yaml's params.
FAST = {"validation_disable": True, "disable_benchmark": True, "eval_steps_interval": 0, "report_to": "none"}

needs_make = pytest.mark.skipif(shutil.which("make") is None or not ST.exists(), reason="needs make and the st script")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    # One thread: tiny models on a shared CI machine are many times slower with more.
    env.update(OMP_NUM_THREADS="1", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    return env


def _run(args: list, cwd: Path | None = None, timeout: int = 300) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return output


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def _stage_commands(output: str) -> list[str]:
    """The stages whose `st STAGE` command line Make echoed."""
    return [s for s in STAGES if f"{ST} {s} " in output]


def _edit_caption(caption: Path, text: str | None = None) -> None:
    time.sleep(1.1)  # clearly newer than every stamp, even on a file system with one-second times
    if text is not None:
        caption.write_text(text)
    else:
        caption.touch()


@needs_make
def test_make_demo_runs_each_stage_once_and_again_only_downstream_of_a_change(tmp_path):
    demo = tmp_path / "demo"
    make = ["make", "-C", ROOT, "demo", f"DEMO={demo}", f"ST={ST}", "DEMO_STEPS=2", "DEMO_IMAGES=6",
            "DEMO_TRAIN_ARGS=" + " ".join(f"--set {k}={json.dumps(v)}" for k, v in FAST.items())]  # fmt: skip

    first = _run(make)
    assert _stage_commands(first) == list(STAGES)
    assert f"demo: published model in {demo / 'publish'}" in first
    assert (demo / "publish" / "pytorch_lora_weights.safetensors").is_file()
    train = json.loads((demo / "train" / "manifest.json").read_text())
    assert train["metrics"]["steps"] == 2

    before = _snapshot(demo)
    second = _run(make)
    assert "Nothing to be done for 'demo'" in second and _stage_commands(second) == []
    assert _snapshot(demo) == before, "a second make demo changed files"

    # Touching a caption without changing it: st prepare runs, finds itself up to date, and nothing else runs.
    caption = sorted((demo / "data" / "images").glob("*.txt"))[0]
    _edit_caption(caption)
    touched = _run(make)
    assert _stage_commands(touched) == ["prepare"] and "prepare: up to date" in touched
    assert "Nothing to be done for 'demo'" in _run(make)

    # Editing it: every stage runs once, the cache re-encodes that one sample.
    _edit_caption(caption, "a red circle, hand-drawn\n")
    edited = _run(make)
    assert _stage_commands(edited) == list(STAGES)
    assert "prepare: running because 1 file changed" in edited
    assert "cache: wrote (1 encoded, 5 reused)" in edited
    assert "train: wrote" in edited and "publish: wrote" in edited
    assert "Nothing to be done for 'demo'" in _run(make)


def test_dvc_yaml_params_are_the_demo_config_keys_each_stage_reads(tmp_path):
    """dvc.yaml lists, per stage, exactly the keys of the demo config that the stage reads (Config.stage_keys);
    a listed key missing from the config would stop `dvc repro`."""
    import yaml

    from pipeline.config import load_config, normalise_key, read_config_file
    from pipeline.sampledata import write_sample_dataset

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    variables = dvc["vars"][0]
    assert variables["config"] == "demo/data/config.json" and variables["model"] == "demo/model"
    config_path = write_sample_dataset(tmp_path / "data", images=1, family="sd1x", model=tmp_path / "model")
    loaded = load_config(config_path)
    keys = list(read_config_file(config_path))
    assert list(dvc["stages"]) == list(STAGES)
    for stage, spec in dvc["stages"].items():
        listed = [key for entry in spec.get("params", []) for key in entry.get("${config}", [])]
        expected = [k for k in keys if normalise_key(k) in loaded.config.stage_keys(stage)]
        assert listed == expected, stage
        assert spec["cmd"].startswith(f"st {stage} --config ${{config}}")
        ((out, options),) = [o.items() for o in spec["outs"]][0]
        assert out == f"${{out}}/{stage}" and options == {"cache": False, "persist": True}


@needs_make
def test_dvc_repro_runs_all_then_nothing_then_from_prepare(tmp_path, tiny_model):
    from pipeline.sampledata import write_sample_dataset

    dvc = [sys.executable, "-m", "dvc"]
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    _run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path)
    _run([*dvc, "config", "core.analytics", "false"], cwd=tmp_path)
    # What `make demo-data DEMO_IMAGES=6` writes (the make test runs that rule), without two more st processes.
    shutil.copytree(tiny_model("sd1x"), tmp_path / "demo" / "model")
    write_sample_dataset(tmp_path / "demo" / "data", images=6, family="sd1x", model=tmp_path / "demo" / "model")
    config_path = tmp_path / "demo" / "data" / "config.json"
    config = json.loads(config_path.read_text())
    config.update({"--max_train_steps": 2, **{f"--{k}": v for k, v in FAST.items()}})
    config_path.write_text(json.dumps(config, indent=2))

    first = _run([*dvc, "repro"], cwd=tmp_path)
    assert [s for s in STAGES if f"Running stage '{s}'" in first] == list(STAGES)
    assert (tmp_path / "demo" / "dvc" / "publish" / "pytorch_lora_weights.safetensors").is_file()

    second = _run([*dvc, "repro"], cwd=tmp_path)
    assert "Running stage" not in second and "Data and pipelines are up to date" in second

    caption = sorted((tmp_path / "demo" / "data" / "images").glob("*.txt"))[0]
    caption.write_text("a red circle, hand-drawn\n")
    edited = _run([*dvc, "repro"], cwd=tmp_path)
    assert [s for s in STAGES if f"Running stage '{s}'" in edited] == list(STAGES)
    assert "prepare: running because 1 file changed" in edited and "cache: wrote (1 encoded, 5 reused)" in edited

    # A train-only option: prepare runs (its dependency, the config file, changed) and finds itself up to date, so
    # the cache stage is skipped; train and publish run.
    config["--learning_rate"] = 2e-3
    config_path.write_text(json.dumps(config, indent=2))
    lr = _run([*dvc, "repro"], cwd=tmp_path)
    assert "prepare: up to date" in lr and "Stage 'cache' didn't change" in lr
    assert "Running stage 'train'" in lr and "Running stage 'publish'" in lr

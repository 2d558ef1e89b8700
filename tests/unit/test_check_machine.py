"""`st check --any-machine`: what a config needs of the machine that trains it (a CUDA GPU, a compute capability, a
GPU-only package) is listed apart instead of failing the check, while the config's own problems still fail it; without
the flag each need is a problem, as `st train` would refuse it here. SimpleTuner's Wan 2.1 t2v +cp-fa3 example
(base_model_precision fp8-torchao, attention_mechanism flash-attn-3-hub; tests/data/simpletuner_video_examples.json)
is the config, run from a folder laid out like SimpleTuner's repository root; its model is a hub id, never loaded."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pipeline import speed
from pipeline.config import Config
from pipeline.errors import ConfigError, MachineError
from pipeline.machine import ANY_MACHINE_HINT, deferred_machine_needs, require
from pipeline.quantise import check as check_precision
from pipeline.quantise import cuda_capable
from tests.helpers.files import VIDEO_EXAMPLES, write_video_examples

DATA = VIDEO_EXAMPLES
(EXAMPLE,) = DATA["context_parallel_configs"]
HEADING = "the machine that runs `st train` needs (this one lacks it):"
# What this machine lacks of the example (on a CPU machine: both).
LACKS = {"base_model_precision fp8-torchao": not cuda_capable("fp8-torchao"),
         "attention_mechanism flash-attn-3-hub": not (torch.cuda.is_available()
                                                      and importlib.util.find_spec("kernels") is not None)}  # fmt: skip
LACKED = [prefix for prefix, lacked in LACKS.items() if lacked]
needs_something = pytest.mark.skipif(not LACKED, reason="this machine has what the example needs")


@pytest.fixture
def example_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_video_examples(tmp_path, "context_parallel_configs")


def _problems(output: str) -> list[str]:
    return [line.strip()[2:] for line in output.splitlines() if line.startswith("  - ")]


def _needs(output: str) -> list[str]:
    lines = output.splitlines()
    if HEADING not in lines:
        return []
    return [line[4:] for line in lines[lines.index(HEADING) + 1:] if line.startswith("  * ")]


@needs_something
def test_without_the_flag_each_need_is_a_problem_with_the_hint(example_root, cli):
    result = cli("check", "--config", EXAMPLE)
    problems = _problems(result.output)
    assert result.exit_code == 2, result.output
    assert [p.split(" (")[0] for p in problems] == LACKED, result.output
    assert all(p.endswith(ANY_MACHINE_HINT) for p in problems) and HEADING not in result.output


@needs_something
def test_any_machine_lists_the_needs_and_passes(example_root, cli):
    result = cli("check", "--any-machine", "--config", EXAMPLE)
    assert result.exit_code == 0, result.output
    assert any(line.startswith("check: ok") for line in result.output.splitlines()) and not _problems(result.output)
    needs = _needs(result.output)
    assert [n.split(" (")[0] for n in needs] == LACKED, result.output
    if LACKS["attention_mechanism flash-attn-3-hub"]:
        assert any("kernels package" in n or "CUDA GPU" in n for n in needs)
    assert not any(ANY_MACHINE_HINT in n for n in needs)


@needs_something
def test_any_machine_still_fails_on_the_configs_own_problems(example_root, cli):
    """model_type full cannot train on a quantised base: a config error found after the fp8 need in the same check
    (it runs on), and a bad lr_scheduler found while loading, both fail the check with the flag too."""
    config = {**DATA["context_parallel_configs"][EXAMPLE], "model_type": "full", "lr_scheduler": "sometimes"}
    path = example_root / Path(EXAMPLE).with_name("broken.json")
    path.write_text(json.dumps(config))
    result = cli("check", "--any-machine", "--config", path)
    problems = _problems(result.output)
    assert result.exit_code == 2, result.output
    assert any("lr_scheduler" in p and "sometimes" in p for p in problems), result.output
    assert any("model_type full" in p for p in problems), result.output
    assert not any(ANY_MACHINE_HINT in p for p in problems)
    assert [n.split(" (")[0] for n in _needs(result.output)] == LACKED, result.output


def test_help_says_what_the_flag_does(cli):
    result = cli("check", "--help")
    assert result.exit_code == 0 and "--any-machine" in result.output and "another machine" in result.output


def test_require_raises_outside_the_deferral_and_records_inside_it():
    require(True, "never")
    with pytest.raises(MachineError, match="a CUDA GPU"):
        require(False, "a CUDA GPU")
    assert issubclass(MachineError, ConfigError)  # exit 2, as every refused config
    with deferred_machine_needs() as needs:
        require(False, "a CUDA GPU")
        require(False, "a CUDA GPU")
        require(False, "the kernels package")
        require(True, "never")
    assert needs == ["a CUDA GPU", "the kernels package"]
    with pytest.raises(MachineError):  # the deferral ends with its block
        require(False, "a CUDA GPU")


def test_st_trains_checks_raise_at_once_on_a_cpu():
    """What `st train` calls with its device: refused at once (no deferral there), as before."""
    with pytest.raises(MachineError, match="flash-attn-3-hub .* needs .*a CUDA GPU \\(this run is on cpu\\)"):
        speed.check_attention_requirements("flash-attn-3-hub", torch.device("cpu"))
    with pytest.raises(MachineError, match="native-efficient' is a CUDA kernel and this run is on cpu"):
        speed.check_attention("native-efficient", torch.device("cpu"))
    with pytest.raises(MachineError, match="base_model_precision fp8-torchao .* needs a CUDA GPU"):
        check_precision(Config(model_family="wan", model_type="lora", base_model_precision="fp8-torchao"), cuda=False)


def test_deferred_needs_let_the_check_go_on():
    """Under the deferral the probe records its need and the same function's config checks still run."""
    with deferred_machine_needs() as needs:
        assert speed.check_attention_requirements("flash-attn-3-hub", torch.device("cpu")) == "flash-attn-3-hub"
        with pytest.raises(ConfigError, match="model_type full"):
            check_precision(Config(model_family="wan", model_type="full", base_model_precision="fp8-torchao"),
                            cuda=False)  # fmt: skip
    assert [n.split(" (")[0] for n in needs] == ["attention_mechanism flash-attn-3-hub",
                                                 "base_model_precision fp8-torchao"]

"""SimpleTuner's Wan 2.1 (t2v, RamTorch), Wan TREAD (2.1 1.3B, 2.2 I2V A14B high and low), Wan 2.1 i2v context
parallel (+cp-fa3, 480p and 720p) and LTX-Video 0.9.5 example configs load unchanged, run from a folder laid out like
SimpleTuner's repository root (their dataset lists are named from there), and `st check` decides each as `st train`
would on this machine: the TREAD and LTX-Video examples pass; the Wan 2.1 RamTorch and +cp-fa3 examples set
attention_mechanism flash-attn-3-hub (diffusers' `_flash_3_hub` backend), which needs the `kernels` package and a
CUDA GPU, so without them both commands refuse it (exit 2) with the same message. The configs and their Hugging Face
video dataset lists are in tests/data/simpletuner_video_examples.json as SimpleTuner ships them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from pipeline import speed
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.machine import ANY_MACHINE_HINT
from tests.helpers.files import VIDEO_EXAMPLES, write_video_examples

DATA = VIDEO_EXAMPLES
CONFIGS = sorted(DATA["configs"])


@pytest.fixture
def simpletuner_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_video_examples(tmp_path)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.split("/")[2])
def test_every_option_of_the_example_loads(simpletuner_root, config):
    loaded = load_config(simpletuner_root / config)
    assert loaded.config.model_family in ("wan", "ltxvideo")
    if "TREAD" in config:  # the routes are kept as the example writes them
        assert loaded.config.tread_config["routes"] == DATA["configs"][config]["tread_config"]["routes"]
    if "+cp-fa3" in config:
        assert (loaded.config.context_parallel_size, loaded.config.context_parallel_comm_strategy) == (2, "allgather")
    if loaded.config.ramtorch:
        assert loaded.config.ramtorch_transformer_percent == 100
        assert "ramtorch_disable_sync_hooks" in loaded.ignored


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.split("/")[2])
def test_st_check_decides_the_example_as_st_train_would(simpletuner_root, config, cli):
    loaded = load_config(simpletuner_root / config)
    try:  # what `st train` decides about the speed options before loading a model, on this machine's device
        speed.check_train_options(loaded.config, torch.device(speed.local_device()))
        refusal = None
    except UserError as exc:
        refusal = str(exc)
    hub_fa3 = DATA["configs"][config].get("attention_mechanism") == "flash-attn-3-hub"
    lacking = not (torch.cuda.is_available() and importlib.util.find_spec("kernels") is not None)
    assert (refusal is not None) == (hub_fa3 and lacking), refusal
    result = cli("check", "--config", config)
    if refusal is None:
        assert result.exit_code == 0, result.output
        assert "check: ok" in result.output and "Hugging Face dataset sayakpaul/video-dataset-disney-organized" in (
            result.output)
        return
    assert refusal.startswith("attention_mechanism flash-attn-3-hub (diffusers' '_flash_3_hub' attention backend) "
                              "needs ")  # fmt: skip
    problems = [line.strip()[2:] for line in result.output.splitlines() if line.strip().startswith("- ")]
    assert result.exit_code == 2 and problems == [f"{refusal} {ANY_MACHINE_HINT}"], result.output

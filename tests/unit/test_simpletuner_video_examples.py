"""SimpleTuner's Wan 2.1 (t2v, RamTorch), Wan TREAD (2.1 1.3B, 2.2 I2V A14B high and low) and LTX-Video 0.9.5
example configs pass `st check` unchanged, run from a folder laid out like SimpleTuner's repository root (their
dataset lists are named from there). The configs and their
Hugging Face video dataset lists are in tests/data/simpletuner_video_examples.json as SimpleTuner ships them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config

DATA = json.loads((Path(__file__).resolve().parents[1] / "data" / "simpletuner_video_examples.json").read_text())
CONFIGS = sorted(DATA["configs"])


@pytest.fixture
def simpletuner_root(tmp_path, monkeypatch) -> Path:
    for relative, content in {**DATA["configs"], **DATA["lists"]}.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(json.dumps(content))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.split("/")[2])
def test_every_option_of_the_example_loads(simpletuner_root, config):
    loaded = load_config(simpletuner_root / config)
    assert loaded.config.model_family in ("wan", "ltxvideo")
    if "TREAD" in config:  # the routes are kept as the example writes them
        assert loaded.config.tread_config["routes"] == DATA["configs"][config]["tread_config"]["routes"]
    if loaded.config.ramtorch:
        assert loaded.config.ramtorch_transformer_percent == 100
        assert "ramtorch_disable_sync_hooks" in loaded.ignored


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.split("/")[2])
def test_the_example_passes_st_check_unchanged(simpletuner_root, config, cli):
    result = cli("check", "--config", config)
    assert result.exit_code == 0, result.output
    assert "check: ok" in result.output and "Hugging Face dataset sayakpaul/video-dataset-disney-organized" in (
        result.output)

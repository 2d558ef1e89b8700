"""SimpleTuner's Flux-family image examples that use its ControlNet LoRA preset, LyCORIS on an int8-torchao base and
SDNQ quantisation, run through `st check` unchanged from a folder laid out like SimpleTuner's repository root. The
configs, their LyCORIS files and their dataset lists are in tests/data/simpletuner_image_examples.json as SimpleTuner
ships them. The first two pass; the SDNQ ones are refused for SDNQ alone, naming the option and its value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = json.loads((Path(__file__).resolve().parents[1] / "data" / "simpletuner_image_examples.json").read_text())
SDNQ = [name for name, config in DATA["configs"].items() if config["base_model_precision"].endswith("-sdnq")]
PASSING = [name for name in DATA["configs"] if name not in SDNQ]


def example(name: str) -> str:
    return name.split("/")[2]


@pytest.fixture
def simpletuner_root(tmp_path, monkeypatch) -> Path:
    for relative, content in {**DATA["configs"], **DATA["files"], **DATA["lists"]}.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(json.dumps(content))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_examples_are_the_ones_issue_16_names():
    assert sorted(map(example, PASSING)) == ["flux.peft-controlnet-lora", "flux2-klein-9b-i2i.lycoris-lokr"]
    assert sorted(map(example, SDNQ)) == ["flux2.peft-lora", "flux2.peft-lora+TREAD", "z-image-turbo.peft-lora"]


@pytest.mark.parametrize("config", PASSING, ids=example)
def test_the_example_passes_st_check_unchanged(simpletuner_root, config, cli):
    result = cli("check", "--config", config)
    assert result.exit_code == 0, result.output
    assert "check: ok" in result.output and "Hugging Face dataset keras-dreambooth/minercraft" in result.output


@pytest.mark.parametrize("config", SDNQ, ids=example)
def test_an_sdnq_example_is_refused_for_sdnq_alone(simpletuner_root, config, cli):
    result = cli("check", "--config", config)
    assert result.exit_code == 2, result.output
    assert "check: 1 problem(s)" in result.output
    assert ("st does not implement base_model_precision 'int8-sdnq' (a SimpleTuner preset) yet: SDNQ quantisation"
            in " ".join(result.output.split()))  # fmt: skip
    # with another 8-bit preset it checks: its sdnq_* settings are read only with an SDNQ preset
    result = cli("check", "--config", config, "--set", 'base_model_precision="int8-quanto"')
    assert result.exit_code == 0 and "check: ok" in result.output, result.output


@pytest.mark.parametrize("key", ["base_model_precision", "text_encoder_1_precision"])
def test_every_sdnq_preset_is_refused_naming_the_option(tmp_path, key):
    from pipeline.config import load_config
    from pipeline.errors import NotSupportedError
    from pipeline.simpletuner import SDNQ_PRESETS

    assert len(SDNQ_PRESETS) == 12
    for preset in SDNQ_PRESETS:
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"model_family": "flux2", key: preset}))
        with pytest.raises(NotSupportedError, match=f"st does not implement {key} '{preset}'"):
            load_config(path)

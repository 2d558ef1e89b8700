"""SimpleTuner's own AuraFlow and Lumina 2 example configs pass `st check` unchanged, given the dataset list they
name (SimpleTuner ships it beside its examples; here it is a small local one)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.training import ST, st_env

EXAMPLES = Path("/tmp/simpletuner-src/simpletuner/examples")
DATASET_LIST = "config/examples/multidatabackend-small-dreambooth-512px.json"


@pytest.mark.parametrize("family", ["auraflow", "lumina2"])
def test_simpletuners_example_config_checks(tmp_path, family):
    example = EXAMPLES / f"{family}.peft-lora" / "config.json"
    if not example.is_file():
        pytest.skip("SimpleTuner's examples are not extracted on this machine")
    config = json.loads(example.read_text())
    assert config["model_family"] == family and config["data_backend_config"] == DATASET_LIST
    shutil.copy(example, tmp_path / "config.json")
    images = tmp_path / "datasets" / "subject"
    images.mkdir(parents=True)
    entries = [{"id": "subject", "type": "local", "instance_data_dir": "datasets/subject",
                "caption_strategy": "textfile", "resolution": 512, "resolution_type": "pixel_area"},
               {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
                "cache_dir": "cache/text"}]  # fmt: skip
    (tmp_path / DATASET_LIST).parent.mkdir(parents=True)
    (tmp_path / DATASET_LIST).write_text(json.dumps(entries))
    done = subprocess.run([ST, "check", "-c", "config.json"], cwd=tmp_path, env=st_env(), capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr

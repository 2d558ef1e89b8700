"""tools/simpletuner_corpus.py on a miniature SimpleTuner tree: each config and documentation block is classified as a
user reads it (ok / refused naming the feature / failed with the fix / fragment), and a local dataset prepares."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "simpletuner_corpus.py"

# Options the checks rely on, stated rather than left to the defaults.
BASE = {"model_type": "lora", "train_batch_size": 1, "learning_rate": 1e-4, "lora_dropout": 0,
        "caption_dropout_probability": 0, "resolution": 64, "resolution_type": "pixel",
        "data_backend_config": "config/examples/multidatabackend-local.json"}  # fmt: skip
LOCAL_LIST = [{"id": "subject", "type": "local", "instance_data_dir": "datasets/subject",
               "caption_strategy": "textfile", "resolution": 64, "resolution_type": "pixel", "minimum_image_size": 32,
               "crop": False},
              {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
               "cache_dir": "cache/text"}]  # fmt: skip
QUICKSTART = """# FLUX quickstart

```json
{
  "model_family": "flux",
  "flux_lora_target": "controlnet",
  "model_type": "lora",
  "data_backend_config": "config/multidatabackend.json",
}
```

```json
[
  {"id": "camera", "type": "local", "instance_data_dir": "datasets/camera", "caption_strategy": "filename",
   "resolution": 64, "resolution_type": "pixel", "minimum_image_size": 32}
]
```

```json
"validation_preview": true,
```

```json
[
  {"id": "pseudo-camera", "type": "local", "instance_data_dir": "/home/user/datasets/pseudo-camera",
   "caption_strategy": "filename", "resolution": 64, "resolution_type": "pixel", "minimum_image_size": 32}
]
```
"""


def _config(**options) -> str:
    return json.dumps({**BASE, **options}, indent=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, dict]:
    tree = tmp_path_factory.mktemp("simpletuner")
    files = {
        "simpletuner/examples/sdxl.peft-lora/config.json": _config(model_family="sdxl"),
        "simpletuner/examples/sdxl.lycoris-lokr/config.json": _config(
            model_family="sdxl", lora_type="lycoris", base_model_precision="int8-torchao", quantize_via="pipeline",
            lycoris_config="config/examples/sdxl.lycoris-lokr/lycoris_config.json"),
        "simpletuner/examples/sdxl.lycoris-lokr/lycoris_config.json": json.dumps({"algo": "lokr", "factor": 16}),
        "simpletuner/examples/pixart.peft-lora/config.json": _config(model_family="pixart"),
        "simpletuner/examples/ltxvideo2.peft-lora/config.json": _config(model_family="ltxvideo2"),
        "simpletuner/examples/multidatabackend-local.json": json.dumps(LOCAL_LIST),
        "config/config.json.example": "{}",
        "documentation/quickstart/FLUX.md": QUICKSTART,
    }  # fmt: skip
    for relative, text in files.items():
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        (tree / relative).write_text(text)
    result = subprocess.run([sys.executable, str(TOOL), str(tree), "--prepare", "--json"], capture_output=True,
                            check=False, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    return {row["name"]: row for row in report["items"]} | {"totals": report["totals"]}


def test_a_supported_family_with_a_local_dataset_checks_and_prepares(corpus):
    row = corpus["examples/sdxl.peft-lora"]
    assert (row["status"], row["prepare"]) == ("ok", "ok"), row


def test_a_feature_st_lacks_is_refused_naming_it(corpus):
    row = corpus["examples/sdxl.lycoris-lokr"]
    assert row["status"] == "refused", row
    assert "base_model_precision int8-torchao with lora_type lycoris" in row["message"]
    assert "LyCORIS on a torchao base" in row["message"]


def test_simpletuners_misnamed_family_fails_with_simpletuners_name(corpus):
    row = corpus["examples/pixart.peft-lora"]
    assert row["status"] == "failed", row
    assert "SimpleTuner names that family 'pixart_sigma'; set model_family to 'pixart_sigma'" in row["message"]
    assert "is not set" not in row["message"]


def test_only_the_families_st_supports_are_checked(corpus):
    assert "examples/ltxvideo2.peft-lora" not in corpus


def test_an_incomplete_config_fails_with_its_fix(corpus):
    row = corpus["config/config.json.example"]
    assert row["status"] == "failed" and "model_family" in row["message"], row


def test_quickstart_blocks_are_classified(corpus):
    config, listing, fragment = (corpus[f"quickstart/FLUX#{n}"] for n in (1, 2, 3))
    assert config["status"] == "failed", config  # the preset needs controlnet: true, which the block does not set
    assert "flux_lora_target 'controlnet' (a SimpleTuner preset)" in config["message"]
    assert "set controlnet true" in config["message"]
    assert (listing["kind"], listing["status"], listing["prepare"]) == ("dataset list", "ok", "ok"), listing
    assert fragment["status"] == "fragment"


def test_a_documents_absolute_placeholder_folder_is_placed_in_the_working_folder_and_prepares(corpus):
    row = corpus["quickstart/FLUX#4"]
    assert (row["status"], row["prepare"]) == ("ok", "ok"), row
    assert row["message"] == "absolute dataset folders placed under the working folder: /home/user/datasets/pseudo-camera"
    assert not Path("/home/user/datasets/pseudo-camera").exists()


def test_totals_count_every_row(corpus):
    assert corpus["totals"] == {"ok": 3, "refused": 1, "failed": 3, "fragment": 1, "prepare ok": 3}

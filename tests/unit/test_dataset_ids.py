"""What a dataset id may be: any string SimpleTuner's lists use, dots included, except what would make it a path, a
hidden or relative folder, or an unprintable or over-long file name (st names shards and folders after ids)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.datasets import MAX_ID_BYTES, load_dataset_list
from pipeline.errors import ConfigError

EXAMPLE = Path("/tmp/simpletuner-src/simpletuner/examples/ltxvideo2-2.5-dev-768x512-mps-48g.peft-lora")


def _load(tmp_path, entries):
    for entry in entries:
        if "instance_data_dir" in entry:
            (tmp_path / entry["instance_data_dir"]).mkdir(parents=True, exist_ok=True)
    (tmp_path / "list.json").write_text(json.dumps(entries))
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": str(tmp_path / "list.json")}))
    return load_dataset_list(load_config(tmp_path / "config.json"))


def test_ids_with_dots_load_as_written(tmp_path):
    entries = [
        {"id": "ltxvideo2-2.5-disney-video-768x512-49f", "instance_data_dir": "pics", "conditioning_data": "edges.v1",
         "conditioning": [{"type": "canny"}]},
        {"id": "edges.v1", "dataset_type": "conditioning", "instance_data_dir": "edges"},
        {"id": "held..out.", "dataset_type": "eval", "instance_data_dir": "held"},
        {"id": "x" * MAX_ID_BYTES, "instance_data_dir": "long"},
    ]  # fmt: skip
    lists = _load(tmp_path, entries)
    video = "ltxvideo2-2.5-disney-video-768x512-49f"
    assert [s.id for s in lists.images] == [video, "held..out.", "x" * MAX_ID_BYTES]
    assert sorted(c.id for c in lists.conditioning) == ["edges.v1", f"{video}_conditioning_canny"]
    assert sorted(lists.images[0].conditioning_data) == ["edges.v1", f"{video}_conditioning_canny"]


@pytest.mark.parametrize(("ident", "problem"), [
    ("..", "is the folder name '..'"),
    (".", "is the folder name '.'"),
    (".hidden", "starts with '.' (a hidden file name)"),
    ("a/b", "contains a path separator"),
    ("a\\b", "contains a path separator"),
    ("a\nb", "contains a control character"),
    ("a\x00b", "contains a control character"),
    ("é" * (MAX_ID_BYTES // 2 + 1), f"is longer than {MAX_ID_BYTES} bytes"),
])  # fmt: skip
@pytest.mark.parametrize("dataset_type", ["image", "conditioning"])
def test_unsafe_ids_are_refused_naming_the_id_and_the_rule(tmp_path, ident, problem, dataset_type):
    entries = [{"id": ident, "dataset_type": dataset_type, "instance_data_dir": "pics"}]
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, entries)
    message = str(caught.value)
    assert f"dataset id {ident!r} {problem}" in message
    assert "an id may not contain '/', '\\' or control characters, be '.' or '..', start with '.'" in message
    assert "dots inside are fine" in message and "rename the id" in message


def test_a_generated_id_too_long_for_a_file_name_is_refused(tmp_path):
    source = "x" * (MAX_ID_BYTES - 5)
    entries = [{"id": source, "instance_data_dir": "pics", "conditioning": [{"type": "canny"}]}]
    with pytest.raises(ConfigError, match=re.escape(f"the dataset generated for '{source}': dataset id "
                                                    f"'{source}_conditioning_canny' is longer than")):  # fmt: skip
        _load(tmp_path, entries)


@pytest.mark.skipif(not EXAMPLE.is_dir(), reason="SimpleTuner's examples are not extracted here")
def test_check_no_longer_refuses_simpletuners_dotted_example_id(cli, tmp_path, monkeypatch):
    """SimpleTuner's own example, laid out as its launcher reads it (config/examples/<name>/ under the working
    folder): `st check` still fails it (the ltxvideo2 family and more), but not for its dataset id."""
    shutil.copytree(EXAMPLE, tmp_path / "config" / "examples" / EXAMPLE.name)
    monkeypatch.chdir(tmp_path)
    result = cli("check", "-c", f"config/examples/{EXAMPLE.name}/config.json")
    assert result.exit_code == 2 and "model_family 'ltxvideo2'" in result.stdout, result.output
    # the entry loads to its end (max_num_samples included): its ignored cache keys are logged under its id
    assert "dataset 'ltxvideo2-2.5-disney-video-768x512-49f': ignoring 'cache_file_suffix'" in result.stderr
    assert "dataset id" not in result.stdout and "may not contain" not in result.stdout

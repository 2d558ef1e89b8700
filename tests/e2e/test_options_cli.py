"""`st options` lists every option with its type, default, stages and SimpleTuner state; `st config show` prints the
effective config with the origin of each value (default, file, --set, an alias). Neither imports torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


def _row(output: str, name: str) -> list[str]:
    """The cells of option `name`'s row in a table of `st options` or `st config show` (columns are 2+ spaces apart)."""
    for line in output.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row for {name!r} in:\n{output}")


def test_search_finds_an_option_with_its_default(cli):
    result = cli("options", "--search", "learning_rate")
    assert result.exit_code == 0, result.output
    assert _row(result.stdout, "learning_rate")[:6] == ["learning_rate", "float", "4e-07", "train", "yes",
                                                        "implemented"]  # fmt: skip
    assert "lora_rank" not in result.stdout


def test_search_matches_help_text(cli):
    result = cli("options", "--search", "megapixels")
    assert result.exit_code == 0, result.output
    assert _row(result.stdout, "resolution")[:4] == ["resolution", "float", "1024.0", "prepare"]


def test_stage_lists_only_what_the_stage_reads(cli):
    result = cli("options", "--stage", "prepare")
    assert result.exit_code == 0, result.output
    assert _row(result.stdout, "resolution")
    assert _row(result.stdout, "max_workers")[4] == "no"  # read by prepare, but never in its key
    for absent in ("learning_rate", "base_model_precision", "cache_dir_vae"):
        assert f"\n{absent} " not in result.stdout


def test_refused_accepted_and_aliases_are_listed(cli):
    result = cli("options", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    refused = rows["trust_remote_code"]
    assert refused["state"] == "refused"
    assert "model code from the hub" in refused["notes"]
    assert rows["tread_config"]["state"] == "implemented" and "TREAD" in rows["tread_config"]["notes"]
    precision = rows["base_model_precision"]
    assert precision["state"] == "implemented" and precision["default"] == "no_change"
    assert rows["cache_dir_vae"]["state"] == "accepted" and "cache" in rows["cache_dir_vae"]["notes"]
    alias = rows["checkpointing_steps"]
    assert alias["state"] == "alias of checkpoint_step_interval" and alias["stages"] == ["train"]
    assert "true -> optimizer=bnb-adamw8bit" in rows["use_8bit_adam"]["notes"]


def test_refused_option_shows_its_feature_in_the_table(cli):
    result = cli("options", "--search", "scheduled_sampling_max_step_offset")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("scheduled_sampling_max_step_offset "))
    assert "refused" in row and "feature st lacks: scheduled sampling" in row and " 0 " in row


def test_unknown_stage_is_a_usage_error(cli):
    result = cli("options", "--stage", "fit")
    assert result.exit_code == 2
    assert "--stage 'fit' is not a stage; choose one of prepare, cache, train, publish" in result.stderr


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"--checkpointing_steps": 50, "learning_rate": "3e-4", "lora_rank": 16,
                                "cache_dir_vae": "vae-cache"}))  # fmt: skip
    return path


def test_config_show_names_each_origin(cli, config):
    result = cli("config", "show", "-c", config, "--set", "validation_steps=10", "--set", "lora_alpha=4")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert _row(out, "checkpoint_step_interval")[1:] == ["50", "alias checkpointing_steps (file)"]
    assert _row(out, "validation_step_interval")[1:] == ["10", "alias validation_steps (--set)"]
    assert _row(out, "learning_rate")[1:] == ["0.0003", "file"]
    assert _row(out, "lora_alpha")[1:] == ["4.0", "--set"]
    assert _row(out, "lora_rank")[1:] == ["16", "file"]  # given, although at its default
    assert "optimizer " not in out  # at its default and not given
    assert "cache_dir_vae = vae-cache (file)" in out


def test_config_show_set_wins_over_a_file_alias(cli, config):
    result = cli("config", "show", "-c", config, "--set", "checkpoint_step_interval=7", "--json")
    assert result.exit_code == 0, result.output
    options = json.loads(result.stdout)["options"]
    assert options["checkpoint_step_interval"] == {"value": 7, "origin": "--set", "default": 500}


def test_config_show_all_lists_defaults(cli, config):
    result = cli("config", "show", "-c", config, "--all", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["options"]["optimizer"] == {"value": "adamw_bf16", "origin": "default", "default": "adamw_bf16"}
    assert shown["ignored"]["cache_dir_vae"]["origin"] == "file"


def test_config_show_stops_on_a_bad_config(cli, config):
    result = cli("config", "show", "-c", config, "--set", "lora_rank=abc")
    assert result.exit_code == 2
    assert "--set lora_rank=abc" in result.stderr


def test_neither_command_imports_torch(config):
    code = ("import sys; from typer.testing import CliRunner; from pipeline.cli import app; r = CliRunner();"
            "a = r.invoke(app, ['options']); b = r.invoke(app, ['config', 'show', '-c', sys.argv[1]]);"
            "print(a.exit_code, b.exit_code, 'torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "0", "False"]

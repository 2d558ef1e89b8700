"""`st check` lists every problem of a config at once (exit 2) or says ok (exit 0); the global flags work after the
command; `--version`; errors of `--set` name `--set`, not the config file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline import __version__
from pipeline.sampledata import write_sample_dataset


@pytest.fixture()
def sample(tmp_path, tiny_model):
    """A sample dataset whose config names a tiny sd1x model: (config path, model folder)."""
    model = tiny_model("sd1x")
    return write_sample_dataset(tmp_path / "data", images=4, family="sd1x", model=model), model


def test_check_passes_a_good_config(cli, sample):
    config, model = sample
    result = cli("check", "-c", config)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("check: ok")
    assert str(model) in result.stdout and "sd1x" in result.stdout and "1 dataset(s): shapes" in result.stdout


def test_check_lists_every_problem_at_once(cli, sample, tmp_path):
    config, model = sample
    datasets = json.loads((config.parent / "multidatabackend.json").read_text())
    datasets.append({**datasets[0], "id": "more", "instance_data_dir": "more-images"})
    datasets[0]["instance_data_dir"] = "no-such-folder"
    (config.parent / "multidatabackend.json").write_text(json.dumps(datasets))

    result = cli("check", "-c", config, "--set", "model_family=sdxl")
    assert result.exit_code == 2, result.output
    assert "check: 3 problem(s)" in result.stdout
    assert f"model_family is 'sdxl', but the model folder {model} looks like sd1x" in result.stdout
    assert "--set model_family=sd1x" in result.stdout  # the fix
    for folder in ("no-such-folder", "more-images"):
        assert f"instance_data_dir {config.parent / folder} does not exist" in result.stdout
    assert "Traceback" not in result.output


def test_check_goes_on_past_bad_options(cli, sample):
    """A bad value in the file and in --set are both listed, and the datasets and model are still checked."""
    config, _ = sample
    options = json.loads(config.read_text())
    options["--learning_rate"] = "fast"
    config.write_text(json.dumps(options))
    (config.parent / "images").rename(config.parent / "moved")

    result = cli("check", "-c", config, "--set", "lora_rank=abc", "--set", "model_family=sdxl")
    assert result.exit_code == 2, result.output
    out = result.stdout
    assert f"option 'learning_rate' in {config} must be float" in out
    assert "--set lora_rank=abc: option 'lora_rank' must be int" in out
    assert "model_family is 'sdxl'" in out and "instance_data_dir" in out


def test_a_rejected_model_family_is_one_problem(cli, sample):
    """SimpleTuner's newer name for a family is reported once, with the fix, not again by the checks that need one."""
    config, _ = sample
    options = json.loads(config.read_text())
    options["--model_family"] = "cosmos"
    config.write_text(json.dumps(options))
    result = cli("check", "-c", config)
    assert result.exit_code == 2, result.output
    assert "check: 1 problem(s)" in result.stdout, result.stdout
    assert "set model_family to 'cosmos2image'" in result.stdout and "unknown model family" not in result.stdout


def test_check_names_a_missing_local_model_and_a_missing_dataset_list(cli, sample):
    config, _ = sample
    result = cli("check", "-c", config, "--set", 'pretrained_model_name_or_path="./gone"',
                 "--set", 'data_backend_config="missing.json"')  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"pretrained_model_name_or_path {config.parent / 'gone'} does not exist" in result.stdout
    assert f"data_backend_config {config.parent / 'missing.json'} does not exist" in result.stdout


def test_check_notes_a_hub_model_without_fetching_it(cli, sample):
    config, _ = sample
    result = cli("check", "-c", config, "--set", 'pretrained_model_name_or_path="some-org/some-model"')
    assert result.exit_code == 0, result.output
    assert "some-org/some-model (sd1x; a hub id, downloaded by `st cache`" in result.stdout


def test_set_errors_name_the_set_item_not_the_config_file(cli, sample, tmp_path):
    config, _ = sample
    result = cli("prepare", "-c", config, "-o", tmp_path / "prep", "--set", "learning_rate=abc")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --set learning_rate=abc: option 'learning_rate' must be float")
    assert str(config) not in result.stderr
    assert not (tmp_path / "prep").exists()


def test_global_flags_work_after_the_command(cli, sample):
    config, _ = sample
    quiet = cli("check", "-c", config, "-q")
    assert quiet.exit_code == 0, quiet.output
    assert "ignoring" not in quiet.stderr
    verbose = cli("check", "--config", config, "--verbose")
    assert verbose.exit_code == 0, verbose.output
    assert "ignoring" in verbose.stderr


@pytest.mark.parametrize("args", [["--version"], ["-V"], ["status", "-V"]])
def test_version(cli, args):
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"st {__version__}"


def test_help_does_not_import_torch():
    code = ("import sys; from pipeline.cli import app\ntry: app(['--help'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_check_reports_a_bad_lycoris_file_and_a_precision_this_machine_cannot_run(cli, sample, tmp_path):
    import torch

    config, _ = sample
    (tmp_path / "lycoris.json").write_text(json.dumps({"algo": "lokr", "factr": 16}))
    result = cli("check", "-c", config, "--set", 'lora_type="lycoris"', "--set",
                 f'lycoris_config="{tmp_path / "lycoris.json"}"', "--set", 'base_model_precision="nf4-bnb"')  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"lycoris_config {tmp_path / 'lycoris.json'}: key 'factr' is not a LyCORIS setting" in result.stdout
    if not torch.cuda.is_available():
        assert "base_model_precision nf4-bnb" in result.stdout and "needs a CUDA GPU" in result.stdout

"""Without --config, st finds the config where SimpleTuner's launcher does: config/<ENV>/config.json|toml|env."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers.files import make_image


def _st(cwd, *args, **env):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)  # fmt: skip


def _layout(root, folder, learning_rate):
    (root / folder).mkdir(parents=True)
    (root / folder / "config.json").write_text(json.dumps({"--learning_rate": learning_rate,
                                                           "--data_backend_config": "config/multidatabackend.json"}))


def test_config_folder_and_env_select_the_config(tmp_path):
    make_image(tmp_path / "images" / "a.png")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "multidatabackend.json").write_text(json.dumps([{"id": "d", "instance_data_dir": "images"}]))
    _layout(tmp_path, "config/default-less", 3e-4)
    (tmp_path / "config" / "config.json").write_text(json.dumps({"--learning_rate": 2e-4,
                                                                 "--data_backend_config": "config/multidatabackend.json"}))
    plain = _st(tmp_path, "config", "show")
    assert plain.returncode == 0, plain.stderr
    assert "0.0002" in plain.stdout and "file" in plain.stdout
    chosen = _st(tmp_path, "config", "show", ENV="default-less")
    assert chosen.returncode == 0, chosen.stderr
    assert "0.0003" in chosen.stdout
    missing = _st(tmp_path, "config", "show", ENV="nowhere")
    assert missing.returncode == 2 and "pass --config" in missing.stderr and "nowhere" in missing.stderr

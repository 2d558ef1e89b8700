"""`model_family = "omnigen"` (SimpleTuner's OmniGen) is refused with exit 2, naming what st lacks for it, rather than
reported as an unknown family."""

from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from pipeline.errors import NotSupportedError


def test_omnigen_is_refused_naming_the_missing_feature(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"--model_family": "omnigen", "--data_backend_config": "datasets.json"}))
    with pytest.raises(NotSupportedError, match="st does not implement model_family 'omnigen' .*OmniGen family") as error:
        load_config(config)
    assert error.value.exit_code == 2

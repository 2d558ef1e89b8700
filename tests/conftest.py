"""Shared fixtures: an offline environment, tiny models and their cached sample data, a CLI runner and st's log
records (helpers that are not fixtures live in tests/helpers)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def machine_state(tmp_path_factory):
    """Stat records of up-to-date checks (pipeline/runner.py) go to this run's temporary folder, not ~/.cache; `st`
    subprocesses inherit the variable."""
    os.environ["ST_STATE_DIR"] = str(tmp_path_factory.mktemp("st-state"))


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine extra threads make them
    many times slower; byte-for-byte comparisons with subprocesses also assume one thread (OMP_NUM_THREADS=1)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def cli():
    """Invoke the `st` app in-process; returns the click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(family, seed=0, flavour=None)`: the folder of a tiny random-weight model of that family (of its
    variant `flavour`, as `st tiny-model FAMILY DIR --flavour FLAVOUR` writes it: that command builds it), built once
    per test run on first use. Tests that change a model work on a copy."""
    from pipeline.families import get_family

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[tuple[str, int, str | None], Path] = {}

    def build(family: str, seed: int = 0, flavour: str | None = None) -> Path:
        key = (family, seed, flavour)
        if key not in built:
            folder = root / "-".join(str(part) for part in key if part is not None)
            if flavour is None:
                get_family(family).tiny(folder, seed)
            else:
                from typer.testing import CliRunner

                from pipeline.cli import app

                args = ["tiny-model", family, str(folder), "--seed", str(seed), "--flavour", flavour]
                result = CliRunner().invoke(app, args, catch_exceptions=False)
                assert result.exit_code == 0, result.output
            built[key] = folder
        return built[key]

    return build


@pytest.fixture(scope="session")
def wan_pipeline(tiny_model):
    """`wan_pipeline(flavour=None, cls="WanPipeline")`: the diffusers pipeline `cls` of `tiny_model("wan",
    flavour=flavour)`, loaded once per test run and shared: tests run it without gradients and read it; a test that
    changes a pipeline (a LoRA) loads its own (tests/helpers/wan.py `pipeline`)."""
    from tests.helpers.wan import pipeline

    loaded: dict[tuple[str | None, str], object] = {}

    def get(flavour: str | None = None, cls: str = "WanPipeline"):
        if (flavour, cls) not in loaded:
            loaded[(flavour, cls)] = pipeline(tiny_model("wan", flavour=flavour), cls)
        return loaded[(flavour, cls)]

    return get


@pytest.fixture(scope="session")
def cached(tmp_path_factory, tiny_model):
    """`cached(family)`: (root, config) of an 8-image sample dataset prepared and cached for the family's tiny model,
    built on first use and shared by every test (they read it and write their outputs elsewhere)."""
    from tests.helpers.training import cached_dataset

    built: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in built:
            root = tmp_path_factory.mktemp(f"cached-{family}")
            built[family] = (root, cached_dataset(root, family, tiny_model(family)))
        return built[family]

    return get


@pytest.fixture(scope="session")
def wan_clips(tmp_path_factory, tiny_model):
    """(root, config) of two `st sample-data --video` clips prepared and cached for the tiny Wan model, built on first
    use and shared like `cached` (tests/helpers/wan.py `sample_clips`)."""
    from tests.helpers.wan import sample_clips

    root = tmp_path_factory.mktemp("wan-clips")
    return root, sample_clips(root, tiny_model("wan"))


@pytest.fixture(scope="session")
def paired(tmp_path_factory, tiny_model):
    """`paired(family, kinds=("controlnet",))`: (root, config) like `cached`, with paired conditioning datasets as
    `st sample-data --conditioning` writes them ("controlnet": edge images, "mask": shape masks), prepared and cached
    once per (family, kinds)."""
    from tests.helpers.training import cached_dataset

    built: dict[tuple[str, tuple[str, ...]], tuple[Path, Path]] = {}

    def get(family: str, kinds: Sequence[str] = ("controlnet",)) -> tuple[Path, Path]:
        key = (family, tuple(kinds))
        if key not in built:
            root = tmp_path_factory.mktemp(f"paired-{family}-{'-'.join(kinds)}")
            built[key] = (root, cached_dataset(root, family, tiny_model(family), conditioning=tuple(kinds)))
        return built[key]

    return get


class LogRecords(Sequence):
    """The records caplog holds for the current test phase from one logger and its children (a live view)."""

    def __init__(self, caplog: pytest.LogCaptureFixture, name: str) -> None:
        self._caplog, self._name = caplog, name

    def _records(self) -> list[logging.LogRecord]:
        return [r for r in self._caplog.records if r.name == self._name or r.name.startswith(self._name + ".")]

    def __getitem__(self, index):
        return self._records()[index]

    def __len__(self) -> int:
        return len(self._records())


@pytest.fixture
def st_log(caplog):
    """`st_log(name)`: the records of st's `name` logger (pipeline.log.get_logger; all of st's without a name) at
    DEBUG and above until the test ends, as a list that fills as they come."""
    from pipeline.log import get_logger

    def watch(name: str | None = None) -> LogRecords:
        logger = get_logger(name)
        caplog.set_level(logging.DEBUG, logger=logger.name)
        return LogRecords(caplog, logger.name)

    return watch

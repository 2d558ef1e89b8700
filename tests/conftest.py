"""Shared fixtures: an offline environment, image factories and a CLI runner."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_image(path: Path, size=(128, 96), colour=(200, 30, 30), fmt: str | None = None, exif_orientation=None) -> Path:
    """Write a real image file; the colour makes its bytes (and so its sample id) distinct."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    fmt = fmt or ("PNG" if path.suffix.lower() == ".png" else "JPEG")
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    img.save(path, format=fmt, **kwargs)
    return path


def write_config(folder: Path, datasets: list[dict], **options) -> Path:
    """Write multidatabackend.json and config.json into `folder`; returns the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "multidatabackend.json").write_text(json.dumps(datasets))
    config = {"data_backend_config": "multidatabackend.json", **options}
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine extra threads make them
    many times slower; byte-for-byte comparisons with subprocesses also assume one thread (OMP_NUM_THREADS=1)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
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


@pytest.fixture
def st_log():
    """`st_log(name)` collects the records of st's `name` logger (pipeline.log.get_logger) at DEBUG until the test
    ends; st's logger may not propagate to the root, so caplog alone does not see them."""
    from pipeline.log import get_logger

    attached = []

    def watch(name: str) -> list[logging.LogRecord]:
        found: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record):
                found.append(record)

        logger, handler = get_logger(name), Keep(level=logging.DEBUG)
        attached.append((logger, handler, logger.level))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        return found

    yield watch
    for logger, handler, level in reversed(attached):
        logger.removeHandler(handler)
        logger.setLevel(level)

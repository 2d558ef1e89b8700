"""Fixtures shared by the stage tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.training import cached_dataset


@pytest.fixture(scope="session")
def cached(tmp_path_factory, tiny_model):
    """`cached(family)`: (root, config) of an 8-image sample dataset prepared and cached for the family's tiny model,
    built on first use and shared by every stage test (they read it and write their outputs elsewhere)."""
    built: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in built:
            root = tmp_path_factory.mktemp(f"cached-{family}")
            built[family] = (root, cached_dataset(root, family, tiny_model(family)))
        return built[family]

    return get

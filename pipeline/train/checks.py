"""The config checks `st train` makes before any work, for `st check` to run too.

Shared code imports no stage (DESIGN.md), so `pipeline.check` cannot reach into this package; the command line
composes the two: `st check` runs the shared checks and these (`run_check(..., stage_checks=config_checks())`).
Each takes the loaded config and raises the same `UserError` `st train` would.
"""

from __future__ import annotations

from typing import Any, Callable


def _optimizer(loaded: Any) -> None:
    """The optimizer's package, its optimizer_config and what it needs of the machine."""
    from .optim import check

    check(loaded.config)


def _validation_adapters(loaded: Any) -> None:
    """validation_adapter_path / validation_adapter_config: the adapter files, and whether the family's validation
    pipeline loads LoRA adapters."""
    from ..families import get_family
    from .validation_adapters import check

    if loaded.config.model_family is not None:
        check(loaded.config, loaded.base_dir, get_family(loaded.config.model_family))


def _layersync(loaded: Any) -> None:
    """LayerSync's family and the options it cannot train with."""
    from ..families import get_family
    from .layersync import options_for

    if loaded.config.model_family is not None:
        options_for(loaded.config, get_family(loaded.config.model_family))


def config_checks() -> tuple[Callable[[Any], None], ...]:
    return (_optimizer, _validation_adapters, _layersync)

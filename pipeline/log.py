"""The one logger of the package and its set-up for the command line."""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "st"


def get_logger(name: str | None = None) -> logging.Logger:
    """Return the package logger, or a child of it (`get_logger("prepare")` -> `st.prepare`)."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record (test runners and CLI runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ARG002 - always the current stderr
        pass


def configure(verbose: bool = False, quiet: bool = False) -> None:
    """Send st's log records to stderr, once per process."""
    logger = logging.getLogger(LOGGER_NAME)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logger.setLevel(level)
    for handler in list(logger.handlers):
        if getattr(handler, "_st_handler", False):
            logger.removeHandler(handler)
    handler = _CurrentStderrHandler()
    handler._st_handler = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(levelname).1s %(name)s: %(message)s" if verbose else "%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False


def quiet_libraries() -> None:
    """st's own progress bars and log lines are enough: silence diffusers' and transformers' per-file bars and
    advisory warnings (set `-v` to see st's debug log)."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()

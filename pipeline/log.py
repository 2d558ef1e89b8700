"""The one logger of the package and its set-up for the command line."""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "st"


def get_logger(name: str | None = None) -> logging.Logger:
    """Return the package logger, or a child of it (`get_logger("prepare")` -> `st.prepare`)."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


class _StderrHandler(logging.Handler):
    """Writes each record to whatever `sys.stderr` is at the time (test and CLI runners swap it), through
    `tqdm.write`: it clears the progress bars on stderr, writes the line and redraws them, so that a log line never
    prints over a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure(verbose: bool = False, quiet: bool = False) -> None:
    """Send st's log records to stderr (one handler, however often this is called).

    The logger propagates, so that pytest's `caplog` and an application embedding st see its records; the command
    line leaves the root logger without a handler, so nothing prints twice."""
    logger = logging.getLogger(LOGGER_NAME)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logger.setLevel(level)
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname).1s %(name)s: %(message)s" if verbose else "%(message)s"))
    logger.addHandler(handler)
    logger.propagate = True


def quiet_libraries() -> None:
    """st's own progress bars and log lines are enough: silence diffusers' and transformers' per-file bars and
    advisory warnings (set `-v` to see st's debug log). torchao, imported by peft and diffusers when it is installed,
    warns on import about CUDA kernels a CPU build cannot load and about deprecated pytree registrations."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()

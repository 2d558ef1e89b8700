"""Exception hierarchy.

`UserError` and its subclasses are problems the user can fix (bad config, bad input, a stale parent stage): the CLI
prints their message and exits 2 without a traceback. Anything else is a bug or an environment failure and exits 1
with the traceback.
"""


class StError(Exception):
    """Base class of every error raised on purpose by st."""


class UserError(StError):
    """A problem with what the user gave us; the message says what failed, where, and how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """A config key is unknown, has the wrong type, or a value outside its choices."""


class InputError(UserError):
    """Input data (images, captions, dataset folders, models) is missing or unusable."""


class ManifestError(UserError):
    """A manifest is missing, of an unknown schema version, or fails its schema."""


class LineageError(UserError):
    """A parent stage's output changed since the child recorded it."""


class NotSupportedError(UserError):
    """A feature that exists in SimpleTuner but is not available in st yet."""


class MachineError(ConfigError):
    """This machine lacks what the config needs (a CUDA GPU, a compute capability, a GPU-only package): raised
    through `pipeline.machine.require`, which `st check --any-machine` turns into a listed need instead."""

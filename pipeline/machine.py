"""What a config needs of the machine that runs it (a CUDA GPU, a compute capability, an NPU or XLA device, a
package), as opposed to what is wrong with the config itself.

Every hardware or environment probe a stage makes before its work goes through `require(met, message)`: when
`met` is false it raises `MachineError` (a `ConfigError`: exit 2, as any refused config), so `st train` and
`st cache` stop at once as they always did. `st check --any-machine` checks a config for another machine (written
on a laptop, trained on a GPU box): it runs its checks inside `deferred_machine_needs()`, under which `require`
records the message and returns, so that the check goes on and every config problem after it is still found; the
recorded needs are then listed apart from the problems. Callers must therefore not rely on `require` not
returning: a probe that only makes sense when the requirement is met (the compute capability of a missing GPU)
is guarded by its own condition.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

from .errors import MachineError

__all__ = ["ANY_MACHINE_HINT", "MachineError", "deferred_machine_needs", "require"]

# Appended by `st check` (without --any-machine) to each machine need it reports as a problem.
ANY_MACHINE_HINT = "(`st check --any-machine` checks the config for another machine)"

_DEFERRED: ContextVar[list[str] | None] = ContextVar("st_deferred_machine_needs", default=None)


def require(met: bool, message: str) -> None:
    """Nothing when `met`; else raise `MachineError(message)`, or, under `deferred_machine_needs()`, record
    `message` (once) and return. `message` names the option, what it needs and how to get it."""
    if met:
        return
    needs = _DEFERRED.get()
    if needs is None:
        raise MachineError(message)
    if message not in needs:
        needs.append(message)


@contextlib.contextmanager
def deferred_machine_needs() -> Iterator[list[str]]:
    """Within the block, `require` records unmet needs in the yielded list instead of raising."""
    needs: list[str] = []
    token = _DEFERRED.set(needs)
    try:
        yield needs
    finally:
        _DEFERRED.reset(token)
